"""A new head: subclass a task kind, override ``build_head`` (features of any shape -> outputs),
and register it as a kind of its own so that configs (for example a manifest's targets) can use it."""
from torch import nn

import taskloom as tl
from taskloom.tasks import ClassificationTask, register_task_kind

from _common import run_dir, settings


@register_task_kind
class MLPClassificationTask(ClassificationTask):
    """Classification with a two-layer MLP head (pool, flatten, linear-ReLU-dropout, linear)."""

    kind = "classification_mlp"

    def __init__(self, name: str, num_classes: int, hidden: int = 64):
        super().__init__(name, num_classes)
        self.hidden = hidden

    def build_head(self, feature_shape: tuple[int, ...]) -> nn.Module:
        pool = nn.AdaptiveAvgPool2d(1) if len(feature_shape) == 3 else nn.Identity()
        return nn.Sequential(pool, nn.Flatten(), nn.Linear(feature_shape[0], self.hidden), nn.ReLU(),
                             nn.Dropout(0.1), nn.Linear(self.hidden, self.num_classes))


if __name__ == "__main__":
    s = settings()
    data = tl.build_data(tl.MultiMNISTOptions(**{k: v for k, v in s["data"].items() if k != "name"}))
    data.tasks = [MLPClassificationTask(t.name, t.num_classes) for t in data.tasks]  # swap the heads
    model = tl.build_model(tl.SplitOptions(at=2), tl.LeNetOptions(), data.tasks, data.input_shape)
    assert isinstance(model.heads["left"][2], nn.Linear)
    result = tl.fit(model, data, tl.TrainConfig(**s["train"]), run_dir("mlp_head"), batch_size=64,
                    log=lambda *a: None)
    print({task: round(m["accuracy"], 4) for task, m in result["tasks"].items()})
