"""Tasks: what is predicted, with which head, loss and metrics.

A :class:`Task` knows how to build its output head on top of a feature map of a given shape,
its loss, its metrics and, for each metric, whether higher is better (needed for delta_m and
model selection). New task kinds subclass :class:`Task` and register in :data:`TASK_KINDS`.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    import torchmetrics

TASK_KINDS: dict[str, type[Task]] = {}


def register_task_kind(cls: type[Task]) -> type[Task]:
    TASK_KINDS[cls.kind] = cls
    return cls


class Task:
    """One prediction target of a multi-task network."""

    kind: ClassVar[str] = ""
    primary: ClassVar[str] = ""
    """The metric used for model selection and delta_m."""
    higher_is_better: ClassVar[dict[str, bool]] = {}

    def __init__(self, name: str):
        self.name = name

    def build_head(self, feature_shape: tuple[int, ...]) -> nn.Module:
        """A head mapping features of ``feature_shape`` (without batch) to this task's output."""
        raise NotImplementedError

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        raise NotImplementedError

    def metrics(self) -> torchmetrics.MetricCollection:
        """A fresh collection of this task's metrics (synced across processes by torchmetrics)."""
        raise NotImplementedError

    def combine(self, outputs: list[Tensor]) -> Tensor:
        """Combine the outputs of ensemble members into one prediction."""
        return torch.stack(outputs).mean(0)

    def summarize(self, values: dict[str, Tensor]) -> dict[str, float | list[float]]:
        """Turn computed metric tensors into JSON-ready numbers."""
        return {k: (v.tolist() if v.ndim else float(v)) for k, v in values.items()}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class _FlatLinear(nn.Module):
    """Global average pool (for feature maps), flatten, linear."""

    def __init__(self, feature_shape: tuple[int, ...], out_features: int):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1) if len(feature_shape) == 3 else nn.Identity()
        self.fc = nn.Linear(feature_shape[0], out_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.pool(x), 1))


@register_task_kind
class ClassificationTask(Task):
    """Single-label classification: softmax cross-entropy; top-1, top-5, macro and per-class
    accuracy (per-class feeds the "data-starved" view of the cross-stitch paper)."""

    kind = "classification"
    primary = "accuracy"
    higher_is_better = {"accuracy": True, "top5": True, "macro_accuracy": True, "per_class_accuracy": True}

    def __init__(self, name: str, num_classes: int):
        super().__init__(name)
        if num_classes < 2:
            raise ValueError(f"task {name!r}: a classification task needs at least 2 classes")
        self.num_classes = num_classes

    def build_head(self, feature_shape: tuple[int, ...]) -> nn.Module:
        return _FlatLinear(feature_shape, self.num_classes)

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(output, target)

    def combine(self, outputs: list[Tensor]) -> Tensor:
        # Average the members' probabilities (not logits); log keeps argmax and CE meaningful.
        probs = torch.stack([o.softmax(-1) for o in outputs]).mean(0)
        return probs.clamp_min(1e-12).log()

    def metrics(self) -> torchmetrics.MetricCollection:
        import torchmetrics
        from torchmetrics.classification import MulticlassAccuracy

        k = self.num_classes
        collection = {
            "accuracy": MulticlassAccuracy(k, average="micro"),
            "macro_accuracy": MulticlassAccuracy(k, average="macro"),
            "per_class_accuracy": MulticlassAccuracy(k, average="none"),
        }
        if k > 5:
            collection["top5"] = MulticlassAccuracy(k, top_k=5, average="micro")
        return torchmetrics.MetricCollection(collection)


def primary_score(task: Task, values: dict[str, float | list[float]]) -> float:
    """The task's primary metric, negated where lower is better (higher score = better)."""
    value = float(values[task.primary])
    if math.isnan(value):
        return -math.inf
    return value if task.higher_is_better[task.primary] else -value
