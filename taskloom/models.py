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
from taskloom.mixers import NDDR, CrossStitch, Mixer, Sluice
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
    """Applies module t to feature t: ``[m_1(x_1), ..., m_K(x_K)]``.

    Execution (parameters and ``state_dict`` keys are the same in every mode; see
    :func:`configure_towers`):

    * ``mode = "loop"`` (default): a Python loop over the K towers;
    * ``mode = "vmap"``: the towers' parameters are stacked (differentiably, every call) and one
      ``torch.vmap(functional_call)`` runs all K towers as a batched computation (convolutions
      become one grouped / widened convolution, linear layers one batched matmul). Only for towers
      of identical structure without buffers (no BatchNorm); otherwise it falls back to the loop.
    * ``mode = "auto"``: ``vmap`` when the features are on a GPU, the loop on CPU (where the
      batched form measured no faster: benchmarks/README.md).
    * ``checkpoint = True``: each tower's stage is run under ``torch.utils.checkpoint`` in training
      (activations recomputed in backward: less memory, one more forward of the towers).
    """

    def __init__(self, modules: list[nn.Module]):
        super().__init__()
        self.towers = nn.ModuleList(modules)
        self.mode = "loop"
        self.checkpoint = False
        self._vmap_ok: bool | None = None  # vmap_supported(), cached on first use

    def vmap_supported(self) -> bool:
        """Whether the towers can run as one vmapped call: same structure, no buffers."""
        if self._vmap_ok is None:
            self._vmap_ok = self._check_vmap()
        return self._vmap_ok

    def _check_vmap(self) -> bool:
        towers = list(self.towers)
        if len(towers) < 2 or any(True for m in towers for _ in m.buffers()):
            return False
        ref = [(n, p.shape, p.dtype) for n, p in towers[0].named_parameters()]
        same = all([(n, p.shape, p.dtype) for n, p in m.named_parameters()] == ref for m in towers[1:])
        return same and all(type(a) is type(b) for m in towers[1:] for a, b in zip(towers[0].modules(), m.modules()))

    def forward(self, xs: list[Tensor]) -> list[Tensor]:
        if len(xs) != len(self.towers):
            raise ValueError(f"TaskParallel: {len(self.towers)} towers, {len(xs)} features")
        if (self.mode == "vmap" or (self.mode == "auto" and xs[0].is_cuda)) and self.vmap_supported():
            return self._forward_vmap(xs)
        if self.checkpoint and self.training and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            return [checkpoint(m, x, use_reentrant=False) for m, x in zip(self.towers, xs)]
        return [m(x) for m, x in zip(self.towers, xs)]

    def _forward_vmap(self, xs: list[Tensor]) -> list[Tensor]:
        names = [n for n, _ in self.towers[0].named_parameters()]
        per_tower = [dict(m.named_parameters()) for m in self.towers]
        params = {n: torch.stack([p[n] for p in per_tower]) for n in names}
        template = self.towers[0]

        def one(p: dict[str, Tensor], x: Tensor) -> Tensor:
            return torch.func.functional_call(template, p, (x,))

        if all(x is xs[0] for x in xs):  # the same input for every tower (first stage above the trunk)
            out = torch.vmap(one, in_dims=(0, None))(params, xs[0])
        else:
            out = torch.vmap(one)(params, torch.stack(xs))
        return list(out.unbind(0))


def configure_towers(model: nn.Module, batched: str = "off", checkpoint: bool = False) -> dict[str, int]:
    """Set how every :class:`TaskParallel` in ``model`` runs its K towers.

    ``batched``: ``off`` (loop), ``on`` (vmap wherever supported, loop elsewhere) or ``auto``
    (supported conv-only stages with K >= 3 get ``mode = "auto"``: vmap on a GPU, the loop on
    CPU, where ``benchmarks/step_time.py`` measured vmap no faster overall: about 1.1x faster
    on TCDCN's conv stages, slower on LeNet, and slowest on fully connected stages). ``checkpoint``:
    activation checkpointing of the looped tower stages. Returns how many stages got each mode.
    """
    if batched not in ("off", "on", "auto"):
        raise ValueError(f"batched must be off, on or auto, got {batched!r}")
    counts = {"loop": 0, "vmap": 0, "auto": 0}
    for module in model.modules():
        if isinstance(module, TaskParallel):
            module._vmap_ok = None  # re-check: the towers may have been changed since
            mode = {"off": "loop", "on": "vmap", "auto": "auto" if _auto_vmap(module) else "loop"}[batched]
            module.mode = mode if module.vmap_supported() else "loop"
            module.checkpoint = bool(checkpoint)
            counts[module.mode] += 1
    return counts


def _auto_vmap(module: TaskParallel) -> bool:
    return len(module.towers) >= 3 and not any(isinstance(m, nn.Linear) for m in module.towers[0].modules())


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
        self._tower_stages: list[list[nn.Module]] = [[] for _ in tasks]

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def features(self, x: Tensor) -> list[Tensor]:
        """The K task features that feed the heads.

        Body blocks with ``keep_output = True`` have their outputs kept; a block with
        ``takes_kept = True`` (sluice beta mixing, the NDDR shortcut) is called as
        ``block(xs, kept)`` with the kept outputs of the blocks before it, in order.
        """
        shared = self.trunk(x)
        xs = [shared] * len(self.tasks)
        kept: list[list[Tensor]] = []
        for block in self.body:
            xs = block(xs, kept) if getattr(block, "takes_kept", False) else block(xs)
            if getattr(block, "keep_output", False):
                kept.append(xs)
        return xs

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {name: self.heads[name](f) for name, f in zip(self.task_names, self.features(x), strict=True)}

    def loss_terms(self, outputs: dict[str, Tensor], targets: dict[str, Tensor]) -> dict[str, Tensor]:
        """Unweighted loss of every task."""
        return {t.name: t.loss(outputs[t.name], targets[t.name]) for t in self.tasks}

    def penalty(self) -> dict[str, Tensor]:
        """Named extra loss terms, added to the weighted task losses: the ``penalty()`` of every
        submodule that defines one (sluice orthogonality, tower-weight regularisers, ...),
        terms of the same name summed. A module's own submodules are left to it."""
        terms: dict[str, Tensor] = {}

        def visit(module: nn.Module) -> None:
            for child in module.children():
                if callable(getattr(child, "penalty", None)):
                    for name, value in child.penalty().items():
                        terms[name] = terms[name] + value if name in terms else value
                else:
                    visit(child)

        visit(self)
        return terms

    def tower_stages(self, t: int) -> list[nn.Module]:
        """The backbone stages task t's prediction goes through (shared trunk stages first).

        Kept by the builders (the same module objects the body uses), so a single-task
        network's stages can be copied into a tower whatever the body looks like.
        """
        return list(self.trunk) + list(self._tower_stages[t])

    def task_modules(self, t: int) -> list[nn.Module]:
        """Modules used by task t only: its tower stages above the trunk, per-task parts of
        other body blocks (those defining ``task_modules(t)``), and its head."""
        modules = list(self._tower_stages[t])
        for block in self.body:
            if callable(getattr(block, "task_modules", None)):
                modules += block.task_modules(t)
        return modules + [self.heads[self.tasks[t].name]]

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
        if not self.training:  # eval mode: one combined prediction per task
            return {t.name: t.loss(outputs[t.name], targets[t.name]) for t in self.tasks}
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
    shared, body, towers = _tower_body(backbone, tasks, split_at, mixer_after)
    return _finish(MultiTaskNet(tasks, shared, body, backbone.shapes[-1]), towers, split_at)


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


def _finish(model: MultiTaskNet, towers: list[list[nn.Module]], split_at: int) -> MultiTaskNet:
    """Record each task's tower stages (see :meth:`MultiTaskNet.tower_stages`)."""
    model._tower_stages = [tower[split_at:] for tower in towers]
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


# --------------------------------------------------------------------------- blocks that read several stages


def _resize_to(x: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Resize feature ``x`` to the spatial size of ``shape`` (without batch).

    To a flat target: global average pool. Smaller maps: adaptive average pooling (no
    aliasing); larger ones: bilinear interpolation."""
    if len(shape) == 1:
        return x if x.ndim == 2 else x.mean((2, 3))
    if x.ndim != 4:
        raise ValueError(f"cannot resize flat features {tuple(x.shape)} to a feature map {shape}")
    size = tuple(shape[1:])
    if tuple(x.shape[2:]) == size:
        return x
    if x.shape[2] >= size[0] and x.shape[3] >= size[1]:
        return nn.functional.adaptive_avg_pool2d(x, size)
    return nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False)


class NDDRShortcut(nn.Module):
    """NDDR-CNN-Shortcut (Gao et al. 2019, Fig. 2): for every task, its kept NDDR outputs are
    resized to the last one's spatial size, concatenated along channels and reduced by that
    task's own 1x1 conv (no bias) + BN + ReLU to ``width`` channels. One conv per task (a public
    port shares a single conv between the tasks; this does not)."""

    takes_kept = True

    def __init__(self, num_tasks: int, shapes: list[tuple[int, ...]], width: int):
        super().__init__()
        self.shapes = [tuple(s) for s in shapes]
        self.target = self.shapes[-1]
        channels = sum(s[0] for s in self.shapes)
        self.reduce = nn.ModuleList(
            nn.Sequential(nn.Conv2d(channels, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
            for _ in range(num_tasks)
        )
        self.out_shape = (width, *self.target[1:])

    def forward(self, xs: list[Tensor], kept: list[list[Tensor]]) -> list[Tensor]:
        if len(kept) != len(self.shapes):
            raise RuntimeError(f"NDDRShortcut expects {len(self.shapes)} kept outputs, got {len(kept)}")
        ys = []
        for t, reduce in enumerate(self.reduce):
            cat = torch.cat([_resize_to(layer[t], self.target) for layer in kept], 1)
            flat = cat.ndim == 2
            y = reduce(cat[:, :, None, None] if flat else cat)
            ys.append(y[:, :, 0, 0] if flat else y)
        return ys

    def task_modules(self, t: int) -> list[nn.Module]:
        return [self.reduce[t]]


class BetaMix(nn.Module):
    """Sluice beta units adapted to CNNs: task t's head reads
    ``concat_l(beta[t, l] * pool(h_t^l))`` over the kept layers l (maps globally average pooled;
    the sluice paper's layers have one width, so it mixes by a weighted sum; with CNN stages of
    different widths the weighted features are concatenated). ``beta`` starts at 1 (plain
    concatenation). Parameters of kind ``fusion``."""

    takes_kept = True
    param_kind = "fusion"

    def __init__(self, num_tasks: int, shapes: list[tuple[int, ...]]):
        super().__init__()
        self.beta = nn.Parameter(torch.ones(num_tasks, len(shapes)))
        self.out_shape = (sum(s[0] for s in shapes),)

    def forward(self, xs: list[Tensor], kept: list[list[Tensor]]) -> list[Tensor]:
        return [
            torch.cat([self.beta[t, l] * _resize_to(layer[t], (0,)) for l, layer in enumerate(kept)], 1)
            for t in range(len(xs))
        ]


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


# --------------------------------------------------------------------------- cross-residual blocks


def _basic_branch(block: nn.Module, x: Tensor) -> Tensor:
    return block.conv2(block.relu(block.bn1(block.conv1(x))))


def _bottleneck_branch(block: nn.Module, x: Tensor) -> Tensor:
    out = block.relu(block.bn1(block.conv1(x)))
    out = block.relu(block.bn2(block.conv2(out)))
    return block.conv3(out)


RESIDUAL_BLOCKS: dict[type, tuple[Any, str]] = {}
"""Residual block types a cross-residual block can take apart: ``type -> (branch, last_bn)``,
where ``branch(block, x)`` computes the residual branch F without its last BatchNorm, named
``last_bn``. The block must have ``downsample`` (a module or None) and ``relu`` attributes and
compute ``relu(last_bn(branch(x)) + (downsample or identity)(x))``."""


def register_residual_block(cls: type, branch, last_bn: str) -> None:
    """Teach :class:`CrossResidual` (and the ``xresnet`` architecture) a residual block type."""
    RESIDUAL_BLOCKS[cls] = (branch, last_bn)


def _register_torchvision_blocks() -> None:
    from torchvision.models.resnet import BasicBlock, Bottleneck

    register_residual_block(BasicBlock, _basic_branch, "bn2")
    register_residual_block(Bottleneck, _bottleneck_branch, "bn3")


_register_torchvision_blocks()


def is_residual_block(module: nn.Module) -> bool:
    return type(module) in RESIDUAL_BLOCKS


class CrossResidual(nn.Module):
    """K copies of one residual block (one per task) whose shortcuts are mixed:
    ``y_t = post_t(F_t(x_t) + shortcut([P_1(x_1) .. P_K(x_K)])_t)``, ``P_s`` task s's projection
    (downsample) or the identity, ``shortcut`` a :class:`~taskloom.mixers.CrossShortcut`
    (``A[t][t] = I``; ``None``: no cross terms).

    ``bn_after_add``: the block's last BatchNorm moves from the end of F to after the addition
    (``post_t = ReLU(BN_t(.))``, one per task; X-ResNet does this at the branching point and in
    the cross-residual blocks); otherwise ``post_t = ReLU`` and each block computes exactly what
    it computes alone. The blocks are kept as they are (their own parameters, names, pretrained
    weights); only the order of operations is changed.
    """

    def __init__(self, blocks: list[nn.Module], shortcut: Mixer | None = None, bn_after_add: bool = True):
        super().__init__()
        for b in blocks:
            if not is_residual_block(b):
                raise TypeError(f"{type(b).__name__} is not a registered residual block (register_residual_block)")
        self.blocks = nn.ModuleList(blocks)
        self.shortcut = shortcut
        self.bn_after_add = bn_after_add

    @property
    def channels(self) -> int:
        block = self.blocks[0]
        return getattr(block, RESIDUAL_BLOCKS[type(block)][1]).num_features

    def forward(self, xs: list[Tensor]) -> list[Tensor]:
        branches, shortcuts = [], []
        for block, x in zip(self.blocks, xs, strict=True):
            branch, last_bn = RESIDUAL_BLOCKS[type(block)]
            f = branch(block, x)
            branches.append(f if self.bn_after_add else getattr(block, last_bn)(f))
            shortcuts.append(block.downsample(x) if block.downsample is not None else x)
        mixed = self.shortcut(shortcuts) if self.shortcut is not None else shortcuts
        ys = []
        for block, f, s in zip(self.blocks, branches, mixed):
            y = f + s
            if self.bn_after_add:
                y = getattr(block, RESIDUAL_BLOCKS[type(block)][1])(y)
            ys.append(torch.relu(y))
        return ys

    def extra_repr(self) -> str:
        return f"bn_after_add={self.bn_after_add}"


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
    shared, body, towers = _tower_body(backbone, tasks, split_at, mixers)
    kept = _keep_stage_outputs(body, sorted(set(mixers) | {backbone.num_stages}), split_at)
    shapes = [backbone.shapes[s - 1] for s in kept]
    if len(shapes[-1]) == 3 and any(len(s) == 1 for s in shapes):
        raise ConfigError("model.architecture.after: the shortcut cannot resize flat (fully connected) "
                          "features to the last stage's feature map; place NDDR layers after conv stages only")
    width = options.width if options.width is not None else shapes[-1][0]
    if width < 1:
        raise ConfigError(f"model.architecture.width: must be positive, got {width}")
    shortcut = NDDRShortcut(len(tasks), shapes, width)
    body.append(shortcut)
    return _finish(MultiTaskNet(tasks, shared, body, shortcut.out_shape), towers, split_at)


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
    shared, body, towers = _tower_body(backbone, tasks, split_at, mixers)
    kept = _keep_stage_outputs(body, sorted(set(mixers) | {backbone.num_stages}), split_at)
    mix = BetaMix(len(tasks), [backbone.shapes[s - 1] for s in kept])
    body.append(mix)
    return _finish(MultiTaskNet(tasks, shared, body, mix.out_shape), towers, split_at)


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
    from taskloom.mixers import CROSS_KINDS, CrossShortcut

    if options.cross not in CROSS_KINDS:
        raise ConfigError(f"model.architecture.cross: {options.cross!r} is not one of {', '.join(CROSS_KINDS)}")
    split_at = options.split_at if options.split_at is not None else backbone.num_stages - 1
    _check_stage(split_at, backbone, "split_at")
    if split_at == backbone.num_stages:
        raise ConfigError(f"model.architecture.split_at: {split_at} leaves no stage to branch; "
                          f"use 0..{backbone.num_stages - 1}")
    shared = backbone.build()[:split_at]
    towers = [backbone.build() for _ in tasks]

    def children(stage: nn.Module) -> list[nn.Module]:
        return [stage] if is_residual_block(stage) else list(stage.children())

    positions = [(i, j) for i in range(split_at, backbone.num_stages)
                 for j, child in enumerate(children(towers[0][i])) if is_residual_block(child)]
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
    cross_at = set(positions[len(positions) - count:]) if count else set()
    body: list[nn.Module] = []
    for i in range(split_at, backbone.num_stages):
        pending: list[int] = []

        def flush() -> None:
            if pending:
                body.append(TaskParallel([nn.Sequential(*[children(t[i])[j] for j in pending]) for t in towers]))
                pending.clear()

        for j, child in enumerate(children(towers[0][i])):
            if not is_residual_block(child):
                pending.append(j)
                continue
            flush()
            block = CrossResidual([children(t[i])[j] for t in towers], None, options.bn_after_add)
            if (i, j) in cross_at:
                block.shortcut = CrossShortcut(len(tasks), block.channels, options.cross)
                block.shortcut.label = f"stage {i + 1}, block {j + 1}"
            body.append(block)
        flush()
    return _finish(MultiTaskNet(tasks, shared, body, backbone.shapes[-1]), towers, split_at)


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


# --------------------------------------------------------------------------- towers from single-task checkpoints


def init_towers(model: nn.Module, towers: dict[str, str], tasks: list[Task], input_shape: tuple[int, ...],
                log=lambda *a: None) -> None:
    """Initialise task towers from trained networks (the papers' best practice): for every
    ``task: path`` in ``towers`` (``init.towers``), the checkpoint at ``path`` (any taskloom
    checkpoint with a config, typically a ``single`` run) is rebuilt and its tower of the same
    task (or its only tower) is copied, stage by stage, into this model's tower, with the head
    when it has the same shape. Shared trunk stages take the weights of the first listed task.
    """
    from taskloom import checkpoint, config as cfg
    from taskloom.errors import CheckpointError

    if not towers:
        return
    if not isinstance(model, MultiTaskNet):
        raise ConfigError(f"init.towers: not supported for {type(model).__name__} models")
    names = [t.name for t in tasks]
    for task_name in towers:
        if task_name not in names:
            raise ConfigError(f"init.towers.{task_name}: unknown task; tasks are {', '.join(names)}")
    trunk_done = False
    for task_name, path in towers.items():
        payload = checkpoint.load(path)
        if payload.get("config") is None:
            raise CheckpointError(f"init.towers.{task_name}: {path} was saved without a config")
        source_cfg = cfg.from_dict(payload["config"], source=f"{path} (saved config)")
        saved = payload.get("tasks") or []
        source_tasks = [t for t in tasks if t.name in saved]
        if len(source_tasks) != len(saved):
            raise CheckpointError(f"init.towers.{task_name}: {path} has tasks {saved}, not all of which are "
                                  f"tasks of this run ({', '.join(names)})")
        source = build_model(source_cfg.model.architecture, source_cfg.model.backbone, source_tasks, input_shape)
        if not isinstance(source, MultiTaskNet):
            raise CheckpointError(f"init.towers.{task_name}: {path} is not a tower network")
        try:
            source.load_state_dict(payload["model"])
        except RuntimeError as exc:
            raise CheckpointError(f"init.towers.{task_name}: {path} does not match its own config ({exc})") from None
        s = saved.index(task_name) if task_name in saved else (0 if len(saved) == 1 else None)
        if s is None:
            raise CheckpointError(f"init.towers.{task_name}: {path} has no tower for {task_name!r} (tasks {saved})")
        t = names.index(task_name)
        src_stages, dst_stages = source.tower_stages(s), model.tower_stages(t)
        if len(src_stages) != len(dst_stages):
            raise CheckpointError(f"init.towers.{task_name}: {path} has {len(src_stages)} stages, this model "
                                  f"{len(dst_stages)}")
        start = 0 if not trunk_done else len(model.trunk)
        for i in range(start, len(dst_stages)):
            src_state, dst_state = src_stages[i].state_dict(), dst_stages[i].state_dict()
            problem = next((f"{k}: checkpoint shape {tuple(src_state[k].shape)}, model shape {tuple(v.shape)}"
                            for k, v in dst_state.items() if k in src_state and src_state[k].shape != v.shape), None)
            if problem is None and set(src_state) != set(dst_state):
                problem = f"different layers ({sorted(set(src_state) ^ set(dst_state))[:3]} ...)"
            if problem:
                raise CheckpointError(f"init.towers.{task_name}: stage {i + 1} of {path} does not fit this "
                                      f"model's stage {i + 1}: {problem}")
            dst_stages[i].load_state_dict(src_state)
        trunk_done = True
        head, src_head = model.heads[task_name], source.heads[saved[s]]
        same = [p.shape for p in head.state_dict().values()] == [p.shape for p in src_head.state_dict().values()]
        if same:
            head.load_state_dict(src_head.state_dict())
        log(f"init.towers.{task_name}: stages {start + 1}..{len(dst_stages)}" + (" and head" if same else "")
            + f" from {path}")
