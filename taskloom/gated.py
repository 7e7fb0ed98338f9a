"""Gated and attention sharing: input-dependent mixing of task features.

The linear mixers of :mod:`taskloom.mixers` weight the sources of task t with constants,
``y_t = sum_s A[t][s] x_s``. The designs here compute the weights from the input instead:

* :class:`GatedMixer`: ``y_t = sum_s g_{t,s}(x_t) x_s`` with ``g_t = softmax(W_t pool(x_t) + b_t)``
  (or without the softmax). ``W = 0`` makes the gates constants and the unit a per-layer
  cross-stitch with ``alpha = g`` (tested): the bridge from the cross-stitch family to the gated one.
* :class:`ExpertStage`: one stage of expert units, fused per task by a gate read from the task's
  input. Its options cover MMoE (shared experts only, one stage of full-backbone experts), CGC
  (task-specific plus shared experts, each task's gate sees its own and the shared ones), PLE
  (CGC stacked, with a gated shared stream between stages) and AdaTT (every task's unit visible to
  every gate, plus a residual of the task's own unit).
* :class:`MTANStage`: one stage of a shared network with a soft attention mask per task (MTAN).

Gates and attention modules are of kind ``"fusion"``; experts and the shared MTAN stages are
backbone stages (kind ``"backbone"``).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from taskloom.mixers import Mixer, _diag_blocks, convex_init


def pool(x: Tensor) -> Tensor:
    """``(N, C, *)`` -> ``(N, C)``: global average over the spatial dimensions (flat stays flat)."""
    return x.flatten(2).mean(2) if x.ndim > 2 else x


class Gate(nn.Module):
    """``g(x) = softmax(W pool(x) + b)`` over ``outputs`` sources (``softmax=False``: no softmax).

    ``constant=True`` drops ``W``: the gate is the learned constant ``softmax(b)`` (or ``b``).
    Initialised with ``W = 0``, so every gate starts input-independent (``b`` gives the start).
    """

    param_kind = "fusion"

    def __init__(self, channels: int, outputs: int, softmax: bool = True, constant: bool = False,
                 bias: Tensor | None = None):
        super().__init__()
        self.softmax = softmax
        self.linear = None if constant else nn.Linear(channels, outputs, bias=False)
        if self.linear is not None:
            nn.init.zeros_(self.linear.weight)
        self.bias = nn.Parameter(bias.clone() if bias is not None else torch.zeros(outputs))

    def forward(self, x: Tensor) -> Tensor:
        """``(N, C, *)`` -> ``(N, outputs)`` (``(1, outputs)`` for a constant gate)."""
        logits = self.bias[None].to(x.dtype)
        if self.linear is not None:
            logits = logits + self.linear(pool(x))
        return torch.softmax(logits, -1) if self.softmax else logits


def _weigh(weights: Tensor, sources: list[Tensor]) -> Tensor:
    """``sum_s weights[:, s] * sources[s]`` with per-sample weights ``(N or 1, S)``."""
    stack = torch.stack(sources, 1)  # (N, S, C, *)
    return torch.einsum("ns,ns...->n...", weights.expand(stack.shape[0], -1), stack)


class GatedMixer(Mixer):
    """Gated mixing of the K task features: ``y_t = sum_s g_{t,s}(x_t) x_s``.

    Args:
        num_tasks: K.
        channels: C.
        softmax: gates are a softmax over the K sources (rows sum to one) or raw logits.
        constant: gates without input dependence (only ``b``): a per-layer cross-stitch.
        alpha_same: initial gate on the task's own feature (the logits are chosen so that the
            initial gates are ``convex_init(K, alpha_same)``, as cross-stitch's).
    """

    def __init__(self, num_tasks: int, channels: int, softmax: bool = True, constant: bool = False,
                 alpha_same: float = 0.9):
        super().__init__(num_tasks)
        self.channels, self.constant = channels, constant
        init = convex_init(num_tasks, alpha_same)
        logits = init.clamp_min(1e-6).log() if softmax else init
        self.gates = nn.ModuleList(Gate(channels, num_tasks, softmax, constant, logits[t]) for t in range(num_tasks))

    def matrix(self) -> Tensor:
        """The gates at a zero (pooled) input, ``(K, K)``: all of them when ``constant``."""
        zero = self.gates[0].bias.new_zeros(1, self.channels)
        return torch.cat([g(zero) for g in self.gates]).detach()

    def blocks(self) -> Tensor:
        """The constant part of the gates as ``(K, K, C, C)`` diagonal blocks (the whole linear
        map when ``constant``; the gates at a zero input otherwise)."""
        return _diag_blocks(self.matrix()[:, :, None].expand(-1, -1, self.channels))

    def forward(self, xs: list[Tensor]) -> list[Tensor]:
        return [_weigh(gate(x), xs) for gate, x in zip(self.gates, xs)]

    def extra_repr(self) -> str:
        return f"tasks={self.num_tasks}, channels={self.channels}, constant={self.constant}"


class Scales(nn.Module):
    """A learned ``(K, E)`` table of scales (AdaTT's residual weights), kind ``"fusion"``."""

    param_kind = "fusion"

    def __init__(self, rows: int, cols: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(rows, cols))


class ExpertStage(nn.Module):
    """One stage of experts fused per task by gates (MMoE, CGC, PLE, AdaTT).

    Inputs: the K task features, plus the shared stream as a (K+1)-th feature when the previous
    stage produced one (the first stage reads ``xs[0]``, which every task shares, as the shared
    input). Task t's experts read task t's feature, the shared experts the shared one.

    Args:
        task_experts: K lists of task t's expert units (may be empty lists: MMoE).
        shared_experts: the shared expert units.
        gate_channels: C of the stage input (what the gates pool).
        see_all: every task's gate sees every task's experts (AdaTT) or only its own (CGC/PLE).
        shared_out: also output the shared stream, gated over all experts (PLE below the top).
        residual: add the task's own unit(s) with a learned scale (AdaTT; init 1).
    """

    def __init__(self, task_experts: list[list[nn.Module]], shared_experts: list[nn.Module], gate_channels: int,
                 see_all: bool = False, shared_out: bool = False, residual: bool = False):
        super().__init__()
        k = len(task_experts)
        self.num_tasks, self.see_all, self.shared_out = k, see_all, shared_out
        self.task_experts = nn.ModuleList(nn.ModuleList(e) for e in task_experts)
        self.shared_experts = nn.ModuleList(shared_experts)
        counts = [len(e) for e in task_experts]
        self.visible = [self._visible(t, counts) for t in range(k)]
        self.gates = nn.ModuleList(Gate(gate_channels, len(v)) for v in self.visible)
        total = sum(counts) + len(shared_experts)
        self.shared_gate = Gate(gate_channels, total) if shared_out else None
        self.residual = Scales(k, max(counts)) if residual and max(counts) else None
        if not total:
            raise ValueError("an expert stage needs at least one expert")

    def _visible(self, t: int, counts: list[int]) -> list[int]:
        """Indices (into the flat list: every task's experts, then the shared) task t's gate weighs."""
        starts = [sum(counts[:s]) for s in range(len(counts))]
        own = list(range(starts[t], starts[t] + counts[t]))
        others = [i for s in range(len(counts)) if s != t for i in range(starts[s], starts[s] + counts[s])]
        shared = list(range(sum(counts), sum(counts) + len(self.shared_experts)))
        return sorted(own + others + shared) if self.see_all else own + shared

    def forward(self, xs: list[Tensor]) -> list[Tensor]:
        k = self.num_tasks
        shared_in = xs[k] if len(xs) > k else xs[0]
        outs = [e(xs[t]) for t in range(k) for e in self.task_experts[t]]
        outs += [e(shared_in) for e in self.shared_experts]
        ys, start = [], 0
        for t in range(k):
            y = _weigh(self.gates[t](xs[t]), [outs[i] for i in self.visible[t]])
            if self.residual is not None:
                own = outs[start:start + len(self.task_experts[t])]
                y = y + sum(self.residual.weight[t, j].to(y.dtype) * o for j, o in enumerate(own))
            start += len(self.task_experts[t])
            ys.append(y)
        if self.shared_gate is not None:
            ys.append(_weigh(self.shared_gate(shared_in), outs))
        return ys

    def task_modules(self, t: int) -> list[nn.Module]:
        """Task t's experts and gate (used by task t only, when its gate alone sees them)."""
        return ([self.gates[t]] if self.see_all or self.shared_out else list(self.task_experts[t]) + [self.gates[t]])


class ConstantMask(nn.Module):
    """An attention module answering 1 everywhere: MTAN without attention (hard sharing)."""

    def forward(self, u: Tensor, prev: Tensor | None, like: Tensor) -> Tensor:
        return torch.ones_like(like[:1])


class Attention(nn.Module):
    """MTAN's attention module for one task and stage: ``a = sigmoid(g([u; prev]))`` with ``u``
    the stage's (shared) input and ``prev`` the task's attended output of the stage below.

    Map outputs: 1x1 conv + BN + ReLU, 1x1 conv + BN, sigmoid, then average-pooled to the stage
    output's size (the paper's ``f`` resizing, moved to the mask). Flat outputs: the input is
    pooled and two linear layers replace the 1x1 convs, the first as wide as the stage's input
    (a fully connected stage's output is wide: ``C_out x C_out`` would outweigh the stage itself).
    """

    param_kind = "fusion"

    def __init__(self, in_channels: int, out_shape: tuple[int, ...], with_prev: bool):
        super().__init__()
        cin = in_channels * (2 if with_prev else 1)
        cout = out_shape[0]
        self.flat = len(out_shape) == 1
        if self.flat:
            self.net = nn.Sequential(nn.Linear(cin, in_channels), nn.ReLU(), nn.Linear(in_channels, cout))
        else:
            self.net = nn.Sequential(nn.Conv2d(cin, cout, 1), nn.BatchNorm2d(cout), nn.ReLU(),
                                     nn.Conv2d(cout, cout, 1), nn.BatchNorm2d(cout))
        self.out_shape = tuple(out_shape)

    def forward(self, u: Tensor, prev: Tensor | None, like: Tensor) -> Tensor:
        x = u if prev is None else torch.cat([u, prev], 1)
        if self.flat:
            return torch.sigmoid(self.net(pool(x)))
        if x.ndim != 4:
            raise ValueError("MTAN: a feature-map stage cannot follow a flat one")
        mask = torch.sigmoid(self.net(x))
        return nn.functional.adaptive_avg_pool2d(mask, like.shape[2:]) if mask.shape[2:] != like.shape[2:] else mask


class MTANStage(nn.Module):
    """One shared stage with a per-task attention mask on its output (MTAN, Liu et al., CVPR 2019).

    Input: the K attended features of the stage below plus the shared feature as the (K+1)-th
    (the first stage gets K copies of the input). Output: ``[a_1 * p, ..., a_K * p, p]`` with
    ``p`` the shared stage's output, ``a_t = attention[t](u, prev_t)``; the top stage drops ``p``.
    """

    def __init__(self, stage: nn.Module, attention: list[nn.Module], first: bool, last: bool):
        super().__init__()
        self.stage = stage
        self.attention = nn.ModuleList(attention)
        self.first, self.last = first, last

    def forward(self, xs: list[Tensor]) -> list[Tensor]:
        k = len(self.attention)
        u = xs[0] if self.first else xs[k]
        p = self.stage(u)
        ys = [att(u, None if self.first else xs[t], p) * p for t, att in enumerate(self.attention)]
        return ys if self.last else ys + [p]

    def task_modules(self, t: int) -> list[nn.Module]:
        return [self.attention[t]]
