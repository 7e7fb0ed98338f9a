"""Optimisation: parameter groups, learning-rate schedules and the mixed-precision step.

:func:`build_optimizer` gives every parameter kind (backbone / fusion / head / ...) its own
group, learning-rate multiplier and weight decay; :func:`build_scheduler` scales every group by
one common factor, so the multipliers survive any schedule; :class:`Precision` runs the forward
pass under autocast and the optimizer step through a gradient scaler.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
from torch import nn

from taskloom.config import ScheduleOptions, TrainConfig
from taskloom.errors import ConfigError
from taskloom.models import parameter_kinds


def build_optimizer(model: nn.Module, cfg: TrainConfig, *extra: nn.Module) -> torch.optim.Optimizer:
    """One parameter group per kind, ``lr = cfg.lr * lr_mult`` and its own weight decay.

    ``extra`` modules (the loss weighting) contribute their parameters by kind as well.
    """
    groups = []
    kinds = parameter_kinds(model)
    for module in extra:
        for kind, params in parameter_kinds(module).items():
            kinds.setdefault(kind, []).extend(params)
    for kind, params in kinds.items():
        options = getattr(cfg.groups, kind, None)
        if options is None:
            raise ConfigError(f"train.groups: no settings for parameter kind {kind!r}")
        decay = cfg.weight_decay if options.weight_decay is None else options.weight_decay
        groups.append({"params": params, "name": kind, "lr": cfg.lr * options.lr_mult,
                       "lr_mult": options.lr_mult, "weight_decay": decay})
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    return torch.optim.Adam(groups, lr=cfg.lr)


def schedule_factor(options: ScheduleOptions, epoch: int, epochs: int) -> float:
    """Multiplier of every group's base learning rate at (0-based) ``epoch``."""
    if options.name == "step":
        return options.gamma ** (epoch // options.step_size)
    if options.name == "poly":
        return max(0.0, 1.0 - epoch / epochs) ** options.power
    if options.name == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
    return 1.0


def build_scheduler(optimizer: torch.optim.Optimizer, options: ScheduleOptions, epochs: int):
    """An epoch-wise scheduler that multiplies every group's rate by one common factor.

    ``LambdaLR`` scales each group's own initial rate, and ``ReduceLROnPlateau`` multiplies
    each group's current rate, so the ratio between groups (the fusion multiplier) is kept.
    """
    if options.name == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max", factor=options.gamma, patience=options.patience
        )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: schedule_factor(options, e, epochs))


def step_scheduler(scheduler: Any, score: float) -> None:
    """Advance ``scheduler`` by one epoch; ``ReduceLROnPlateau`` is given the selection score."""
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        scheduler.step(score)
    else:
        scheduler.step()


class Precision:
    """``train.precision``: 32 (float32), ``bf16`` (bfloat16 autocast) or ``16-mixed`` (float16
    autocast with dynamic loss scaling). Parameters, mixers' included, stay float32: autocast
    only changes the dtype ops compute in."""

    def __init__(self, mode: Any, device: torch.device):
        self.mode, self.device = mode, device
        self.dtype = {"bf16": torch.bfloat16, "16-mixed": torch.float16}.get(mode)
        self.scaler = torch.amp.GradScaler(device.type, enabled=mode == "16-mixed")

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def backward(self, weighting: Any, losses: dict, penalties: dict, model: nn.Module) -> dict[str, Any]:
        if self.scaler.is_enabled():  # scale() (re)initialises the scaler's state for this step
            weighting.loss_scale = self.scaler.scale(torch.ones((), device=self.device))
        else:
            weighting.loss_scale = 1.0
        return weighting.backward(losses, penalties, model)

    def step(self, optimizer: torch.optim.Optimizer, model: nn.Module, grad_clip: float | None) -> None:
        if grad_clip is not None:
            self.scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        self.scaler.step(optimizer)
        self.scaler.update()
