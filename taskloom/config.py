"""Experiment configuration: typed dataclasses, validated from YAML plus ``key=value`` overrides.

Every setting that changes an experiment lives here. A config file is loaded with
``yaml.safe_load``; the resulting mapping is checked against the dataclasses below. Unknown keys,
wrong types and bad values are errors that name the file, line, dotted key, the bad value and
what is allowed (with the closest valid key for typos) -- never silently ignored.

Fields whose type is a registry base class (dataset, backbone, architecture) are *tagged*: the
``name`` key picks the options class of one registry entry, and a bare string is shorthand for
``{name: <string>}`` (``model.architecture: split@2`` -> ``{name: split, at: 2}``).
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from taskloom.errors import ConfigError
from taskloom.registry import Registry

# Importing these modules fills the registries the tagged fields dispatch on.
from taskloom.architectures import ArchOptions, CrossStitchOptions
from taskloom.backbones import BackboneOptions, LeNetOptions
from taskloom.data import DataOptions
from taskloom.data.multimnist import MultiMNISTOptions
from taskloom.weighting import FixedOptions, WeightingOptions
from taskloom.regularizers import RegularizerOptions
from taskloom.yamlio import _line_map, apply_override, read_yaml  # noqa: F401  (re-exported)
from taskloom.heads import DenseHeadOptions
from taskloom import gated_architectures, jd, timm_backbones  # noqa: F401  (register the gated architectures, the 'jd'
# weighting and the 'timm' backbone; timm and torchjd themselves load on use)


@dataclasses.dataclass
class GroupOptions:
    """Optimiser settings of one kind of parameter."""

    lr_mult: float = 1.0
    """Multiplier on ``train.lr`` for this group; kept through every schedule."""
    weight_decay: float | None = None
    """Weight decay of this group; ``null`` uses ``train.weight_decay``."""


@dataclasses.dataclass
class ParamGroups:
    """Per-kind optimiser settings. Every parameter is exactly one of these kinds. Each group has
    its own defaults; setting some of a group's keys (``train.groups.fusion.weight_decay=0.0005``)
    keeps that group's defaults for the others."""

    backbone: GroupOptions = dataclasses.field(default_factory=GroupOptions)
    """Task towers and shared trunk."""
    fusion: GroupOptions = dataclasses.field(
        default_factory=lambda: GroupOptions(lr_mult=100.0, weight_decay=0.0)
    )
    """Mixing units (cross-stitch alphas, ...). Default x100 learning rate, no weight decay:
    decay would pull the alphas toward 0, which nobody asked for."""
    head: GroupOptions = dataclasses.field(default_factory=GroupOptions)
    """Per-task output heads."""
    weighting: GroupOptions = dataclasses.field(default_factory=lambda: GroupOptions(weight_decay=0.0))
    """Learned loss-weighting parameters (for example uncertainty log-variances)."""
    regularizer: GroupOptions = dataclasses.field(default_factory=lambda: GroupOptions(weight_decay=0.0))
    """Learned parameters of a regulariser (for example the affine (a, b) of affine_exp)."""


@dataclasses.dataclass
class ScheduleOptions:
    """Learning-rate schedule, stepped once per epoch. All schedules scale every parameter
    group by the same factor, so per-group multipliers survive."""

    name: Literal["constant", "step", "plateau", "poly", "cosine"] = "cosine"
    step_size: int = 10
    """``step``: epochs between decays."""
    gamma: float = 0.1
    """``step`` and ``plateau``: decay factor."""
    patience: int = 2
    """``plateau``: epochs without validation improvement before decaying."""
    power: float = 0.9
    """``poly``: exponent of (1 - epoch / epochs)."""


@dataclasses.dataclass
class TrainConfig:
    """Optimisation, model selection and run-time settings."""

    epochs: int = 5
    optimizer: Literal["sgd", "adam"] = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    """SGD momentum (ignored by Adam)."""
    weight_decay: float = 5e-4
    schedule: ScheduleOptions = dataclasses.field(default_factory=ScheduleOptions)
    groups: ParamGroups = dataclasses.field(default_factory=ParamGroups)
    loss_weights: dict[str, float] = dataclasses.field(default_factory=dict)
    """Per-task loss weights; tasks not listed weigh 1 (the papers' unweighted sum)."""
    weighting: WeightingOptions = dataclasses.field(default_factory=FixedOptions)
    """How task losses are combined into one update (``fixed``: the weighted sum)."""
    select: str = "mean"
    """Model selection on the validation split: ``mean`` (mean over tasks of each task's
    primary metric, negated where lower is better), ``loss`` (weighted validation loss), or
    ``TASK/METRIC``."""
    grad_clip: float | None = None
    """Clip the global gradient norm to this value (``null``: no clipping)."""
    deterministic: bool = True
    """Use deterministic algorithms (exact resume on CPU)."""
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    precision: Literal[32, "bf16", "16-mixed"] = 32
    """32: float32; ``bf16``: bfloat16 autocast; ``16-mixed``: float16 autocast with loss scaling.
    Parameters (the mixers' included) stay float32 in every mode."""
    progress: bool = True
    """Show a progress bar when writing to a terminal."""
    threads: int | None = None
    """CPU threads for PyTorch (``null``: PyTorch's default, one per core). Set 1 when several
    runs share the cores: oversubscribed threads can make a step several times slower."""
    sync_every: int = 50
    """Steps between the trainer's reads of its running sums (task losses, penalties, weights)
    from the device. Reading waits for the device to finish all queued work, so reading every
    step keeps the host from queueing the next step meanwhile; on a CPU it costs nothing. A
    non-finite loss is reported at the next read, with the step where it occurred. The progress
    bar's losses change at each read. Results do not depend on it."""
    checkpoint_towers: bool = False
    """Activation checkpointing of the task towers' stages: their activations are recomputed in
    the backward pass (less peak memory, about one more forward of the towers per step)."""
    tensorboard: bool = False
    """Also log to TensorBoard (``RUN_DIR/tensorboard``): per-task losses and metrics, learning
    rates per parameter group, histograms of mixing weights. Needs ``pip install tensorboard``."""

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be at least 1, got {self.epochs}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.weight_decay < 0 or not 0 <= self.momentum < 1:
            raise ValueError("weight_decay must be >= 0 and momentum in [0, 1)")
        if self.sync_every < 1:  # (its type is checked where configs are loaded, as every field's)
            raise ValueError(f"sync_every must be a whole number of steps >= 1, got {self.sync_every!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be positive or null, got {self.grad_clip}")


@dataclasses.dataclass
class ModelConfig:
    """Backbone (cut into stages) and how the task towers share it."""

    backbone: BackboneOptions = dataclasses.field(default_factory=LeNetOptions)
    architecture: ArchOptions = dataclasses.field(default_factory=CrossStitchOptions)
    batched_towers: Literal["auto", "on", "off", "packed"] = "off"
    """Run the K towers of a stage as one batched computation (same numbers, same parameters and
    checkpoints): ``off`` (a loop over the towers), ``on`` (``torch.vmap`` over the stacked tower
    parameters wherever supported: towers without BatchNorm), ``auto`` (vmap for conv-only stages
    with K >= 3 on a GPU; the loop on CPU, where vmap measured no faster: benchmarks/README.md),
    ``packed`` (one grouped convolution / BatchNorm / batched matmul per layer over the K towers'
    stacked channels, REFERENCE §11, BatchNorm towers included; stages of other layers, such as
    residual blocks, loop)."""
    regularizer: RegularizerOptions | None = None
    """Tower-weight regulariser between corresponding tower weights (REFERENCE §4);
    ``null``: none. For example ``{kind: affine_exp, weight: 1.0}``."""
    heads: dict[str, DenseHeadOptions] = dataclasses.field(default_factory=dict)
    """Dense head per dense task (``taskloom.heads``): ``{segmentation: {name: aspp, rates: [1, 2, 3]}}``;
    dense tasks not listed get the ``fcn`` head. Only segmentation, normals and depth tasks take one."""


@dataclasses.dataclass
class InitOptions:
    """Weights to start from (applied after the model is built, before training)."""

    towers: dict[str, str] = dataclasses.field(default_factory=dict)
    """``task: checkpoint`` — copy that checkpoint's tower of the task (typically a ``single``
    run) into this model's tower of the task, stage by stage (and the head when it fits):
    ``init.towers.left=runs/single/checkpoints/best.pt``."""


@dataclasses.dataclass
class Config:
    """A whole experiment. The defaults are the embedded MultiMNIST cross-stitch run."""

    seed: int = 0
    data: DataOptions = dataclasses.field(default_factory=MultiMNISTOptions)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    init: InitOptions = dataclasses.field(default_factory=InitOptions)


# --------------------------------------------------------------------------- validation


class _Where:
    """Where a value came from: a dotted key path plus, when known, file and line."""

    def __init__(self, source: str | None, lines: dict[str, int], path: str = ""):
        self.source, self.lines, self.path = source, lines, path

    def child(self, key: str | int) -> _Where:
        path = f"{self.path}.{key}" if self.path else str(key)
        return _Where(self.source, self.lines, path)

    def error(self, message: str) -> ConfigError:
        prefix = ""
        if self.source:
            line = self._line()
            prefix = f"{self.source}" + (f", line {line}" if line else "") + ": "
        key = self.path or "<top level>"
        return ConfigError(f"{prefix}{key}: {message}")

    def _line(self) -> int | None:
        path = self.path
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path.rpartition(".")[0]
        return None


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in typing.get_args(tp))}]"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _convert(tp: Any, value: Any, where: _Where, base: Any = None) -> Any:
    """Check ``value`` against ``tp`` and build it; ``base``: the field's value were it unset."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        allowed = typing.get_args(tp)
        if isinstance(value, bool) and {"on", "off"} <= set(allowed):
            value = "on" if value else "off"  # YAML 1.1 reads an unquoted on/off as true/false
        if value in allowed and type(value) is type(allowed[allowed.index(value)]):
            return value
        close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise where.error(f"{value!r} is not one of {_type_name(tp)}{hint}")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise where.error(f"null is not allowed, expected {_type_name(tp)}")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, where, base)
            except ConfigError as exc:
                errors.append(exc)
        if len(errors) == 1:
            raise errors[0]
        raise where.error(f"{value!r} is not a valid {_type_name(tp)}")
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise where.error(f"expected a list of {_type_name(item)}, got {value!r}")
        return [_convert(item, v, where.child(i)) for i, v in enumerate(value)]
    if origin is dict:
        key_tp, item = typing.get_args(tp)
        if not isinstance(value, dict):
            raise where.error(f"expected a mapping, got {value!r}")
        return {_convert(key_tp, k, where): _convert(item, v, where.child(k)) for k, v in value.items()}
    if _is_tagged(tp):
        return _build_tagged(tp, value, where, base)
    if dataclasses.is_dataclass(tp):
        return _build_dataclass(tp, value, where, base=base if type(base) is tp else None)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise where.error(f"expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise where.error(f"expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise where.error(f"expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise where.error(f"expected a string, got {value!r}")
    raise TypeError(f"unsupported config type {tp!r} at {where.path}")  # a bug, not user input


def _build_dataclass(cls: type, value: Any, where: _Where, skip: tuple[str, ...] = (), base: Any = None) -> Any:
    """Build ``cls`` from a mapping; keys it leaves out keep their value in ``base`` (an instance
    of ``cls``: what the field holds unset, such as the fusion group's x100 default), else the
    class default."""
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise where.error(f"expected a mapping of {cls.__name__} options, got {value!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in value:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise where.child(key).error(
                f"unknown key; {hint}valid keys here: {', '.join(sorted(fields))}"
            )
    kwargs = {}
    for name, field in fields.items():
        if name in value and name not in skip:
            current = getattr(base, name) if base is not None else _default(field)
            kwargs[name] = _convert(hints[name], value[name], where.child(name), current)
        elif base is not None:
            kwargs[name] = getattr(base, name)
    try:
        obj = cls(**kwargs)
    except (ValueError, TypeError) as exc:  # __post_init__ checks across fields
        raise where.error(str(exc)) from None
    return obj


def _is_tagged(tp: Any) -> bool:
    return isinstance(tp, type) and isinstance(getattr(tp, "registry", None), Registry)


def _default(field: dataclasses.Field) -> Any:
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def _build_tagged(base_cls: type, value: Any, where: _Where, base: Any = None) -> Any:
    """The registry entry ``name`` picks (default: ``base``'s), refining ``base`` if it is that entry."""
    registry: Registry = base_cls.registry
    if isinstance(value, str):
        value = registry.expand(value)
    if not isinstance(value, dict):
        raise where.error(f"expected a {registry.kind} name or mapping, got {value!r}")
    if "name" not in value and isinstance(base, base_cls):
        value = {"name": base.name, **value}
    name = value.get("name")
    if name not in registry:
        close = difflib.get_close_matches(str(name), registry.names(), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise where.child("name").error(
            f"unknown {registry.kind} {name!r}{hint}; choose one of {', '.join(registry.names())}"
        )
    options = registry[name].options
    start = base if type(base) is options and base.name == name else None
    return _build_dataclass(options, value, where, skip=("name",), base=start)


def from_dict(value: dict[str, Any], source: str | None = None, lines: dict[str, int] | None = None) -> Config:
    """Validate a plain mapping into a :class:`Config`."""
    return _build_dataclass(Config, value, _Where(source, lines or {}))


def to_dict(config: Any) -> Any:
    """A plain, YAML-safe mapping of a config (the inverse of :func:`from_dict`)."""
    return dataclasses.asdict(config)


# --------------------------------------------------------------------------- files and overrides
# Reading YAML and parsing overrides: taskloom.yamlio (re-exported here).


def load(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Load a config file (or the defaults when ``path`` is None) and apply overrides."""
    data: dict[str, Any] = {}
    lines: dict[str, int] = {}
    source = None
    if path is not None:
        data, lines = read_yaml(path)
        source = str(path)
    for override in overrides:
        apply_override(data, override)
        lines.pop(override.partition("=")[0].strip(), None)
    return from_dict(data, source, lines)


def dump(config: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (loadable by :func:`load`)."""
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False), encoding="utf-8")


def diff(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two plain config mappings."""
    keys = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        path = f"{prefix}.{key}" if prefix else key
        if isinstance(va, dict) and isinstance(vb, dict):
            keys += diff(va, vb, path)
        elif va != vb:
            keys.append(path)
    return keys
