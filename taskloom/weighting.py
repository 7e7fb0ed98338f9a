"""Loss weighting: how the K task losses become one update (an axis independent of the
architecture: any architecture x any weighting).

A :class:`Weighting` receives the per-task losses of a batch (and any named penalty terms, such
as a tower-weight regulariser, which are always added with weight 1), runs the backward pass
and returns the task weights it used, for logging. Weightings that learn (their parameters
are optimised in their own ``weighting`` parameter group) or keep history implement
``state_dict``/``load_state_dict`` through ``nn.Module``, so they are checkpointed and resumed.

``train.loss_weights`` (``static``, default 1) pre-scale every task loss before any weighting:
every method works on ``c_t L_t`` and reports the effective weight on the raw ``L_t``.

Methods (formulas and choices in ``docs/weighting.md``): ``fixed``, ``uncertainty`` (Kendall,
Gal, Cipolla, CVPR 2018), ``dwa`` (Liu, Johns, Davison, CVPR 2019), ``gradnorm`` (Chen,
Badrinarayanan, Lee, Rabinovich, ICML 2018), ``pcgrad`` (Yu, Kumar, Gupta, Levine, Hausman,
Finn, NeurIPS 2020).

Register a new one by decorating its class with ``@register_weighting(name, OptionsClass)``:
it is then built as ``cls(task_names, static_weights, **options)`` (``static_weights`` are
``train.loss_weights``; every option but ``name`` is a keyword argument of the constructor), and
the first line of the options class's docstring describes it in the configs reference.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, ClassVar, Literal, TypeVar

import torch
from torch import Tensor, nn

from taskloom.errors import ConfigError
from taskloom.models import MultiTaskModel
from taskloom.registry import Registry

WEIGHTINGS: Registry[Weighting] = Registry("weighting")


@dataclasses.dataclass
class WeightingOptions:
    """Base of every weighting's options; ``name`` picks the method."""

    registry: ClassVar[Registry] = WEIGHTINGS
    name: str = ""


class Weighting(nn.Module):
    """Turns per-task losses into gradients. Parameters are of kind ``weighting``."""

    options_class: ClassVar[type[WeightingOptions]]
    """The options dataclass it was registered with (:func:`register_weighting`)."""
    param_kind = "weighting"
    loss_scale: float = 1.0
    """Set by the trainer under float16 mixed precision: every backward pass runs on the loss
    times this factor (the optimiser unscales all groups, the weighting's included)."""

    def __init__(self, task_names: list[str], static_weights: dict[str, float]):
        super().__init__()
        self.task_names = list(task_names)
        self.static = {t: float(static_weights.get(t, 1.0)) for t in task_names}

    def backward(self, losses: dict[str, Tensor], penalties: dict[str, Tensor],
                 model: MultiTaskModel) -> dict[str, Tensor | float]:
        """Run the backward pass of one batch; return the weight applied to each task (a number,
        or a 0-d tensor, which the trainer reads without making the step wait for the device)."""
        raise NotImplementedError

    def epoch_end(self, train_losses: dict[str, float]) -> None:
        """Called after every epoch with the mean training loss of each task."""


WeightingClass = TypeVar("WeightingClass", bound=type[Weighting])


def register_weighting(name: str, options: type[WeightingOptions]) -> Callable[[WeightingClass], WeightingClass]:
    """Class decorator: register a :class:`Weighting` subclass in ``WEIGHTINGS`` under ``name``.

    ``train.weighting: {name: ..., **fields}`` validates against ``options`` (a
    :class:`WeightingOptions` dataclass) and builds ``cls(task_names, static_weights, **fields)``.
    The first line of ``options``' docstring is the entry's description in the configs reference.
    """

    def decorate(cls: WeightingClass) -> WeightingClass:
        def build(chosen: WeightingOptions, task_names: list[str], static_weights: dict[str, float]) -> Weighting:
            fields = {f.name: getattr(chosen, f.name) for f in dataclasses.fields(chosen) if f.name != "name"}
            return cls(task_names, static_weights, **fields)

        build.__doc__ = options.__doc__
        build.__qualname__ = build.__name__ = f"build_{name}"
        WEIGHTINGS.register(name, options)(build)
        cls.options_class = options
        return cls

    return decorate


def _penalty(penalties: dict[str, Tensor]) -> Tensor | float:
    return sum(penalties.values(), 0.0)


def _weighted_backward(weights: dict[str, Tensor | float], losses, penalties, scale: float = 1.0) -> None:
    total = sum(weights[t] * losses[t] for t in weights) + _penalty(penalties)
    (total * scale).backward()


# --------------------------------------------------------------------------- fixed


@dataclasses.dataclass
class FixedOptions(WeightingOptions):
    """Fixed per-task weights (train.loss_weights; default 1 each)."""

    name: str = "fixed"


@register_weighting("fixed", FixedOptions)
class FixedWeighting(Weighting):
    """``L = sum_t w_t L_t + sum(penalties)``: the papers' (weighted) sum of task losses."""

    def backward(self, losses, penalties, model):
        _weighted_backward(self.static, losses, penalties, self.loss_scale)
        return dict(self.static)


# --------------------------------------------------------------------------- uncertainty

REGRESSION_KINDS = frozenset({"regression", "landmarks", "depth"})
"""Task kinds weighted with the Gaussian (regression) form; every other kind (classification,
binary, ...) uses the softmax/Boltzmann (classification) form."""


@dataclasses.dataclass
class UncertaintyOptions(WeightingOptions):
    """Learned homoscedastic-uncertainty weights (Kendall et al., CVPR 2018).

    One learned ``s_t = log sigma_t^2`` per task (Kendall, Gal, Cipolla, CVPR 2018)."""

    name: str = "uncertainty"
    init: float = 0.0
    """Initial ``s_t`` (0: sigma = 1)."""
    forms: dict[str, Literal["regression", "classification"]] = dataclasses.field(default_factory=dict)
    """Per-task override of the form (default: from the task's kind, see REGRESSION_KINDS)."""


@register_weighting("uncertainty", UncertaintyOptions)
class UncertaintyWeighting(Weighting):
    """Kendall et al. (CVPR 2018), with ``s_t = log sigma_t^2`` learned per task:

    * regression (Gaussian likelihood):   ``1/(2 sigma^2) L + log sigma = 0.5 exp(-s) L + s/2``
    * classification (scaled softmax):     ``1/sigma^2 L + log sigma    =     exp(-s) L + s/2``

    ``L = sum_t [c_t exp(-s_t) w_t L_t + s_t / 2] + penalties`` (c_t = 1/2 or 1); the reported
    weight is ``c_t exp(-s_t) w_t``. The form follows ``Task.kind`` (``regression``/``landmarks``/``depth``:
    regression, anything else: classification) unless ``forms`` names it.
    """

    def __init__(self, task_names, static_weights, init: float = 0.0, forms: dict[str, str] | None = None):
        super().__init__(task_names, static_weights)
        unknown = sorted(set(forms or {}) - set(task_names))
        if unknown:
            raise ConfigError(f"train.weighting.forms: unknown tasks {unknown}; tasks are {list(task_names)}")
        self.log_var = nn.Parameter(torch.full((len(task_names),), float(init)))
        self.forms = dict(forms or {})
        self._scale: dict[str, float] | None = None

    def scales(self, model: MultiTaskModel | None) -> dict[str, float]:
        """``c_t`` of every task: 1/2 (regression form) or 1 (classification form)."""
        if self._scale is None:
            kinds = {t.name: t.kind for t in model.tasks} if model is not None else {}
            form = {t: self.forms.get(t, "regression" if kinds.get(t) in REGRESSION_KINDS else "classification")
                    for t in self.task_names}
            self._scale = {t: 0.5 if form[t] == "regression" else 1.0 for t in self.task_names}
        return self._scale

    def backward(self, losses, penalties, model):
        scale = self.scales(model)
        total = _penalty(penalties)
        used = {}
        for i, t in enumerate(self.task_names):
            s = self.log_var[i]
            w = scale[t] * self.static[t] * torch.exp(-s)
            total = total + w * losses[t] + 0.5 * s
            used[t] = w.detach()  # a tensor: the trainer adds it up on the device, without waiting
        (total * self.loss_scale).backward()
        return used


# --------------------------------------------------------------------------- dwa


@dataclasses.dataclass
class DWAOptions(WeightingOptions):
    """Dynamic weight average from the rate of loss decrease (Liu et al., CVPR 2019)."""

    name: str = "dwa"
    temperature: float = 2.0


@register_weighting("dwa", DWAOptions)
class DWAWeighting(Weighting):
    """Liu et al. (CVPR 2019): ``w_t(e) = K exp(r_t / T) / sum_s exp(r_s / T)`` with
    ``r_t = L_t(e-1) / L_t(e-2)`` (mean training loss of the previous two epochs), ``T = 2``;
    ``w_t = 1`` for the first two epochs. The loss history lives in buffers (exact resume)."""

    def __init__(self, task_names, static_weights, temperature: float = 2.0):
        super().__init__(task_names, static_weights)
        self.temperature = float(temperature)
        k = len(task_names)
        self.register_buffer("history", torch.full((2, k), float("nan")))  # [e-2, e-1]
        self.register_buffer("weights", torch.ones(k))
        self._used: dict[str, float] | None = None  # the weights as numbers, read once per epoch

    def backward(self, losses, penalties, model):
        if self._used is None:  # read from the device after a change only, not every step
            self._used = {t: self.static[t] * float(self.weights[i]) for i, t in enumerate(self.task_names)}
        _weighted_backward(self._used, losses, penalties, self.loss_scale)
        return dict(self._used)

    def epoch_end(self, train_losses):
        current = torch.tensor([float(train_losses[t]) for t in self.task_names])
        self.history.copy_(torch.stack([self.history[1], current.to(self.history.device)]))
        self.weights.copy_(self.compute(self.history[1], self.history[0], self.temperature))
        self._used = None

    def _load_from_state_dict(self, *args, **kwargs):  # a checkpoint's weights replace ours
        self._used = None
        super()._load_from_state_dict(*args, **kwargs)

    @staticmethod
    def compute(last: Tensor, before: Tensor, temperature: float) -> Tensor:
        """The DWA weights from ``L(e-1)`` and ``L(e-2)`` (ones while either is unknown)."""
        if torch.isnan(before).any() or torch.isnan(last).any():
            return torch.ones_like(last)
        ratio = last / before.clamp_min(1e-12)
        return len(last) * torch.softmax(ratio / temperature, dim=0)


# --------------------------------------------------------------------------- gradnorm


@dataclasses.dataclass
class GradNormOptions(WeightingOptions):
    """Gradient normalisation on the last shared layer (Chen et al., ICML 2018)."""

    name: str = "gradnorm"
    alpha: float = 1.5
    """Asymmetry: larger pulls harder toward tasks that train slowly (0: equal gradient norms)."""


def shared_layer(model: MultiTaskModel) -> list[nn.Parameter]:
    """The parameters GradNorm measures gradient norms on ("the last shared layer"): the
    model's :meth:`~taskloom.models.MultiTaskModel.last_shared_layer`.

    * a non-empty shared trunk: the last conv/linear layer of ``model.trunk`` (the paper);
    * no trunk (towers from the input: ``single``, ``split@0``, ``cross_stitch``): the last
      conv/linear layer of every task's first tower stage, all towers together. With
      cross-stitch units every task's loss reaches all of them (the nearest thing to a shared
      layer); with fully separate towers each task reaches only its own, so GradNorm then
      balances the towers' gradient magnitudes and has no shared weights to trade off;
    * an ensemble: the union over members.
    """
    layer = model.last_shared_layer()
    if not layer:
        raise ValueError("gradnorm: the model has no parameters")
    return layer


@register_weighting("gradnorm", GradNormOptions)
class GradNormWeighting(Weighting):
    """Chen et al. (ICML 2018). Learned weights ``w_t`` (init 1), ``L = sum_t w_t L_t``.

    On the shared layer W (see :func:`shared_layer`): ``G_t = ||grad_W w_t L_t|| = w_t ||grad_W L_t||``,
    ``Gbar = mean_t G_t``, inverse training rate ``r_t = (L_t / L_t(0)) / mean_s (L_s / L_s(0))``,
    ``L_grad = sum_t |G_t - [Gbar r_t^alpha]|`` (target held constant). The network gets the
    gradient of ``sum_t w_t L_t`` (w held constant), the weights only that of ``L_grad``, and
    the weights are renormalised to ``sum_t w_t = K`` (done before each use; clamped at 1e-4
    so they stay positive). ``L_t(0)`` is the first batch's loss, kept in a buffer.
    """

    def __init__(self, task_names, static_weights, alpha: float = 1.5):
        super().__init__(task_names, static_weights)
        self.alpha = float(alpha)
        k = len(task_names)
        self.weights = nn.Parameter(torch.ones(k))
        self.register_buffer("initial", torch.full((k,), float("nan")))

    def backward(self, losses, penalties, model):
        k = len(self.task_names)
        with torch.no_grad():
            self.weights.clamp_(min=1e-4).mul_(k / self.weights.sum())
        scaled = torch.stack([self.static[t] * losses[t] for t in self.task_names])
        layer = shared_layer(model)
        norms = []
        for i in range(k):
            grads = torch.autograd.grad(scaled[i] * self.loss_scale, layer, retain_graph=True, allow_unused=True)
            norms.append(torch.sqrt(sum((g.pow(2).sum() for g in grads if g is not None), torch.zeros((), device=scaled.device))))
        norms = torch.stack(norms).detach()
        if torch.isnan(self.initial).any():
            self.initial.copy_(scaled.detach())
        self.weights.grad = self.weight_gradient(self.weights, norms, scaled.detach(), self.initial, self.alpha)
        w = self.weights.detach()
        _weighted_backward(dict(zip(self.task_names, w)), dict(zip(self.task_names, scaled)), penalties, self.loss_scale)
        return {t: self.static[t] * float(w[i]) for i, t in enumerate(self.task_names)}

    @staticmethod
    def weight_gradient(weights: Tensor, norms: Tensor, losses: Tensor, initial: Tensor, alpha: float) -> Tensor:
        """``d L_grad / d w`` given the unweighted gradient norms ``||grad_W L_t||``."""
        w = weights.detach().requires_grad_(True)
        g = w * norms
        ratio = losses / initial.clamp_min(1e-12)
        target = (g.mean() * (ratio / ratio.mean()) ** alpha).detach()
        (grad,) = torch.autograd.grad((g - target).abs().sum(), w)
        return grad


# --------------------------------------------------------------------------- pcgrad


@dataclasses.dataclass
class PCGradOptions(WeightingOptions):
    """Projecting conflicting gradients on the shared parameters (Yu et al., NeurIPS 2020)."""

    name: str = "pcgrad"
    seed: int = 0
    """Seed of the generator that draws the task order (its state is checkpointed)."""


def pcgrad(grads: Tensor, orders: list[list[int]]) -> Tensor:
    """Surgery on task gradients ``grads`` (K x P): for every task i, for j in ``orders[i]``,
    ``g_i <- g_i - min(0, g_i . g_j) / ||g_j||^2 g_j`` (against the original ``g_j``); returns
    the sum of the projected gradients."""
    out = grads.clone()
    for i, order in enumerate(orders):
        g = out[i]
        for j in order:
            dot = torch.dot(g, grads[j])
            if dot < 0:
                g = g - dot / grads[j].pow(2).sum().clamp_min(1e-20) * grads[j]
        out[i] = g
    return out.sum(0)


@register_weighting("pcgrad", PCGradOptions)
class PCGradWeighting(Weighting):
    """Yu et al. (NeurIPS 2020): per-task gradients ``g_t`` of ``w_t L_t`` on every parameter;
    on the *shared* parameters (those reached by more than one task's loss: a trunk, and every
    tower joined by a mixer) the conflicting components are projected away (:func:`pcgrad`,
    task order drawn at random per step from a seeded generator whose state is a buffer);
    task-specific parameters get their plain gradient; penalties are added unprojected."""

    def __init__(self, task_names, static_weights, seed: int = 0):
        super().__init__(task_names, static_weights)
        self.register_buffer("rng_state", torch.Generator().manual_seed(int(seed)).get_state())

    def orders(self) -> list[list[int]]:
        gen = torch.Generator()
        gen.set_state(self.rng_state.cpu())
        k = len(self.task_names)
        orders = []
        for i in range(k):
            others = [j for j in range(k) if j != i]
            orders.append([others[j] for j in torch.randperm(k - 1, generator=gen).tolist()])
        self.rng_state.copy_(gen.get_state())
        return orders

    def backward(self, losses, penalties, model):
        params = [p for p in model.parameters() if p.requires_grad]
        per_task = [torch.autograd.grad(self.static[t] * self.loss_scale * losses[t], params, retain_graph=True, allow_unused=True)
                    for t in self.task_names]
        orders = self.orders()
        shared = [i for i in range(len(params)) if sum(g[i] is not None for g in per_task) > 1]
        shared_set = set(shared)
        for i, p in enumerate(params):
            if i not in shared_set:
                gs = [g[i] for g in per_task if g[i] is not None]
                p.grad = gs[0] if gs else None
        if shared:
            flat = torch.stack([torch.cat([(g[i] if g[i] is not None else torch.zeros_like(params[i])).flatten()
                                           for i in shared]) for g in per_task])
            total = pcgrad(flat, orders)
            offset = 0
            for i in shared:
                n = params[i].numel()
                params[i].grad = total[offset:offset + n].view_as(params[i]).clone()
                offset += n
        if penalties:
            (_penalty(penalties) * self.loss_scale).backward()
        return dict(self.static)


def build_weighting(options: WeightingOptions, task_names: list[str], static_weights: dict[str, float]) -> Weighting:
    """The weighting ``train.weighting`` describes, for these tasks and static weights."""
    return WEIGHTINGS[options.name].builder(options, task_names, static_weights)
