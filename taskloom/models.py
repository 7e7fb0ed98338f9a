"""The multi-task network container: a shared trunk, a body of K-feature blocks, one head per task.

Every architecture is the same picture (REFERENCE §0)::

    input -> trunk (stages 1..k, shared) -> body (blocks mapping K features to K features) -> heads

The body is a list of blocks, each ``list of K tensors -> list of K tensors``:
:class:`TaskParallel` applies tower t's stage to feature t; a :class:`~taskloom.mixers.Mixer`
exchanges features between towers. The architectures that assemble these containers are in
:mod:`taskloom.architectures`; blocks reading several stages (NDDR shortcut, beta mixing,
cross-residual blocks) in :mod:`taskloom.blocks`.

:class:`MultiTaskModel` is the contract between a network and the loss side (the trainer, the
loss weightings, the tower-weight regulariser); :class:`MultiTaskNet` and :class:`Ensemble`
implement it.
"""
from __future__ import annotations

import contextlib
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from taskloom.mixers import Mixer
from taskloom.packed import packable, packed_forward
from taskloom.tasks import Task


@runtime_checkable
class MultiTaskModel(Protocol):
    """What the trainer and the loss side need from a multi-task network.

    :class:`MultiTaskNet` and :class:`Ensemble` implement it; so must any other network given to
    :func:`~taskloom.train.fit` (structurally: no base class is needed). Called as
    ``model(x) -> {task name: output}``.
    """

    tasks: list[Task]
    """The K tasks, in tower order."""

    @property
    def task_names(self) -> list[str]:
        """Names of the K tasks, in tower order."""

    def loss_terms(self, outputs: dict[str, Tensor], targets: dict[str, Tensor]) -> dict[str, Tensor]:
        """Unweighted loss of every task."""

    def penalty(self) -> dict[str, Tensor]:
        """Named extra loss terms (added with weight 1): the ``penalty()`` of every submodule that
        defines one. A regulariser registered as a submodule is therefore included."""

    def last_shared_layer(self) -> list[nn.Parameter]:
        """The parameters GradNorm measures per-task gradient norms on ("the last shared layer")."""

    def tower_stages(self, t: int) -> list[nn.Module]:
        """The backbone stages task t's prediction goes through, stages shared by every task first
        (the same module objects for every t). Empty when a task has no single chain of stages."""

    def task_modules(self, t: int) -> list[nn.Module]:
        """Modules used by task t only (its tower stages above the trunk, its part of other
        blocks, its head)."""


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
    * ``mode = "packed"``: the K towers as one network on channel-stacked features
      (:mod:`taskloom.packed`, REFERENCE §11): one grouped convolution, one BatchNorm over K*C
      channels, one batched matmul per layer. For towers that are chains of such layers (also
      with BatchNorm, unlike vmap); otherwise the loop.
    * ``checkpoint = True``: in training, each looped tower's stage (or a packed stage as a
      whole) is run under ``torch.utils.checkpoint`` (activations recomputed in backward: less
      memory, one more forward of the towers; BatchNorm running statistics are updated once, not
      again by the recomputation). Vmapped stages are not checkpointed.
    """

    def __init__(self, modules: list[nn.Module]):
        super().__init__()
        self.towers = nn.ModuleList(modules)
        self.mode = "loop"
        self.checkpoint = False
        self._vmap_ok: bool | None = None  # vmap_supported(), cached on first use
        self._packed_ok: bool | None = None  # packed_supported(), likewise

    def vmap_supported(self) -> bool:
        """Whether the towers can run as one vmapped call: same structure, no buffers."""
        if self._vmap_ok is None:
            self._vmap_ok = self._check_vmap()
        return self._vmap_ok

    def packed_supported(self) -> bool:
        """Whether the towers can run packed (:func:`taskloom.packed.packable`)."""
        if self._packed_ok is None:
            self._packed_ok = packable(list(self.towers))
        return self._packed_ok

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
        packed = self.mode == "packed" and self.packed_supported()
        if self.checkpoint and self.training and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            if packed:
                towers = list(self.towers)
                return list(checkpoint(lambda *x: tuple(packed_forward(towers, list(x))), *xs, use_reentrant=False,
                                       context_fn=_keep_running_stats(towers)))
            return [checkpoint(m, x, use_reentrant=False, context_fn=_keep_running_stats([m]))
                    for m, x in zip(self.towers, xs)]
        if packed:
            return packed_forward(list(self.towers), xs)
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


def _keep_running_stats(modules: list[nn.Module]):
    """``context_fn`` for ``torch.utils.checkpoint``: the recomputation in backward runs the
    forward again, which would update the modules' buffers a second time (BatchNorm's running
    statistics, counting the batch twice); they are restored after it. (The outputs do not depend
    on them: in training BatchNorm normalises with the batch's statistics.)"""
    buffers = [b for m in modules for b in m.buffers()]

    @contextlib.contextmanager
    def restored():
        saved = [b.clone() for b in buffers]
        try:
            yield
        finally:
            with torch.no_grad():
                for b, old in zip(buffers, saved):
                    b.copy_(old)

    return lambda: (contextlib.nullcontext(), restored())


def configure_towers(model: nn.Module, batched: str = "off", checkpoint: bool = False) -> dict[str, int]:
    """Set how every :class:`TaskParallel` in ``model`` runs its K towers.

    ``batched``: ``off`` (loop), ``on`` (vmap wherever supported, loop elsewhere), ``auto``
    (supported conv-only stages with K >= 3 get ``mode = "auto"``: vmap on a GPU, the loop on
    CPU, where ``benchmarks/step_time.py`` measured vmap no faster overall: about 1.1x faster
    on TCDCN's conv stages, slower on LeNet, and slowest on fully connected stages) or ``packed``
    (:mod:`taskloom.packed` wherever supported, BatchNorm towers included). ``checkpoint``:
    activation checkpointing of the looped and packed tower stages. Returns how many stages got
    each mode.
    """
    if batched not in ("off", "on", "auto", "packed"):
        raise ValueError(f"batched must be off, on, auto or packed, got {batched!r}")
    counts = {"loop": 0, "vmap": 0, "auto": 0, "packed": 0}
    for module in model.modules():
        if isinstance(module, TaskParallel):
            module._vmap_ok = module._packed_ok = None  # re-check: the towers may have been changed since
            if batched == "packed":
                module.mode = "packed" if module.packed_supported() else "loop"
            else:
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


def collect_penalties(module: nn.Module) -> dict[str, Tensor]:
    """The ``penalty()`` terms of ``module``'s submodules, terms of the same name summed.

    A submodule that defines ``penalty()`` answers for its own submodules; the others are
    searched recursively. This is how a network's penalty includes its mixers' (sluice
    orthogonality) and a registered regulariser's terms without knowing about either.
    """
    terms: dict[str, Tensor] = {}

    def visit(parent: nn.Module) -> None:
        for child in parent.children():
            if callable(getattr(child, "penalty", None)):
                for name, value in child.penalty().items():
                    terms[name] = terms[name] + value if name in terms else value
            else:
                visit(child)

    visit(module)
    return terms


def _trainable_own_parameters(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters(recurse=False) if p.requires_grad]


def last_layer(module: nn.Module) -> list[nn.Parameter]:
    """Parameters of the last conv/linear layer (a >= 2-d weight) in ``module``, else of its last
    parameterised module (normalisation layers only count when there is nothing else)."""
    layers = [_trainable_own_parameters(m) for m in module.modules() if _trainable_own_parameters(m)]
    kernels = [ps for ps in layers if any(p.dim() >= 2 for p in ps)]
    return (kernels or layers or [[]])[-1]


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
        submodule that defines one (sluice orthogonality, a tower-weight regulariser registered
        as ``regularizer``, ...), terms of the same name summed (:func:`collect_penalties`)."""
        return collect_penalties(self)

    def set_tower_stages(self, stages: list[list[nn.Module]]) -> None:
        """Record each task's backbone stages above the trunk (the builders call this; see
        :meth:`tower_stages`)."""
        if len(stages) != len(self.tasks):
            raise ValueError(f"{len(self.tasks)} tasks, {len(stages)} lists of tower stages")
        self._tower_stages = [list(s) for s in stages]

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

    def last_shared_layer(self) -> list[nn.Parameter]:
        """The parameters GradNorm measures gradient norms on (docs/weighting.md):

        * a non-empty shared trunk: its last conv/linear layer (the paper's choice);
        * no trunk (towers from the input): the last conv/linear layer of every task's first
          tower stage, all towers together (with mixers every task's loss reaches all of them);
        * tower stages not recorded (a network assembled by hand): the towers of the first
          :class:`TaskParallel` block; failing everything, the first parameterised module.
        """
        if last_layer(self.trunk):
            return last_layer(self.trunk)
        firsts = [stages[0] for stages in map(self.tower_stages, range(len(self.tasks))) if stages]
        if any(last_layer(m) for m in firsts):
            return [p for m in firsts for p in last_layer(m)]
        for block in self.body:
            if isinstance(block, TaskParallel) and any(last_layer(t) for t in block.towers):
                return [p for t in block.towers for p in last_layer(t)]
        return next((_trainable_own_parameters(m) for m in self.modules() if _trainable_own_parameters(m)), [])

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

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

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

    def penalty(self) -> dict[str, Tensor]:
        """The members' penalty terms (and those of any other submodule), summed by name."""
        return collect_penalties(self)

    def last_shared_layer(self) -> list[nn.Parameter]:
        """The union of the members' last shared layers (members share nothing with each other)."""
        return [p for member in self.members for p in member.last_shared_layer()]

    def tower_stages(self, t: int) -> list[nn.Module]:
        """Empty: each member has its own tower for task t, so there is no single chain of
        stages (a tower-weight regulariser finds nothing to pull together and says so)."""
        return []

    def task_modules(self, t: int) -> list[nn.Module]:
        """Task t's modules in every member."""
        return [m for member in self.members for m in member.task_modules(t)]


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

