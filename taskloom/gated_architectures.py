"""Gated and attention architectures: gated mixers, MMoE, CGC, PLE, AdaTT, MTAN.

Registered into :data:`~taskloom.architectures.ARCHITECTURES` (importing :mod:`taskloom` does
it); the building blocks are in :mod:`taskloom.gated`. Every design works on any staged backbone:

* ``gated``: task towers with a :class:`~taskloom.gated.GatedMixer` after chosen stages
  (``constant: true``: a per-layer cross-stitch with softmax-normalised rows);
* ``mmoe`` (Ma et al., KDD 2018): E shared experts, each a full backbone copy, per-task softmax
  gates read from the pooled input;
* ``cgc`` (Tang et al., RecSys 2020): per-task plus shared experts (full backbone copies), each
  task's gate over its own and the shared experts;
* ``ple``: CGC extraction layers stacked, one per group of stages, with a gated shared stream;
* ``adatt`` (Li et al., KDD 2023): per stage, a unit per task (and optional shared units), every
  gate over all units, plus a learned residual of the task's own unit;
* ``mtan`` (Liu, Johns, Davison, CVPR 2019): one shared network, a soft attention mask per task
  on every stage's output.
"""
from __future__ import annotations

import dataclasses

from torch import nn

from taskloom.architectures import ARCHITECTURES, ArchOptions, MixedTowersOptions, _check_stage, towers_with_mixers
from taskloom.backbones import Backbone
from taskloom.errors import ConfigError
from taskloom.gated import Attention, ExpertStage, GatedMixer, MTANStage
from taskloom.models import MultiTaskNet
from taskloom.tasks import Task


@dataclasses.dataclass
class GatedOptions(MixedTowersOptions):
    """Task towers mixed by input-dependent gates, ``y_t = sum_s g_ts(x_t) x_s``."""

    name: str = "gated"
    softmax: bool = True
    """Normalise each task's gates over the K sources with a softmax."""
    constant: bool = False
    """Gates without input dependence: a per-layer cross-stitch (rows summing to one with softmax)."""
    alpha_same: float = 0.9
    """Initial gate on the task's own feature (the others share the rest)."""


@ARCHITECTURES.register("gated", GatedOptions)
def build_gated(options: GatedOptions, backbone: Backbone, tasks: list[Task]) -> MultiTaskNet:
    """Task towers with a gated mixer after chosen stages."""
    split_at, stages = options.placement(backbone)
    mixers = {stage: GatedMixer(len(tasks), backbone.shapes[stage - 1][0], options.softmax, options.constant,
                                options.alpha_same) for stage in stages}
    return towers_with_mixers(backbone, tasks, split_at, mixers)


def _groups(backbone: Backbone, levels: list[int] | None, key: str) -> list[tuple[int, int]]:
    """Stage ranges ``[start, end)`` (0-based) ending after each of the 1-based ``levels`` and
    after the last stage (``null``: one group of the whole backbone)."""
    for end in levels or []:
        _check_stage(end, backbone, key, low=1)
    ends = sorted(set(levels or []) | {backbone.num_stages})
    return list(zip([0] + ends[:-1], ends))


def _expert(backbone: Backbone, start: int, end: int) -> nn.Module:
    """A fresh expert: stages ``start..end-1`` of a new backbone copy."""
    return nn.Sequential(*backbone.build()[start:end])


def _in_channels(backbone: Backbone, start: int) -> int:
    return (backbone.input_shape if start == 0 else backbone.shapes[start - 1])[0]


def expert_network(backbone: Backbone, tasks: list[Task], levels: list[tuple[int, int]], task_experts: int,
                   shared_experts: int, see_all: bool, residual: bool) -> MultiTaskNet:
    """The network of :class:`~taskloom.gated.ExpertStage` levels common to MMoE, CGC, PLE, AdaTT:
    level ``(start, end)`` has experts made of those stages; every level but the top passes a
    gated shared stream up when there are shared experts (PLE)."""
    if task_experts < 0 or shared_experts < 0 or task_experts + shared_experts < 1:
        raise ConfigError("model.architecture: task_experts and shared_experts must be >= 0, with at least one expert")
    body = []
    for i, (start, end) in enumerate(levels):
        top = i == len(levels) - 1
        body.append(ExpertStage(
            [[_expert(backbone, start, end) for _ in range(task_experts)] for _ in tasks],
            [_expert(backbone, start, end) for _ in range(shared_experts)],
            _in_channels(backbone, start), see_all=see_all, shared_out=bool(shared_experts) and not top,
            residual=residual,
        ))
    return MultiTaskNet(tasks, [], body, backbone.shapes[-1])


@dataclasses.dataclass
class MMoEOptions(ArchOptions):
    """Multi-gate mixture of experts (Ma et al., KDD 2018): shared experts, a softmax gate per task."""

    name: str = "mmoe"
    experts: int = 3
    """E, the number of experts (each a full backbone copy, as LibMTL's)."""
    levels: list[int] | None = None
    """Per-stage variant: 1-based stages after which a level of experts ends (the last stage always
    ends one); ``null``: one level of full-backbone experts."""


@ARCHITECTURES.register("mmoe", MMoEOptions)
def build_mmoe(options: MMoEOptions, backbone: Backbone, tasks: list[Task]) -> MultiTaskNet:
    """E full-backbone experts mixed per task by softmax gates on the pooled input."""
    if options.experts < 1:
        raise ConfigError(f"model.architecture.experts: must be at least 1, got {options.experts}")
    levels = _groups(backbone, options.levels, "levels")
    return expert_network(backbone, tasks, levels, 0, options.experts, see_all=True, residual=False)


@dataclasses.dataclass
class CGCOptions(ArchOptions):
    """Customized gate control (Tang et al., RecSys 2020): task-specific and shared experts."""

    name: str = "cgc"
    task_experts: int = 1
    """Experts per task (full backbone copies), seen by that task's gate only."""
    shared_experts: int = 1
    """Shared experts, seen by every gate."""


@ARCHITECTURES.register("cgc", CGCOptions)
def build_cgc(options: CGCOptions, backbone: Backbone, tasks: list[Task]) -> MultiTaskNet:
    """One extraction layer of full-backbone experts, each task gating its own and the shared ones."""
    return expert_network(backbone, tasks, _groups(backbone, None, "levels"), options.task_experts,
                          options.shared_experts, see_all=False, residual=False)


@dataclasses.dataclass
class PLEOptions(CGCOptions):
    """Progressive layered extraction (Tang et al., RecSys 2020): CGC layers stacked over stages."""

    name: str = "ple"
    levels: list[int] | None = None
    """1-based stages after which an extraction layer ends (the last stage always does); ``null``:
    one layer per stage."""


@ARCHITECTURES.register("ple", PLEOptions)
def build_ple(options: PLEOptions, backbone: Backbone, tasks: list[Task]) -> MultiTaskNet:
    """Stacked CGC layers whose shared experts read a gated shared stream from the layer below."""
    levels = options.levels if options.levels is not None else list(range(1, backbone.num_stages + 1))
    return expert_network(backbone, tasks, _groups(backbone, levels, "levels"), options.task_experts,
                          options.shared_experts, see_all=False, residual=False)


@dataclasses.dataclass
class AdaTTOptions(ArchOptions):
    """Adaptive task-to-task fusion (Li et al., KDD 2023): per-stage units fused by task gates."""

    name: str = "adatt"
    task_experts: int = 1
    """Units per task at every level."""
    shared_experts: int = 0
    """Optional shared units at every level (AdaTT's ``AdaTT-sp`` has them)."""
    levels: list[int] | None = None
    """1-based stages after which a fusion level ends (the last stage always does); ``null``: one
    level per stage."""
    residual: bool = True
    """Add the task's own unit(s), each with a learned scale (init 1)."""


@ARCHITECTURES.register("adatt", AdaTTOptions)
def build_adatt(options: AdaTTOptions, backbone: Backbone, tasks: list[Task]) -> MultiTaskNet:
    """Per level, every task's gate fuses all units; plus the residual of the task's own."""
    if options.task_experts < 1:
        raise ConfigError(f"model.architecture.task_experts: AdaTT needs at least 1, got {options.task_experts}")
    levels = options.levels if options.levels is not None else list(range(1, backbone.num_stages + 1))
    return expert_network(backbone, tasks, _groups(backbone, levels, "levels"), options.task_experts,
                          options.shared_experts, see_all=True, residual=options.residual)


@dataclasses.dataclass
class MTANOptions(ArchOptions):
    """Multi-task attention network (Liu, Johns, Davison, CVPR 2019) on any staged backbone.

    The paper's attention reads a feature inside each block; on a backbone given only as stages,
    ``u`` is the stage's input and the mask (at ``u``'s resolution) is average-pooled to the
    stage output it multiplies."""

    name: str = "mtan"


@ARCHITECTURES.register("mtan", MTANOptions)
def build_mtan(options: MTANOptions, backbone: Backbone, tasks: list[Task]) -> MultiTaskNet:
    """One shared network; per task, a sigmoid attention mask on every stage's output."""
    stages = backbone.build()
    n = len(stages)
    body = []
    for i, stage in enumerate(stages):
        attention = [Attention(_in_channels(backbone, i), backbone.shapes[i], with_prev=i > 0) for _ in tasks]
        body.append(MTANStage(stage, attention, first=i == 0, last=i == n - 1))
    return MultiTaskNet(tasks, [], body, backbone.shapes[-1])
