"""Gradient aggregators through TorchJD (``train.weighting: {name: jd, aggregator: upgrad}``).

`TorchJD <https://github.com/TorchJD/torchjd>`_ (MIT) implements the Jacobian-descent
aggregators: UPGrad, MGDA, DualProj, PCGrad, IMTL-G, CAGrad, Nash-MTL, Aligned-MTL, ConFIG,
GradDrop, FairGrad and more. This weighting hands them the Jacobian of the K (static-weighted)
task losses with respect to the model's *shared* parameters, every parameter not in any task's
:meth:`~taskloom.models.MultiTaskModel.task_modules`; task-specific parameters (heads, towers that
only their task reaches) get their plain gradient, and penalties are added unaggregated.

It needs the optional extra ``pip install taskloom[jd]`` (TorchJD >= 0.18, whose
``autojac.backward`` + ``jac_to_grad`` API it uses). Some aggregators need TorchJD's own extras:
``upgrad`` and ``dualproj`` a QP solver (``torchjd[quadprog-projector]``) and ``nash_mtl`` cvxpy
with ECOS (``torchjd[nash_mtl]``), both of which ``taskloom[jd]`` includes; ``cagrad`` cvxpy
(``torchjd[cagrad]``) and ``fairgrad`` scipy (``torchjd[fairgrad]``); a missing one is reported
when the weighting is built.
"""
from __future__ import annotations

import dataclasses
import inspect
import warnings
from typing import Any

import torch
from torch import nn

from taskloom.errors import ConfigError
from taskloom.weighting import Weighting, WeightingOptions, _penalty, register_weighting

AGGREGATORS = {
    "upgrad": "UPGrad", "mgda": "MGDA", "dualproj": "DualProj", "pcgrad": "PCGrad", "imtl_g": "IMTLG",
    "cagrad": "CAGrad", "nash_mtl": "NashMTL", "aligned_mtl": "AlignedMTL", "config": "ConFIG",
    "graddrop": "GradDrop", "fairgrad": "FairGrad", "gradvac": "GradVac", "krum": "Krum",
    "trimmed_mean": "TrimmedMean", "random": "Random", "mean": "Mean", "sum": "Sum",
    "excess_mtl": "ExcessMTL", "pcd": "PCD",
}
"""``aggregator`` names and the TorchJD classes they build."""


@dataclasses.dataclass
class JDOptions(WeightingOptions):
    """A TorchJD aggregator on the Jacobian of the task losses w.r.t. the shared parameters.

    Needs ``pip install taskloom[jd]``; see docs/weighting.md for the aggregators and their extras."""

    name: str = "jd"
    aggregator: str = "upgrad"
    """One of upgrad, mgda, dualproj, pcgrad, imtl_g, cagrad, nash_mtl, aligned_mtl, config,
    graddrop, fairgrad, gradvac, krum, trimmed_mean, random, mean, sum."""
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    """The aggregator's own keyword arguments (e.g. ``{c: 0.5}`` for cagrad, ``{alpha: 1.0}`` for
    fairgrad); ``n_tasks``, where the aggregator takes it, is filled in."""


def build_aggregator(name: str, options: dict[str, Any], num_tasks: int):
    """The TorchJD aggregator ``name`` with ``options`` (``n_tasks`` added where it is taken)."""
    try:
        import torchjd.aggregation as aggregation
    except ImportError:
        raise ConfigError("train.weighting: 'jd' needs TorchJD; install it with pip install 'taskloom[jd]'") from None
    if name not in AGGREGATORS:
        raise ConfigError(f"train.weighting.aggregator: {name!r} is not one of {', '.join(AGGREGATORS)}")
    cls = getattr(aggregation, AGGREGATORS[name])
    kwargs = dict(options)
    if "n_tasks" in inspect.signature(cls).parameters:
        kwargs.setdefault("n_tasks", num_tasks)
    try:
        aggregator = cls(**kwargs)
        with warnings.catch_warnings():  # a solver's warnings on this made-up matrix mean nothing
            warnings.simplefilter("ignore")
            aggregator(torch.eye(num_tasks, 2))  # fails now, not at the first step, when a solver is missing
        if hasattr(aggregator, "reset"):  # stateful ones (Nash-MTL, GradVac) must not keep the probe's state
            aggregator.reset()
    except ImportError as exc:
        raise ConfigError(f"train.weighting.aggregator: {name!r} needs an extra of TorchJD: {exc}") from None
    except TypeError as exc:
        raise ConfigError(f"train.weighting.options: {exc}") from None
    return aggregator


def split_parameters(model: nn.Module, num_tasks: int) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """``(shared, task-specific)`` trainable parameters: task-specific ones belong to some task's
    ``task_modules``, every other parameter is shared."""
    specific_ids = {id(p) for t in range(num_tasks) for m in model.task_modules(t) for p in m.parameters()}
    params = [p for p in model.parameters() if p.requires_grad]
    return [p for p in params if id(p) not in specific_ids], [p for p in params if id(p) in specific_ids]


@register_weighting("jd", JDOptions)
class JDWeighting(Weighting):
    """TorchJD aggregation on the shared parameters (see the module docstring).

    The Jacobian rows are the gradients of ``c_t L_t`` (``train.loss_weights``); the reported
    weight of task t is ``c_t w_t`` with ``w`` the aggregator's weights (``c_t`` when the
    aggregator is not a weighted one: ConFIG, GradDrop, TrimmedMean)."""

    def __init__(self, task_names, static_weights, aggregator: str = "upgrad", options: dict | None = None):
        super().__init__(task_names, static_weights)
        self.aggregator_name = aggregator
        self.aggregator = build_aggregator(aggregator, options or {}, len(task_names))

    def backward(self, losses, penalties, model):
        from torchjd.autojac import backward as jac_backward
        from torchjd.autojac import jac_to_grad

        scaled = [self.static[t] * self.loss_scale * losses[t] for t in self.task_names]
        shared, specific = split_parameters(model, len(self.task_names))
        if specific:
            torch.autograd.backward(sum(scaled), inputs=specific, retain_graph=bool(shared or penalties))
        weights = None
        if shared:
            jac_backward(scaled, inputs=shared, retain_graph=bool(penalties))
            weights = jac_to_grad(shared, self.aggregator)
        if penalties:
            (_penalty(penalties) * self.loss_scale).backward()
        if weights is None:
            return dict(self.static)
        return {t: self.static[t] * float(w) for t, w in zip(self.task_names, weights)}
