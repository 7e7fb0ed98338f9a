"""Tower-weight regulariser (Bhui, Chadha, Tan; REFERENCE §4): related weights between towers.

``L_w = lambda_w * mean over tower pairs (s < t) of sum over layers j of r(W_j^s, W_j^t)`` with

* ``l2``:          ``r = d(W_s, W_t)``
* ``exp``:         ``r = exp(d(W_s, W_t)) - 1``
* ``affine_exp``:  ``r = exp(d(a_j W_s + b_j, W_t)) - 1``, learnable scalars ``a_j, b_j`` per layer
  and tower pair (init a = 1, b = 0; parameter kind ``regularizer``, own optimiser group)

**Normalisation** (the paper uses the plain squared norm ``||.||^2``, whose exponential
overflows to inf on real layers: a conv layer of 50k weights differing by 0.05 gives
exp(125)): with ``normalise: true`` (default) ``d`` is the *mean* squared difference per
element, ``||.||^2 / n_j``, so it does not grow with layer size; and the exponent is
*linearised* beyond ``max_exponent`` (``exp(m) (1 + d - m)`` for ``d > m``), continuous with a
continuous, still positive gradient, so the penalty is finite for any distance. With
``normalise: false`` d is the paper's sum (the linearisation still applies to the exponentials).
The mean over pairs makes ``lambda_w`` mean the same for any K (K = 2: exactly the paper's sum).

Layers: "corresponding weights" are parameters with the same name in every task's copy of a
tower stage (``model.tower_stages(t)`` of a :class:`~taskloom.models.MultiTaskModel`; shapes
must match, they do: towers are copies of one backbone stage). Only *weights* (conv and linear
kernels: parameters named ``weight`` with at least 2 dimensions) count by default; ``include_bias`` adds each layer's bias to the same term
(and the same a, b). Normalisation scales and heads are never included (heads are per task and
differ in shape). Works with or without mixers (``single``, ``split@k``, ``cross_stitch``).
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Literal

import torch
from torch import Tensor, nn

from taskloom.errors import ConfigError
from taskloom.models import MultiTaskModel


@dataclasses.dataclass
class RegularizerOptions:
    """Tower-weight regulariser (REFERENCE §4): ``model.regularizer: {kind: l2, weight: 1.0}``."""

    kind: Literal["l2", "exp", "affine_exp"] = "l2"
    weight: float = 1.0
    """lambda_w."""
    normalise: bool = True
    """Mean squared difference per element (true) instead of the paper's sum (false)."""
    max_exponent: float = 10.0
    """Beyond this the exponential is continued linearly (exp/affine_exp), so it never overflows."""
    include_bias: bool = False
    """Also pull the layers' biases together (default: kernels only)."""

    def __post_init__(self) -> None:
        if self.weight < 0:
            raise ValueError(f"weight (lambda_w) must be >= 0, got {self.weight}")
        if self.max_exponent <= 0:
            raise ValueError(f"max_exponent must be > 0, got {self.max_exponent}")


def safe_expm1(d: Tensor, max_exponent: float) -> Tensor:
    """``exp(d) - 1`` for ``d <= m``, ``exp(m) (1 + d - m) - 1`` beyond: finite, C1, increasing."""
    m = float(max_exponent)
    return torch.where(d <= m, torch.expm1(d.clamp(max=m)), math.exp(m) * (1.0 + d - m) - 1.0)


def _corresponding(name: str, towers: list[nn.Module], include_bias: bool, where: str):
    """Layers (modules with a >= 2-d ``weight``) of ``towers[0]`` with their counterparts."""
    layers = []
    for sub, module in towers[0].named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, nn.Parameter) or weight.dim() < 2:
            continue
        names = ["weight"] + (["bias"] if include_bias and isinstance(getattr(module, "bias", None), nn.Parameter) else [])
        modules = [t.get_submodule(sub) for t in towers]
        for other in modules[1:]:
            for n in names:
                if getattr(other, n).shape != getattr(module, n).shape:
                    raise ConfigError(f"model.regularizer: towers differ at {where}.{sub}.{n}")
        layers.append((f"{name}.{sub}" if sub else name, modules, names))
    return layers


def tower_layers(model: MultiTaskModel, include_bias: bool = False) -> list[tuple[str, list[nn.Module], list[str]]]:
    """``(layer name, one module per tower, parameter names)`` for every corresponding layer.

    The towers are ``model.tower_stages(t)`` (every tower architecture, cross-residual blocks
    included); stages shared by all tasks (the trunk) are skipped.
    """
    stages = [model.tower_stages(t) for t in range(len(model.tasks))]
    layers = []
    for i, group in enumerate(zip(*stages)):
        if all(m is group[0] for m in group):  # shared stage (trunk), or a single task
            continue
        layers += _corresponding(f"stage{i + 1}", list(group), include_bias, f"stage {i + 1}")
    return layers


class TowerRegularizer(nn.Module):
    """``penalty() -> {"tower_<kind>": lambda_w * L_w}`` over the towers of ``model``.

    The towers are referenced, not registered (their parameters stay the model's); only the
    affine (a, b) are this module's parameters (kind ``regularizer``).
    """

    param_kind = "regularizer"

    def __init__(self, model: MultiTaskModel, options: RegularizerOptions):
        super().__init__()
        self.options = options
        layers = tower_layers(model, options.include_bias)
        if not layers:
            raise ConfigError("model.regularizer: the model has no task towers to regularise "
                              "(it needs 2 or more tasks with their own tower stages, e.g. not split@<all stages>)")
        object.__setattr__(self, "_layers", layers)  # plain list: not submodules
        self.num_towers = len(layers[0][1])
        self.pairs = list(itertools.combinations(range(self.num_towers), 2))
        if options.kind == "affine_exp":
            self.a = nn.Parameter(torch.ones(len(self.pairs), len(layers)))
            self.b = nn.Parameter(torch.zeros(len(self.pairs), len(layers)))

    @property
    def layer_names(self) -> list[str]:
        return [name for name, _, _ in self._layers]

    def distances(self) -> Tensor:
        """``d`` per (pair, layer): squared distance, per element when ``normalise``."""
        rows = []
        for p, (s, t) in enumerate(self.pairs):
            row = []
            for j, (_, modules, names) in enumerate(self._layers):
                ws = torch.cat([getattr(modules[s], n).flatten() for n in names])
                wt = torch.cat([getattr(modules[t], n).flatten() for n in names])
                if self.options.kind == "affine_exp":
                    ws = self.a[p, j] * ws + self.b[p, j]
                sq = (ws - wt).pow(2)
                row.append(sq.mean() if self.options.normalise else sq.sum())
            rows.append(torch.stack(row))
        return torch.stack(rows)

    def forward(self) -> Tensor:
        d = self.distances()
        r = d if self.options.kind == "l2" else safe_expm1(d, self.options.max_exponent)
        return self.options.weight * r.sum(1).mean()

    def penalty(self) -> dict[str, Tensor]:
        return {f"tower_{self.options.kind}": self()}


def attach_regularizer(model: MultiTaskModel, options: RegularizerOptions | None) -> TowerRegularizer | None:
    """Build the regulariser of ``model``'s towers and register it as ``model.regularizer``.

    Nothing of the model is replaced: its ``penalty()`` collects the penalties of its submodules
    (:class:`~taskloom.models.MultiTaskModel`), so from then on it includes the regulariser's
    term, and the regulariser's own parameters (affine ``a``, ``b``) are in the model's
    ``state_dict`` as ``regularizer.a`` / ``regularizer.b`` (checkpointed with the model).
    """
    if options is None:
        return None
    reg = TowerRegularizer(model, options)
    model.regularizer = reg
    return reg
