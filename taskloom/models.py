"""Multi-task networks: a shared trunk, task towers with mixers between stages, one head per task.

Every architecture is the same picture (REFERENCE §0)::

    input -> trunk (stages 1..k, shared) -> body (blocks mapping K features to K features) -> heads

The body is a list of blocks, each ``list of K tensors -> list of K tensors``:
:class:`TaskParallel` applies tower t's stage to feature t; a :class:`~taskloom.mixers.Mixer`
exchanges features between towers. So:

* ``single``: k = 0 and no mixers (K independent networks in one module);
* ``split@k``: trunk of k stages, towers above (k = number of stages: only heads separate);
* ``cross_stitch``: towers with a cross-stitch unit after chosen stages (and an optional trunk).

Register a new architecture with ``ARCHITECTURES.register(name, OptionsClass)(builder)``; the
builder gets its options, a :class:`~taskloom.backbones.Backbone` and the tasks.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from taskloom.backbones import Backbone, BackboneOptions
from taskloom.errors import ConfigError
from taskloom.mixers import CrossStitch, Mixer
from taskloom.registry import Registry
from taskloom.tasks import Task


def _shorthand(value: str) -> dict[str, Any] | None:
    match = re.fullmatch(r"split@(\d+)", value.strip())
    return {"name": "split", "at": int(match.group(1))} if match else None


ARCHITECTURES: Registry[nn.Module] = Registry("architecture", shorthand=_shorthand)


@dataclasses.dataclass
class ArchOptions:
    """Base of every architecture's options; ``name`` picks the architecture."""

    registry: ClassVar[Registry] = ARCHITECTURES
    name: str = ""


# --------------------------------------------------------------------------- building blocks


class TaskParallel(nn.Module):
    """Applies module t to feature t: ``[m_1(x_1), ..., m_K(x_K)]``."""

    def __init__(self, modules: list[nn.Module]):
        super().__init__()
        self.towers = nn.ModuleList(modules)

    def forward(self, xs: list[Tensor]) -> list[Tensor]:
        return [m(x) for m, x in zip(self.towers, xs, strict=True)]


class Heads(nn.ModuleDict):
    """One output head per task (parameters of kind ``"head"``)."""

    param_kind = "head"


class MultiTaskNet(nn.Module):
    """``forward(x) -> {task name: output}``.

    Args:
        tasks: the K tasks, in tower order.
        trunk: stages shared by all tasks (may be empty).
        body: blocks mapping K features to K features (towers and mixers).
        feature_shape: shape (without batch) of each tower's final feature, for the heads.
    """

    def __init__(self, tasks: list[Task], trunk: list[nn.Module], body: list[nn.Module], feature_shape: tuple[int, ...]):
        super().__init__()
        self.tasks = list(tasks)
        self.trunk = nn.Sequential(*trunk)
        self.body = nn.ModuleList(body)
        self.heads = Heads({t.name: t.build_head(feature_shape) for t in tasks})

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def features(self, x: Tensor) -> list[Tensor]:
        """The K task features that feed the heads."""
        shared = self.trunk(x)
        xs = [shared] * len(self.tasks)
        for block in self.body:
            xs = block(xs)
        return xs

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {name: self.heads[name](f) for name, f in zip(self.task_names, self.features(x), strict=True)}

    def loss_terms(self, outputs: dict[str, Tensor], targets: dict[str, Tensor]) -> dict[str, Tensor]:
        """Unweighted loss of every task."""
        return {t.name: t.loss(outputs[t.name], targets[t.name]) for t in self.tasks}

    def penalty(self) -> dict[str, Tensor]:
        """Named extra loss terms (regularisers), added to the weighted task losses. None here."""
        return {}

    def mixers(self) -> list[tuple[str, Mixer]]:
        """(name, mixer) of every mixing unit, in forward order."""
        return [(n, m) for n, m in self.named_modules() if isinstance(m, Mixer)]


class Ensemble(nn.Module):
    """M independently trained copies of a network; predictions combined per task.

    In training mode ``forward`` returns each task's member outputs stacked on dim 0 and
    :meth:`loss_terms` averages the members' losses. Members share no parameters, so each one
    receives exactly the gradient it would get trained alone (the ensemble baseline of the
    cross-stitch paper). In eval mode the members' predictions are combined by the task
    (mean probability for classification).
    """

    def __init__(self, members: list[MultiTaskNet]):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.tasks = members[0].tasks

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        outs = [m(x) for m in self.members]
        if self.training:
            return {t.name: torch.stack([o[t.name] for o in outs]) for t in self.tasks}
        return {t.name: t.combine([o[t.name] for o in outs]) for t in self.tasks}

    def loss_terms(self, outputs: dict[str, Tensor], targets: dict[str, Tensor]) -> dict[str, Tensor]:
        return {
            t.name: torch.stack([t.loss(o, targets[t.name]) for o in outputs[t.name]]).mean()
            for t in self.tasks
        }


def parameter_kinds(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Parameters grouped by kind (``backbone``, ``fusion``, ``head``, ...).

    A parameter's kind is the ``param_kind`` of its innermost module that declares one
    (mixers: ``fusion``, heads: ``head``), else ``backbone``.
    """
    kind_of: dict[int, str] = {}

    def visit(module: nn.Module, kind: str) -> None:
        kind = getattr(module, "param_kind", kind)
        for p in module.parameters(recurse=False):
            kind_of.setdefault(id(p), kind)
        for child in module.children():
            visit(child, kind)

    visit(model, "backbone")
    groups: dict[str, list[nn.Parameter]] = {}
    for p in model.parameters():
        groups.setdefault(kind_of[id(p)], []).append(p)
    return groups


# --------------------------------------------------------------------------- architectures


def _check_stage(value: int, backbone: Backbone, key: str, low: int = 0) -> int:
    if not low <= value <= backbone.num_stages:
        raise ConfigError(
            f"model.architecture.{key}: {value} is out of range; the backbone has "
            f"{backbone.num_stages} stages, so use {low}..{backbone.num_stages}"
        )
    return value


def towers_with_mixers(
    backbone: Backbone, tasks: list[Task], split_at: int, mixer_after: dict[int, Mixer]
) -> MultiTaskNet:
    """Trunk of ``split_at`` stages, one tower per task above it, ``mixer_after[i]`` placed
    after (1-based) stage i. The shared building routine of every tower architecture."""
    shared = backbone.build()[:split_at]
    towers = [backbone.build() for _ in tasks]
    body: list[nn.Module] = []
    for i in range(split_at, backbone.num_stages):
        body.append(TaskParallel([tower[i] for tower in towers]))
        if i + 1 in mixer_after:
            body.append(mixer_after[i + 1])
    return MultiTaskNet(tasks, shared, body, backbone.shapes[-1])


@dataclasses.dataclass
class SingleOptions(ArchOptions):
    """One independent network per task (towers from the input, no exchange)."""

    name: str = "single"


@ARCHITECTURES.register("single", SingleOptions)
def build_single(options: SingleOptions, backbone: Backbone, tasks: list[Task]) -> MultiTaskNet:
    """Independent networks, one per task."""
    return towers_with_mixers(backbone, tasks, 0, {})


@dataclasses.dataclass
class SplitOptions(ArchOptions):
    """Hard sharing: stages 1..at shared, separate towers above (``split@k`` shorthand)."""

    name: str = "split"
    at: int = 0
    """Number of shared stages: 0 = separate towers, number of stages = only heads separate."""


@ARCHITECTURES.register("split", SplitOptions)
def build_split(options: SplitOptions, backbone: Backbone, tasks: list[Task]) -> MultiTaskNet:
    """Shared trunk below stage ``at``, task towers above."""
    return towers_with_mixers(backbone, tasks, _check_stage(options.at, backbone, "at"), {})


@dataclasses.dataclass
class EnsembleOptions(ArchOptions):
    """Per task, ``members`` independent networks whose predictions are averaged."""

    name: str = "ensemble"
    members: int = 2

    def __post_init__(self) -> None:
        if self.members < 1:
            raise ValueError(f"members must be at least 1, got {self.members}")


@ARCHITECTURES.register("ensemble", EnsembleOptions)
def build_ensemble(options: EnsembleOptions, backbone: Backbone, tasks: list[Task]) -> Ensemble:
    """Ensemble of independent single-task networks (M x the parameters of ``single``)."""
    return Ensemble([towers_with_mixers(backbone, tasks, 0, {}) for _ in range(options.members)])


@dataclasses.dataclass
class CrossStitchOptions(ArchOptions):
    """Cross-stitch units between task towers (Misra et al., CVPR 2016)."""

    name: str = "cross_stitch"
    split_at: int = 0
    """Stages shared below the towers (0: towers from the input, as in the paper)."""
    after: list[int] | None = None
    """1-based stages after which a unit is placed; ``null``: after every tower stage."""
    granularity: Literal["channel", "layer"] = "channel"
    alpha_same: float = 0.9
    alpha_diff: float | None = None
    """Initial cross-task weight; ``null``: (1 - alpha_same) / (K - 1), rows sum to one."""


@ARCHITECTURES.register("cross_stitch", CrossStitchOptions)
def build_cross_stitch(options: CrossStitchOptions, backbone: Backbone, tasks: list[Task]) -> MultiTaskNet:
    """Task towers exchanging features through cross-stitch units."""
    split_at = _check_stage(options.split_at, backbone, "split_at")
    after = options.after if options.after is not None else range(split_at + 1, backbone.num_stages + 1)
    for stage in after:
        _check_stage(stage, backbone, "after", low=split_at + 1)
    mixers = {
        stage: CrossStitch(len(tasks), backbone.shapes[stage - 1][0], options.granularity,
                           options.alpha_same, options.alpha_diff)
        for stage in sorted(set(after))
    }
    return towers_with_mixers(backbone, tasks, split_at, mixers)


def build_model(
    architecture: ArchOptions, backbone: BackboneOptions, tasks: list[Task], input_shape: tuple[int, ...]
) -> nn.Module:
    """Build the network an architecture and backbone config describe, for these tasks."""
    if not tasks:
        raise ConfigError("data.tasks: at least one task is needed")
    try:
        recipe = Backbone(backbone, input_shape)
    except (ValueError, RuntimeError) as exc:
        raise ConfigError(f"model.backbone: cannot build {backbone.name!r} for input {tuple(input_shape)}: {exc}") from None
    return ARCHITECTURES[architecture.name].builder(architecture, recipe, tasks)
