"""Architectures: how a backbone's stages become a multi-task network, and their registry.

Every architecture builds a :class:`~taskloom.models.MultiTaskNet` (or an
:class:`~taskloom.models.Ensemble`) from a :class:`~taskloom.backbones.Backbone` recipe:

* ``single``: k = 0 and no mixers (K independent networks in one module);
* ``split@k``: trunk of k stages, towers above (k = number of stages: only heads separate);
* ``cross_stitch``, ``nddr``, ``sluice``: towers with a mixing unit after chosen stages (and an
  optional trunk); ``nddr_shortcut`` and ``sluice`` with ``beta`` add a block reading the
  outputs of every mixed stage;
* ``xresnet``: a shared trunk and per-task residual branches with cross-residual shortcuts;
* ``ensemble``: independent copies of ``single``.

Register a new architecture with ``ARCHITECTURES.register(name, OptionsClass)(builder)``; the
builder gets its options, a :class:`~taskloom.backbones.Backbone` and the tasks.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, ClassVar, Literal

from torch import nn

from taskloom.backbones import Backbone, BackboneOptions
from taskloom.blocks import BetaMix, CrossResidual, NDDRShortcut, is_residual_block
from taskloom.errors import ConfigError
from taskloom.mixers import CROSS_KINDS, NDDR, CrossShortcut, CrossStitch, Mixer, Sluice
from taskloom.models import Ensemble, MultiTaskNet, TaskParallel
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


# --------------------------------------------------------------------------- towers with mixers


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
    shared, body, towers = _tower_body(backbone, tasks, split_at, mixer_after)
    return _finish(MultiTaskNet(tasks, shared, body, backbone.shapes[-1]), towers, split_at)


def towers_with_stage_reader(
    backbone: Backbone, tasks: list[Task], split_at: int, mixer_after: dict[int, Mixer],
    make_reader: Callable[[list[tuple[int, ...]]], nn.Module],
) -> MultiTaskNet:
    """:func:`towers_with_mixers` plus a last body block that reads the features after every
    mixed stage and after the last stage (NDDR shortcut, sluice beta mixing).

    Those stage outputs are marked to be kept (see :meth:`MultiTaskNet.features`);
    ``make_reader(shapes)`` builds the reader from their shapes, in stage order. The reader
    takes ``(xs, kept)`` (``takes_kept = True``) and has an ``out_shape``, which the heads get.
    """
    shared, body, towers = _tower_body(backbone, tasks, split_at, mixer_after)
    kept = _keep_stage_outputs(body, sorted(set(mixer_after) | {backbone.num_stages}), split_at)
    if not kept:
        raise ConfigError(f"model.architecture.split_at: {split_at} leaves no tower stage to read; "
                          f"use 0..{backbone.num_stages - 1}")
    reader = make_reader([backbone.shapes[stage - 1] for stage in kept])
    body.append(reader)
    return _finish(MultiTaskNet(tasks, shared, body, reader.out_shape), towers, split_at)


def _tower_body(
    backbone: Backbone, tasks: list[Task], split_at: int, mixer_after: dict[int, Mixer]
) -> tuple[list[nn.Module], list[nn.Module], list[list[nn.Module]]]:
    shared = backbone.build()[:split_at]
    towers = [backbone.build() for _ in tasks]
    body: list[nn.Module] = []
    for i in range(split_at, backbone.num_stages):
        body.append(TaskParallel([tower[i] for tower in towers]))
        if i + 1 in mixer_after:
            mixer_after[i + 1].label = f"after stage {i + 1}"
            body.append(mixer_after[i + 1])
    return shared, body, towers


def _keep_stage_outputs(body: list[nn.Module], stages: list[int], first: int) -> list[int]:
    """Mark the body blocks whose outputs are the features after (1-based) ``stages``: the mixer
    after the stage when there is one, else the stage itself. Returns the stages, sorted."""
    stage = first
    marked = []
    for i, block in enumerate(body):
        if isinstance(block, TaskParallel):
            stage += 1
            nxt = body[i + 1] if i + 1 < len(body) else None
            if stage in stages:
                target = nxt if isinstance(nxt, Mixer) else block
                target.keep_output = True
                marked.append(stage)
    return marked


def _finish(model: MultiTaskNet, towers: list[list[nn.Module]], split_at: int) -> MultiTaskNet:
    """Record each task's tower stages (see :meth:`MultiTaskNet.tower_stages`)."""
    model.set_tower_stages([tower[split_at:] for tower in towers])
    return model


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
class MixedTowersOptions(ArchOptions):
    """Where the mixers of a tower architecture go (cross-stitch, NDDR, sluice)."""

    split_at: int = 0
    """Stages shared below the towers (0: towers from the input, as in the papers)."""
    after: list[int] | None = None
    """1-based stages after which a mixer is placed; ``null``: after every tower stage."""

    def placement(self, backbone: Backbone) -> tuple[int, list[int]]:
        """``(split_at, stages that get a mixer)``, both checked against the backbone."""
        split_at = _check_stage(self.split_at, backbone, "split_at")
        stages = self.after if self.after is not None else range(split_at + 1, backbone.num_stages + 1)
        for stage in stages:
            _check_stage(stage, backbone, "after", low=split_at + 1)
        return split_at, sorted(set(stages))


@dataclasses.dataclass
class CrossStitchOptions(MixedTowersOptions):
    """Cross-stitch units between task towers (Misra et al., CVPR 2016)."""

    name: str = "cross_stitch"
    granularity: Literal["channel", "layer"] = "channel"
    alpha_same: float = 0.9
    alpha_diff: float | None = None
    """Initial cross-task weight; ``null``: (1 - alpha_same) / (K - 1), rows sum to one."""


@ARCHITECTURES.register("cross_stitch", CrossStitchOptions)
def build_cross_stitch(options: CrossStitchOptions, backbone: Backbone, tasks: list[Task]) -> MultiTaskNet:
    """Task towers exchanging features through cross-stitch units."""
    split_at, stages = options.placement(backbone)
    mixers = {
        stage: CrossStitch(len(tasks), backbone.shapes[stage - 1][0], options.granularity,
                           options.alpha_same, options.alpha_diff)
        for stage in stages
    }
    return towers_with_mixers(backbone, tasks, split_at, mixers)


# --------------------------------------------------------------------------- NDDR, sluice, X-ResNet


@dataclasses.dataclass
class NDDROptions(MixedTowersOptions):
    """NDDR layers between task towers (Gao et al., CVPR 2019). The paper also puts weight decay
    on the 1x1 weights: set ``train.groups.fusion.weight_decay`` (the nddr configs do)."""

    name: str = "nddr"
    init: Literal["diagonal", "xavier"] = "diagonal"
    alpha: float = 0.9
    """Diagonal init: weight of the task's own features."""
    beta: float | None = None
    """Diagonal init: weight of each other task's features; ``null``: (1 - alpha) / (K - 1)."""
    batch_norm: bool = True
    activation: bool = True
    """ReLU after the BN (the paper's layer); off only for analysis."""


def _nddr_mixers(options: NDDROptions, backbone: Backbone, tasks: list[Task]) -> tuple[int, dict[int, Mixer]]:
    split_at, stages = options.placement(backbone)
    return split_at, {
        stage: NDDR(len(tasks), backbone.shapes[stage - 1][0], options.init, options.alpha, options.beta,
                    options.batch_norm, options.activation)
        for stage in stages
    }


@ARCHITECTURES.register("nddr", NDDROptions)
def build_nddr(options: NDDROptions, backbone: Backbone, tasks: list[Task]) -> MultiTaskNet:
    """Task towers fused by NDDR layers (1x1 conv over the concatenated tasks + BN + ReLU)."""
    split_at, mixers = _nddr_mixers(options, backbone, tasks)
    return towers_with_mixers(backbone, tasks, split_at, mixers)


@dataclasses.dataclass
class NDDRShortcutOptions(NDDROptions):
    """NDDR-CNN-Shortcut: NDDR layers plus, per task, a shortcut from every NDDR output to the
    head (resized to the last stage's size, concatenated, one 1x1 conv + BN + ReLU per task)."""

    name: str = "nddr_shortcut"
    width: int | None = None
    """Channels of the per-task reduction before the head; ``null``: the last stage's channels."""


@ARCHITECTURES.register("nddr_shortcut", NDDRShortcutOptions)
def build_nddr_shortcut(options: NDDRShortcutOptions, backbone: Backbone, tasks: list[Task]) -> MultiTaskNet:
    """NDDR layers with shortcuts from every NDDR output to a per-task 1x1 reduction before the head."""
    split_at, mixers = _nddr_mixers(options, backbone, tasks)

    def shortcut(shapes: list[tuple[int, ...]]) -> NDDRShortcut:
        if len(shapes[-1]) == 3 and any(len(s) == 1 for s in shapes):
            raise ConfigError("model.architecture.after: the shortcut cannot resize flat (fully connected) "
                              "features to the last stage's feature map; place NDDR layers after conv stages only")
        width = options.width if options.width is not None else shapes[-1][0]
        if width < 1:
            raise ConfigError(f"model.architecture.width: must be positive, got {width}")
        return NDDRShortcut(len(tasks), shapes, width)

    return towers_with_stage_reader(backbone, tasks, split_at, mixers, shortcut)


@dataclasses.dataclass
class SluiceOptions(MixedTowersOptions):
    """Sluice networks (Ruder et al., AAAI 2019) on task towers."""

    name: str = "sluice"
    subspaces: int = 2
    """S, subspaces per task (must divide every mixed stage's channels; NDDR's comparison used 2)."""
    alpha_same: float = 0.9
    alpha_diff: float | None = None
    """Initial cross-task weight; ``null``: (1 - alpha_same) / (K - 1)."""
    beta: bool = False
    """Beta layer mixing: each head reads the beta-weighted, pooled outputs of every sluice
    layer (and the last stage), concatenated."""
    orthogonality: float = 0.0
    """Weight of the subspace orthogonality penalty (0: off)."""


@ARCHITECTURES.register("sluice", SluiceOptions)
def build_sluice(options: SluiceOptions, backbone: Backbone, tasks: list[Task]) -> MultiTaskNet:
    """Task towers mixed per subspace by sluice units, optional beta layer mixing and orthogonality penalty."""
    split_at, stages = options.placement(backbone)
    if options.subspaces < 1:
        raise ConfigError(f"model.architecture.subspaces: must be at least 1, got {options.subspaces}")
    if options.orthogonality < 0:
        raise ConfigError(f"model.architecture.orthogonality: must be >= 0, got {options.orthogonality}")
    mixers = {}
    for stage in stages:
        channels = backbone.shapes[stage - 1][0]
        if channels % options.subspaces:
            raise ConfigError(f"model.architecture.subspaces: {options.subspaces} does not divide the "
                              f"{channels} channels after stage {stage}")
        mixers[stage] = Sluice(len(tasks), channels, options.subspaces, options.alpha_same, options.alpha_diff,
                               options.orthogonality)
    if not options.beta:
        return towers_with_mixers(backbone, tasks, split_at, mixers)
    return towers_with_stage_reader(backbone, tasks, split_at, mixers, lambda shapes: BetaMix(len(tasks), shapes))


@dataclasses.dataclass
class XResNetOptions(ArchOptions):
    """Cross-residual networks, X-ResNet (Jou & Chang, ACM MM 2016)."""

    name: str = "xresnet"
    split_at: int | None = None
    """Stages shared below the branch point; ``null``: all but the last (the paper)."""
    cross: Literal["zero", "identity", "scale", "conv1x1"] = "scale"
    """Cross terms: zero (X0), identity (XI), scale (Xs, the paper's method), conv1x1."""
    cross_blocks: int | None = None
    """How many of the last residual blocks of the branches are cross-residual; ``null``: all
    but the first (the paper: the last two of conv5_x's three)."""
    bn_after_add: bool = True
    """Move each branch block's last BN after the addition (one per task), as the paper does."""


@ARCHITECTURES.register("xresnet", XResNetOptions)
def build_xresnet(options: XResNetOptions, backbone: Backbone, tasks: list[Task]) -> MultiTaskNet:
    """Shared trunk, per-task residual branches whose shortcuts mix the tasks (cross-residual)."""
    split_at = _xresnet_split(options, backbone)
    shared = backbone.build()[:split_at]
    towers = [backbone.build() for _ in tasks]
    cross_at = _cross_residual_positions(options, backbone, towers[0], split_at)
    body: list[nn.Module] = []
    for i in range(split_at, backbone.num_stages):
        body += _xresnet_stage(i, [tower[i] for tower in towers], cross_at, options)
    return _finish(MultiTaskNet(tasks, shared, body, backbone.shapes[-1]), towers, split_at)


def _xresnet_split(options: XResNetOptions, backbone: Backbone) -> int:
    """The branch point, checked: at least one stage must remain to branch."""
    if options.cross not in CROSS_KINDS:
        raise ConfigError(f"model.architecture.cross: {options.cross!r} is not one of {', '.join(CROSS_KINDS)}")
    split_at = options.split_at if options.split_at is not None else backbone.num_stages - 1
    _check_stage(split_at, backbone, "split_at")
    if split_at == backbone.num_stages:
        raise ConfigError(f"model.architecture.split_at: {split_at} leaves no stage to branch; "
                          f"use 0..{backbone.num_stages - 1}")
    return split_at


def _stage_children(stage: nn.Module) -> list[nn.Module]:
    """A stage's parts: the stage itself when it is one residual block, else its children."""
    return [stage] if is_residual_block(stage) else list(stage.children())


def _cross_residual_positions(options: XResNetOptions, backbone: Backbone, tower: list[nn.Module],
                              split_at: int) -> set[tuple[int, int]]:
    """``(stage index, child index)`` of the branch's residual blocks that get cross terms: the
    last ``cross_blocks`` of them."""
    positions = [(i, j) for i in range(split_at, backbone.num_stages)
                 for j, child in enumerate(_stage_children(tower[i])) if is_residual_block(child)]
    if not positions:
        raise ConfigError(
            f"model.architecture: xresnet needs residual blocks in the branch (stages {split_at + 1}.."
            f"{backbone.num_stages}) and backbone {backbone.options.name!r} has none there; use resnet_small, "
            f"resnet18/34/50/101, or a smaller model.architecture.split_at"
        )
    count = options.cross_blocks if options.cross_blocks is not None else len(positions) - 1
    if not 0 <= count <= len(positions):
        raise ConfigError(f"model.architecture.cross_blocks: {count} is out of range; the branch has "
                          f"{len(positions)} residual blocks")
    return set(positions[len(positions) - count:]) if count else set()


def _xresnet_stage(i: int, stages: list[nn.Module], cross_at: set[tuple[int, int]],
                   options: XResNetOptions) -> list[nn.Module]:
    """Body blocks for stage ``i`` of the K branches: each residual block becomes a
    :class:`~taskloom.blocks.CrossResidual` (with a cross shortcut where ``(i, j)`` is in
    ``cross_at``); runs of other layers between them become :class:`TaskParallel` blocks."""
    children = [_stage_children(stage) for stage in stages]
    blocks: list[nn.Module] = []
    pending: list[int] = []  # indices of the non-residual layers since the last residual block

    def flush() -> None:
        if pending:
            blocks.append(TaskParallel([nn.Sequential(*[parts[j] for j in pending]) for parts in children]))
            pending.clear()

    for j, child in enumerate(children[0]):
        if not is_residual_block(child):
            pending.append(j)
            continue
        flush()
        block = CrossResidual([parts[j] for parts in children], None, options.bn_after_add)
        if (i, j) in cross_at:
            block.shortcut = CrossShortcut(len(stages), block.channels, options.cross)
            block.shortcut.label = f"stage {i + 1}, block {j + 1}"
        blocks.append(block)
    flush()
    return blocks


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
