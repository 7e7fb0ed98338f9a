"""Body blocks that take several inputs but are not mixers.

* blocks that read the kept outputs of earlier stages (``takes_kept = True``; see
  :meth:`~taskloom.models.MultiTaskNet.features`): :class:`NDDRShortcut` (NDDR-CNN-Shortcut)
  and :class:`BetaMix` (sluice beta layer mixing);
* :class:`CrossResidual`: K copies of a residual block whose shortcuts a
  :class:`~taskloom.mixers.CrossShortcut` mixes (X-ResNet), with the registry of residual block
  types it can take apart (:func:`register_residual_block`; torchvision's ``BasicBlock`` and
  ``Bottleneck`` are registered here).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from taskloom.mixers import Mixer

# --------------------------------------------------------------------------- blocks that read several stages


def resize_to(x: Tensor, shape: tuple[int, ...]) -> Tensor:
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


def concat_kept(kept: list[list[Tensor]], t: int, shape: tuple[int, ...], scales: Tensor | None = None) -> Tensor:
    """Task t's kept stage outputs, each resized to ``shape`` (:func:`resize_to`) and optionally
    multiplied by ``scales[l]``, concatenated along channels."""
    parts = [resize_to(layer[t], shape) for layer in kept]
    if scales is not None:
        parts = [scale * part for scale, part in zip(scales, parts, strict=True)]
    return torch.cat(parts, 1)


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
            cat = concat_kept(kept, t, self.target)
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
        return [concat_kept(kept, t, (0,), self.beta[t]) for t in range(len(xs))]


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


def _last_bn(block: nn.Module) -> nn.Module:
    """The BatchNorm that ends a registered residual block's branch."""
    return getattr(block, RESIDUAL_BLOCKS[type(block)][1])


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
        return _last_bn(self.blocks[0]).num_features

    def forward(self, xs: list[Tensor]) -> list[Tensor]:
        branches, shortcuts = [], []
        for block, x in zip(self.blocks, xs, strict=True):
            f = RESIDUAL_BLOCKS[type(block)][0](block, x)
            branches.append(f if self.bn_after_add else _last_bn(block)(f))
            shortcuts.append(block.downsample(x) if block.downsample is not None else x)
        mixed = self.shortcut(shortcuts) if self.shortcut is not None else shortcuts
        ys = []
        for block, f, s in zip(self.blocks, branches, mixed):
            y = f + s
            if self.bn_after_add:
                y = _last_bn(block)(y)
            ys.append(torch.relu(y))
        return ys

    def extra_repr(self) -> str:
        return f"bn_after_add={self.bn_after_add}"
