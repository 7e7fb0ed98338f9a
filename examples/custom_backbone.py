"""Register a new backbone: a recipe returning an ordered list of stages (mixers and splits go
between stages), with an options dataclass that becomes its config keys."""
import dataclasses

from torch import nn

import taskloom as tl
from taskloom.backbones import BACKBONES, BackboneOptions
from taskloom.config import from_dict

from _common import run_dir, settings


@dataclasses.dataclass
class TinyCNNOptions(BackboneOptions):
    name: str = "tiny_cnn"
    width: int = 16
    """Channels of the first conv stage (doubled in the second)."""


@BACKBONES.register("tiny_cnn", TinyCNNOptions)
def build_tiny_cnn(options: TinyCNNOptions, input_shape: tuple[int, ...]) -> list[nn.Module]:
    """Two conv stages and a fully connected one (3 stages)."""
    w, (c, h, wd) = options.width, input_shape
    return [
        nn.Sequential(nn.Conv2d(c, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)),
        nn.Sequential(nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)),
        nn.Sequential(nn.Flatten(), nn.Linear(2 * w * (h // 4) * (wd // 4), 64), nn.ReLU()),
    ]


if __name__ == "__main__":
    config = from_dict({**settings(), "model": {
        "backbone": {"name": "tiny_cnn", "width": 8},                 # the new backbone, from a config
        "architecture": {"name": "cross_stitch", "after": [1, 2]}}})
    result = tl.run(config, run_dir("tiny_cnn"), log=lambda *a: None)
    print({task: round(m["accuracy"], 4) for task, m in result["tasks"].items()})
