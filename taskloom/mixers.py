"""Mixers: learned exchange of features between task towers at a stage boundary.

A mixer maps the K task features ``xs = [x_1 .. x_K]`` (same shape each) to K new ones,
``y_t = sum_s A[t][s](x_s)``, where every ``A[t][s]`` acts on channels only (the same at every
pixel). The members of the family differ only in what ``A[t][s]`` may be (REFERENCE §0):

* :class:`CrossStitch` ``granularity="layer"``: ``A[t][s] = alpha[t, s] * I`` (one scalar);
* :class:`CrossStitch` ``granularity="channel"``: ``A[t][s] = diag(alpha[:, t, s])``;
* :class:`Sluice`: ``A[t][s]`` a block matrix of scalars over S channel groups (S = 1: per-layer
  cross-stitch);
* :class:`NDDR`: ``A[t][s]`` a full ``C x C`` matrix (1x1 convolution), then BN + ReLU per task;
* :class:`CrossShortcut`: the shortcut of a cross-residual block, ``A[t][t] = I`` fixed and
  ``A[t][s]`` = 0 (X0), I (XI), ``diag(a)`` (Xs) or a ``C x C`` matrix (conv1x1);
* ``A[t][t] = I, A[t][s] = 0`` is the "do nothing" setting: independent towers.

Every mixer exposes its linear part as :meth:`Mixer.blocks` (a ``(K, K, C, C)`` tensor);
:func:`apply_blocks` is the one generic formula they all equal (the tests check it), and what
``taskloom inspect`` summarises (block norms per unit).

Every mixer's parameters are of kind ``"fusion"`` (their own learning-rate multiplier and
weight decay in the trainer).
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn


class Mixer(nn.Module):
    """Base class: ``forward(list of K tensors) -> list of K tensors``."""

    param_kind = "fusion"

    def __init__(self, num_tasks: int):
        super().__init__()
        if num_tasks < 1:
            raise ValueError("a mixer needs at least one task")
        self.num_tasks = num_tasks

    def forward(self, xs: list[Tensor]) -> list[Tensor]:
        raise NotImplementedError

    def blocks(self) -> Tensor:
        """The linear map as ``(K, K, C, C)``: ``blocks[t, s] = A[t][s]`` (detached)."""
        raise NotImplementedError


def convex_init(num_tasks: int, alpha_same: float, alpha_diff: float | None = None) -> Tensor:
    """K x K matrix with ``alpha_same`` on the diagonal and ``alpha_diff`` elsewhere.

    ``alpha_diff=None`` uses ``(1 - alpha_same) / (K - 1)`` so each row sums to one, the
    cross-stitch paper's convex initialisation generalised to K tasks.
    """
    if alpha_diff is None:
        alpha_diff = (1.0 - alpha_same) / (num_tasks - 1) if num_tasks > 1 else 0.0
    matrix = torch.full((num_tasks, num_tasks), float(alpha_diff))
    matrix.fill_diagonal_(float(alpha_same))
    return matrix


class CrossStitch(Mixer):
    """Cross-stitch unit (Misra et al., CVPR 2016): ``y_t = sum_s alpha[t, s] * x_s``.

    Args:
        num_tasks: K.
        channels: C, the channel count of the features (dimension 1).
        granularity: ``"channel"`` learns one K x K matrix per channel (the paper's default),
            ``"layer"`` one K x K matrix for the whole layer.
        alpha_same, alpha_diff: initial values, see :func:`convex_init`.

    Shape: each input and output is ``(N, C, *)`` (feature maps or flat features).
    The parameter ``alpha`` has shape ``(C, K, K)`` or ``(K, K)``; ``alpha[..., t, s]`` is the
    weight of task s's input in task t's output.
    """

    def __init__(
        self,
        num_tasks: int,
        channels: int,
        granularity: Literal["channel", "layer"] = "channel",
        alpha_same: float = 0.9,
        alpha_diff: float | None = None,
    ):
        super().__init__(num_tasks)
        if granularity not in ("channel", "layer"):
            raise ValueError(f"granularity must be 'channel' or 'layer', got {granularity!r}")
        self.granularity = granularity
        self.channels = channels
        init = convex_init(num_tasks, alpha_same, alpha_diff)
        if granularity == "channel":
            init = init.expand(channels, num_tasks, num_tasks).clone()
        self.alpha = nn.Parameter(init)

    def matrix(self) -> Tensor:
        """The mixing weights as ``(C, K, K)`` (a layer-wise unit repeats its one matrix)."""
        alpha = self.alpha.detach()
        return alpha.expand(self.channels, *alpha.shape) if alpha.ndim == 2 else alpha

    def blocks(self) -> Tensor:
        return _diag_blocks(self.matrix().permute(1, 2, 0))

    def forward(self, xs: list[Tensor]) -> list[Tensor]:
        if len(xs) == 2:
            # Two tasks: four scaled adds are about 2x faster (forward + backward, CPU) than
            # stacking for the einsum, whose permuted copies dominate at K = 2
            # (benchmarks/README.md, "cross-stitch kernel"); from K = 3 the einsum wins.
            if self.granularity == "layer":
                w = self.alpha.reshape(4)
            else:  # (C, 2, 2) -> 4 per-channel weights broadcast over (N, C, *)
                w = self.alpha.reshape(self.channels, 4).t().reshape(4, 1, self.channels, *[1] * (xs[0].ndim - 2))
            w = w.to(xs[0].dtype)  # as the einsum under autocast: bf16/fp16 features stay bf16/fp16
            return [xs[0] * w[0] + xs[1] * w[1], xs[0] * w[2] + xs[1] * w[3]]
        x = torch.stack(xs)  # (K, N, C, *)
        if self.granularity == "layer":
            y = torch.einsum("ts,s...->t...", self.alpha, x)
        else:
            y = torch.einsum("cts,snc...->tnc...", self.alpha, x)
        return list(y.unbind(0))

    def extra_repr(self) -> str:
        return f"tasks={self.num_tasks}, channels={self.channels}, granularity={self.granularity}"


def apply_blocks(blocks: Tensor, xs: list[Tensor]) -> list[Tensor]:
    """The generic mixer: ``y_t = sum_s A[t][s] x_s`` with ``blocks[t, s] = A[t][s]`` a
    ``(C, C)`` matrix acting on dimension 1 of each ``(N, C, *)`` input. Every linear mixer
    below equals this with its own :meth:`Mixer.blocks` (tested), which is what makes them one
    family; it is the slow reference, not what they run."""
    x = torch.stack(xs)  # (K, N, C, *)
    y = torch.einsum("tsdc,snc...->tnd...", blocks.to(x.dtype), x)
    return list(y.unbind(0))


def _diag_blocks(weights: Tensor) -> Tensor:
    """``(K, K, C)`` per-channel weights -> ``(K, K, C, C)`` diagonal blocks."""
    return torch.diag_embed(weights)


def _as_map(x: Tensor) -> tuple[Tensor, bool]:
    """``(N, C)`` features as ``(N, C, 1, 1)`` maps (so 1x1 convs and BatchNorm2d apply)."""
    if x.ndim == 2:
        return x[:, :, None, None], True
    if x.ndim != 4:
        raise ValueError(f"expected (N, C) or (N, C, H, W) features, got shape {tuple(x.shape)}")
    return x, False


class NDDR(Mixer):
    """NDDR layer (Gao et al., CVPR 2019): concatenate the K task features along channels and,
    per task t, reduce ``K*C -> C`` with a 1x1 convolution without bias, then BN and ReLU.

    The 1x1 weight of task t is ``[A[t][1] .. A[t][K]]``, one full ``C x C`` matrix per source
    task, so NDDR is the mixer whose blocks are unconstrained (followed by BN + ReLU).

    Args:
        num_tasks: K.
        channels: C.
        init: ``"diagonal"``: ``A[t][t] = alpha * I``, ``A[t][s] = beta * I`` (the paper's
            default, (0.9, 0.1)); ``"xavier"``: Xavier-uniform on each ``C x K*C`` weight.
        alpha, beta: diagonal init; ``beta=None`` uses ``(1 - alpha) / (K - 1)`` (0.1 for K=2).
        batch_norm, activation: the BN and ReLU after the 1x1 conv (both on in the paper; off,
            NDDR is a purely linear mixer, used by the identity tests).

    Flat ``(N, C)`` features are treated as ``(N, C, 1, 1)`` maps.
    The paper puts weight decay on the 1x1 weights: give the ``fusion`` parameter group a
    weight decay (``train.groups.fusion.weight_decay``; the nddr configs do).
    """

    def __init__(
        self,
        num_tasks: int,
        channels: int,
        init: Literal["diagonal", "xavier"] = "diagonal",
        alpha: float = 0.9,
        beta: float | None = None,
        batch_norm: bool = True,
        activation: bool = True,
    ):
        super().__init__(num_tasks)
        if init not in ("diagonal", "xavier"):
            raise ValueError(f"init must be 'diagonal' or 'xavier', got {init!r}")
        self.channels = channels
        k, c = num_tasks, channels
        self.convs = nn.ModuleList(nn.Conv2d(k * c, c, 1, bias=False) for _ in range(k))
        self.norms = nn.ModuleList(nn.BatchNorm2d(c) for _ in range(k)) if batch_norm else None
        self.activation = activation
        self.init = init
        with torch.no_grad():
            if init == "diagonal":
                weights = convex_init(k, alpha, beta)  # (K, K): alpha on the diagonal, beta elsewhere
                eye = torch.eye(c)
                for t, conv in enumerate(self.convs):
                    conv.weight.copy_(torch.cat([weights[t, s] * eye for s in range(k)], 1)[:, :, None, None])
            else:
                for conv in self.convs:
                    nn.init.xavier_uniform_(conv.weight)

    def blocks(self) -> Tensor:
        """``(K, K, C, C)``: ``blocks[t, s]`` is task t's 1x1 weight on task s's channels."""
        k, c = self.num_tasks, self.channels
        return torch.stack([conv.weight.detach()[:, :, 0, 0].reshape(c, k, c).transpose(0, 1) for conv in self.convs])

    def forward(self, xs: list[Tensor]) -> list[Tensor]:
        maps = [_as_map(x) for x in xs]
        flat = maps[0][1]
        cat = torch.cat([m for m, _ in maps], 1)
        # The K per-task 1x1 convs as one conv with their weights stacked (K*C -> K*C): the
        # concatenation is read once instead of K times (15-25% faster on CPU for K >= 3).
        weight = torch.cat([conv.weight for conv in self.convs]).to(cat.dtype)
        ys = []
        for t, y in enumerate(nn.functional.conv2d(cat, weight).chunk(self.num_tasks, 1)):
            if self.norms is not None:
                y = self.norms[t](y)
            if self.activation:
                y = torch.relu(y)
            ys.append(y[:, :, 0, 0] if flat else y)
        return ys

    def extra_repr(self) -> str:
        return (f"tasks={self.num_tasks}, channels={self.channels}, init={self.init}, "
                f"batch_norm={self.norms is not None}, activation={self.activation}")


class Sluice(Mixer):
    """Sluice unit (Ruder et al., AAAI 2019): each task's C channels are split into S
    contiguous subspaces of C/S channels, and one ``(K*S) x (K*S)`` matrix of scalars mixes all
    task-subspace pairs: ``y[t, i] = sum_{s, j} alpha[(t, i), (s, j)] * x[s, j]``.

    Init "like cross-stitch": ``alpha = convex_init(K) (x) I_S`` (a subspace reads its own
    subspace of every task, with the cross-stitch weights). S = 1 is a per-layer cross-stitch.

    ``orthogonality > 0`` adds the penalty ``orthogonality * sum_t sum_{i<j} ||G_ti^T G_tj / M||_F^2``
    where ``G_ti`` is subspace i of task t's *input* to this unit, as an ``(M, C/S)`` matrix
    over the M = N*H*W positions (divided by M so that the value does not grow with the
    batch or the image size); see :meth:`penalty`.
    """

    def __init__(
        self,
        num_tasks: int,
        channels: int,
        subspaces: int = 2,
        alpha_same: float = 0.9,
        alpha_diff: float | None = None,
        orthogonality: float = 0.0,
    ):
        super().__init__(num_tasks)
        if subspaces < 1 or channels % subspaces:
            raise ValueError(f"subspaces must divide the channel count {channels}, got {subspaces}")
        self.channels, self.subspaces, self.orthogonality = channels, subspaces, orthogonality
        init = torch.kron(convex_init(num_tasks, alpha_same, alpha_diff), torch.eye(subspaces))
        self.alpha = nn.Parameter(init)
        self._last: list[Tensor] | None = None

    def _split(self, x: Tensor) -> Tensor:
        """``(N, C, *)`` -> ``(S, N, C/S, *)``."""
        s = self.subspaces
        return x.reshape(x.shape[0], s, self.channels // s, *x.shape[2:]).transpose(0, 1)

    def blocks(self) -> Tensor:
        k, s, c = self.num_tasks, self.subspaces, self.channels
        a = self.alpha.detach().reshape(k, s, k, s)
        eye = torch.eye(c // s, dtype=a.dtype)
        # blocks[t, u, (i, p), (j, q)] = a[t, i, u, j] * eye[p, q]
        full = torch.einsum("tiuj,pq->tuipjq", a, eye)
        return full.reshape(k, k, c, c)

    def forward(self, xs: list[Tensor]) -> list[Tensor]:
        k, s = self.num_tasks, self.subspaces
        parts = torch.stack([self._split(x) for x in xs])  # (K, S, N, C/S, *)
        self._last = xs if (self.orthogonality and self.training) else None
        flat = parts.reshape(k * s, *parts.shape[2:])
        mixed = torch.einsum("ab,b...->a...", self.alpha, flat)  # (K*S, N, C/S, *)
        mixed = mixed.reshape(k, s, *parts.shape[2:]).transpose(1, 2)  # (K, N, S, C/S, *)
        return [m.reshape(xs[0].shape) for m in mixed.unbind(0)]

    def penalty(self) -> dict[str, Tensor]:
        """The orthogonality term of the last training forward pass (empty when off)."""
        if not self.orthogonality or self._last is None:
            return {}
        total = self.alpha.new_zeros(())
        for x in self._last:
            parts = self._split(x)  # (S, N, C/S, *)
            mats = [p.transpose(1, -1).reshape(-1, p.shape[1]) if p.ndim > 2 else p for p in parts]
            for i in range(len(mats)):
                for j in range(i + 1, len(mats)):
                    total = total + (mats[i].T @ mats[j] / mats[i].shape[0]).pow(2).sum()
        return {"sluice_orthogonality": self.orthogonality * total}

    def extra_repr(self) -> str:
        return f"tasks={self.num_tasks}, channels={self.channels}, subspaces={self.subspaces}"


CROSS_KINDS = ("zero", "identity", "scale", "conv1x1")


class CrossShortcut(Mixer):
    """The shortcut of a cross-residual block (X-ResNet, Jou & Chang 2016):
    ``y_t = x_t + sum_{s != t} W^(s->t) x_s`` with the self shortcut fixed at I and cross terms

    * ``zero`` (X0): ``W = 0``, no parameters (plain multi-task ResNet);
    * ``identity`` (XI): ``W = I``, no parameters;
    * ``scale`` (Xs, the paper's method): ``W = diag(a)``, C parameters per connection,
      ``a ~ N(0, 2/n)`` with n the mean of input and output units (= C);
    * ``conv1x1``: ``W`` a full ``C x C`` matrix (the generalisation the paper names as future
      work), the same init.

    Only the K*(K-1) cross connections carry parameters: ``weight[p]`` belongs to
    ``pairs[p] = (t, s)`` (target t, source s).
    """

    def __init__(self, num_tasks: int, channels: int, cross: str = "scale"):
        super().__init__(num_tasks)
        if cross not in CROSS_KINDS:
            raise ValueError(f"cross must be one of {', '.join(CROSS_KINDS)}, got {cross!r}")
        self.channels, self.cross = channels, cross
        k, c = num_tasks, channels
        self.pairs = [(t, s) for t in range(k) for s in range(k) if s != t]
        std = (2.0 / c) ** 0.5  # n = mean of input and output units = C
        if cross == "scale":
            self.weight = nn.Parameter(torch.randn(len(self.pairs), c) * std)
        elif cross == "conv1x1":
            self.weight = nn.Parameter(torch.randn(len(self.pairs), c, c) * std)
        else:
            self.register_parameter("weight", None)

    def blocks(self) -> Tensor:
        k, c = self.num_tasks, self.channels
        dtype = self.weight.dtype if self.weight is not None else torch.get_default_dtype()
        out = torch.zeros(k, k, c, c, dtype=dtype)
        for t in range(k):
            out[t, t] = torch.eye(c, dtype=dtype)
        for p, (t, s) in enumerate(self.pairs):
            if self.cross == "identity":
                out[t, s] = torch.eye(c, dtype=dtype)
            elif self.cross == "scale":
                out[t, s] = torch.diag(self.weight.detach()[p])
            elif self.cross == "conv1x1":
                out[t, s] = self.weight.detach()[p]
        return out

    def forward(self, xs: list[Tensor]) -> list[Tensor]:
        if self.cross == "zero":
            return list(xs)
        if self.cross == "identity":
            total = torch.stack(xs).sum(0)
            return [total for _ in xs]
        ys = list(xs)
        for p, (t, s) in enumerate(self.pairs):
            w = self.weight[p]
            if self.cross == "scale":
                term = xs[s] * w.reshape(1, -1, *([1] * (xs[s].ndim - 2)))
            else:
                term = torch.einsum("dc,nc...->nd...", w, xs[s])
            ys[t] = ys[t] + term
        return ys

    def extra_repr(self) -> str:
        return f"tasks={self.num_tasks}, channels={self.channels}, cross={self.cross}"
