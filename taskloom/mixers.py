"""Mixers: learned exchange of features between task towers at a stage boundary.

A mixer maps the K task features ``xs = [x_1 .. x_K]`` (same shape each) to K new ones,
``y_t = sum_s A[t][s](x_s)``, where every ``A[t][s]`` acts on channels only (the same at every
pixel). The members of the family differ only in what ``A[t][s]`` may be (REFERENCE §0):

* :class:`CrossStitch` ``granularity="layer"``: ``A[t][s] = alpha[t, s] * I`` (one scalar);
* :class:`CrossStitch` ``granularity="channel"``: ``A[t][s] = diag(alpha[:, t, s])``;
* ``A[t][t] = I, A[t][s] = 0`` is the "do nothing" setting: independent towers.

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

    def forward(self, xs: list[Tensor]) -> list[Tensor]:
        x = torch.stack(xs)  # (K, N, C, *)
        if self.granularity == "layer":
            y = torch.einsum("ts,s...->t...", self.alpha, x)
        else:
            y = torch.einsum("cts,snc...->tnc...", self.alpha, x)
        return list(y.unbind(0))

    def extra_repr(self) -> str:
        return f"tasks={self.num_tasks}, channels={self.channels}, granularity={self.granularity}"
