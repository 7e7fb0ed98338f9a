"""A new mixer (features of K towers -> K new ones) and an architecture that places it, chosen
from a config like any built-in one. Its parameters are of kind "fusion" (own learning rate)."""
import dataclasses

import torch
from torch import nn

import taskloom as tl
from taskloom.architectures import ARCHITECTURES, ArchOptions, towers_with_mixers
from taskloom.config import from_dict
from taskloom.mixers import Mixer

from _common import run_dir, settings


class GatedMean(Mixer):
    """``y_t = x_t + g_t * mean_s x_s`` with one learned gate per task (0 = independent towers)."""

    def __init__(self, num_tasks: int, channels: int, gate: float = 0.0):
        super().__init__(num_tasks)
        self.channels = channels
        self.gate = nn.Parameter(torch.full((num_tasks,), gate))

    def forward(self, xs):
        mean = torch.stack(xs).mean(0)
        return [x + g * mean for x, g in zip(xs, self.gate)]

    def blocks(self):                                       # (K, K, C, C), for inspect / TensorBoard
        k, eye = self.num_tasks, torch.eye(self.channels)
        weights = torch.eye(k) + self.gate.detach()[:, None] / k
        return weights[:, :, None, None] * eye


@dataclasses.dataclass
class GatedOptions(ArchOptions):
    name: str = "gated_mean"
    gate: float = 0.0


@ARCHITECTURES.register("gated_mean", GatedOptions)
def build_gated(options: GatedOptions, backbone, tasks):
    """Task towers with a gated-mean unit after every stage."""
    mixers = {i + 1: GatedMean(len(tasks), shape[0], options.gate) for i, shape in enumerate(backbone.shapes)}
    return towers_with_mixers(backbone, tasks, 0, mixers)


if __name__ == "__main__":
    config = from_dict({**settings(), "model": {"architecture": {"name": "gated_mean", "gate": 0.1}}})
    result = tl.run(config, run_dir("gated"), log=lambda *a: None)
    print({task: round(m["accuracy"], 4) for task, m in result["tasks"].items()})
