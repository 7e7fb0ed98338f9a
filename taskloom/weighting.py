"""Loss weighting: how the K task losses become one update (an axis independent of the
architecture).

A :class:`Weighting` receives the per-task losses of a batch (and any named penalty terms, such
as a tower-weight regulariser, which are always added with weight 1), runs the backward pass
and returns the task weights it used, for logging. Weightings that learn (their parameters
are optimised in their own ``weighting`` parameter group) or keep history implement
``state_dict``/``load_state_dict`` through ``nn.Module``, so they are checkpointed and resumed.

Register a new one with ``WEIGHTINGS.register(name, OptionsClass)(builder)``; the builder gets
``(options, task_names, static_weights)`` where ``static_weights`` are ``train.loss_weights``.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import Tensor, nn

from taskloom.registry import Registry

WEIGHTINGS: Registry[Weighting] = Registry("weighting")


@dataclasses.dataclass
class WeightingOptions:
    """Base of every weighting's options; ``name`` picks the method."""

    registry: ClassVar[Registry] = WEIGHTINGS
    name: str = ""


class Weighting(nn.Module):
    """Turns per-task losses into gradients. Parameters are of kind ``weighting``."""

    param_kind = "weighting"

    def __init__(self, task_names: list[str], static_weights: dict[str, float]):
        super().__init__()
        self.task_names = list(task_names)
        self.static = {t: float(static_weights.get(t, 1.0)) for t in task_names}

    def backward(self, losses: dict[str, Tensor], penalties: dict[str, Tensor], model: nn.Module) -> dict[str, float]:
        """Run the backward pass of one batch; return the weight applied to each task."""
        raise NotImplementedError

    def epoch_end(self, train_losses: dict[str, float]) -> None:
        """Called after every epoch with the mean training loss of each task."""


@dataclasses.dataclass
class FixedOptions(WeightingOptions):
    """Fixed weights: ``sum_t w_t L_t`` with ``w_t`` from ``train.loss_weights`` (default 1)."""

    name: str = "fixed"


class FixedWeighting(Weighting):
    """``L = sum_t w_t L_t + sum(penalties)``: the papers' (weighted) sum of task losses."""

    def backward(self, losses, penalties, model):
        total = sum(self.static[t] * losses[t] for t in self.task_names)
        total = total + sum(penalties.values(), torch.zeros(()))
        total.backward()
        return dict(self.static)


@WEIGHTINGS.register("fixed", FixedOptions)
def build_fixed(options: FixedOptions, task_names: list[str], static_weights: dict[str, float]) -> Weighting:
    """Fixed per-task weights (train.loss_weights; default 1 each)."""
    return FixedWeighting(task_names, static_weights)


def build_weighting(options: WeightingOptions, task_names: list[str], static_weights: dict[str, float]) -> Weighting:
    return WEIGHTINGS[options.name].builder(options, task_names, static_weights)
