"""Dense (per-pixel) heads, selectable per task: ``model.heads: {TASK: {name: ..., ...}}``.

* ``fcn`` (the default of every dense task): 3x3 conv + BN + ReLU, 1x1 conv
  (:class:`DenseHead`).
* ``aspp``: the DeepLabV3 head (Chen et al., 2017) as torchvision implements it
  (``torchvision.models.segmentation.deeplabv3.DeepLabHead``: ASPP with a 1x1 branch, one 3x3
  branch per atrous rate and an image-pooling branch, then 3x3 conv + BN + ReLU and a 1x1
  classifier). torchvision's module is used as it is, not rewritten.

Every dense head upsamples its output bilinearly to the task's ``output_size`` (the label size
the dataset sets), so losses and metrics compare at label resolution and ignore values in the
labels stay ignored.

**Atrous rates on small inputs.** DeepLabV3's rates 12/24/36 (torchvision's default) were chosen
for a 65 px feature map (513 px input, output stride 8). On the 4-16 px maps of a 128 px input
a 3x3 conv dilated by 12 reads only zero padding outside its centre tap, so every branch
degenerates into a 1x1 conv. ``rates: null`` (the default here) therefore scales the paper's
rates to the feature map the head sits on: ``max(1, round(r * min(H, W) / 65))`` for
``r = 12, 24, 36`` (a 16 px map: 3, 6, 9; an 8 px map: 1, 3, 4); give ``rates`` to fix them.

Register another head with ``DENSE_HEADS.register(name, OptionsClass)(builder)``; the builder is
called as ``builder(options, feature_shape, out_channels, output_size)``.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor, nn

from taskloom.errors import ConfigError
from taskloom.registry import Registry

DENSE_HEADS: Registry[nn.Module] = Registry("dense head")

PAPER_RATES = (12, 24, 36)
PAPER_MAP = 65
"""DeepLabV3's rates and the feature-map side they were chosen for (513 px at output stride 8)."""


@dataclasses.dataclass
class DenseHeadOptions:
    """Base of every dense head's options; ``name`` picks the head."""

    registry: ClassVar[Registry] = DENSE_HEADS
    name: str = ""


@dataclasses.dataclass
class FCNHeadOptions(DenseHeadOptions):
    """FCN-style head: 3x3 conv + BN + ReLU, 1x1 conv, bilinear upsampling to the label size."""

    name: str = "fcn"
    hidden: int | None = None
    """Width of the 3x3 conv; ``null``: the feature channels clipped to 32..256."""


@dataclasses.dataclass
class ASPPHeadOptions(DenseHeadOptions):
    """DeepLabV3 head (torchvision's ``DeepLabHead`` / ``ASPP``), bilinear upsampling to the label size."""

    name: str = "aspp"
    rates: list[int] | None = None
    """Atrous rates of the 3x3 branches; ``null``: the paper's 12/24/36 scaled to the feature map
    (see the module docstring). torchvision's default is ``[12, 24, 36]``."""
    width: int = 256
    """Channels of every ASPP branch and of the 3x3 conv after it (torchvision: 256)."""

    def __post_init__(self) -> None:
        if self.rates is not None and (not self.rates or min(self.rates) < 1):
            raise ValueError("rates must be a non-empty list of positive integers, or null")
        if self.width < 1:
            raise ValueError(f"width must be positive, got {self.width}")


def _check_map(feature_shape: tuple[int, ...]) -> None:
    if len(feature_shape) != 3:
        raise ValueError(
            f"a dense (per-pixel) head needs a spatial feature map (C, H, W), got features of shape "
            f"{feature_shape}; use a backbone whose last stage is convolutional"
        )


class DenseHead(nn.Module):
    """FCN-style head: 3x3 conv + BN + ReLU, 1x1 conv to ``out_channels``, bilinear upsampling to
    ``output_size``. Works on the last stage of any backbone whose output is a feature map."""

    def __init__(self, feature_shape: tuple[int, ...], out_channels: int, output_size: tuple[int, int],
                 hidden: int | None = None):
        super().__init__()
        _check_map(feature_shape)
        c = feature_shape[0]
        hidden = hidden or max(32, min(256, c))
        self.body = nn.Sequential(nn.Conv2d(c, hidden, 3, padding=1, bias=False), nn.BatchNorm2d(hidden),
                                  nn.ReLU(inplace=True), nn.Conv2d(hidden, out_channels, 1))
        self.output_size = tuple(output_size)

    def forward(self, x: Tensor) -> Tensor:
        return F.interpolate(self.body(x), size=self.output_size, mode="bilinear", align_corners=False)



@DENSE_HEADS.register("fcn", FCNHeadOptions)
def build_fcn(options: FCNHeadOptions, feature_shape: tuple[int, ...], out_channels: int,
              output_size: tuple[int, int]) -> nn.Module:
    """FCN head: 3x3 conv + BN + ReLU, 1x1 conv, bilinear upsampling."""
    return DenseHead(feature_shape, out_channels, output_size, options.hidden)


def scaled_rates(feature_shape: tuple[int, ...]) -> list[int]:
    """The paper's rates scaled to a feature map of ``feature_shape`` (C, H, W)."""
    side = min(feature_shape[1:])
    return [max(1, round(r * side / PAPER_MAP)) for r in PAPER_RATES]


class ASPPHead(nn.Module):
    """torchvision's DeepLabV3 head on a feature map, upsampled to ``output_size``.

    The image-pooling branch of ASPP normalises a 1x1 map with BatchNorm, which cannot take
    batch statistics from a single sample; a training batch of one sample (the last, short batch
    of an epoch) runs that branch's BatchNorm on its running statistics instead of failing.
    """

    def __init__(self, feature_shape: tuple[int, ...], out_channels: int, output_size: tuple[int, int],
                 rates: list[int], width: int = 256):
        super().__init__()
        from torchvision.models.segmentation.deeplabv3 import ASPP, DeepLabHead

        _check_map(feature_shape)
        c = feature_shape[0]
        self.rates = list(rates)
        if width == 256:
            self.body = DeepLabHead(c, out_channels, self.rates)
        else:  # DeepLabHead's layers with another ASPP width
            self.body = nn.Sequential(ASPP(c, self.rates, width), nn.Conv2d(width, width, 3, padding=1, bias=False),
                                      nn.BatchNorm2d(width), nn.ReLU(), nn.Conv2d(width, out_channels, 1))
        pooling = self.body[0].convs[-1]  # ASPPPooling: pool, 1x1 conv, BN, ReLU
        self._pool_bns = [m for m in pooling.modules() if isinstance(m, nn.BatchNorm2d)]
        self.output_size = tuple(output_size)

    def forward(self, x: Tensor) -> Tensor:
        single = self.training and x.shape[0] == 1
        if single:
            for bn in self._pool_bns:
                bn.eval()
        try:
            y = self.body(x)
        finally:
            if single:
                for bn in self._pool_bns:
                    bn.train()
        return F.interpolate(y, size=self.output_size, mode="bilinear", align_corners=False)

    def extra_repr(self) -> str:
        return f"rates={self.rates}, output_size={self.output_size}"


@DENSE_HEADS.register("aspp", ASPPHeadOptions)
def build_aspp(options: ASPPHeadOptions, feature_shape: tuple[int, ...], out_channels: int,
               output_size: tuple[int, int]) -> nn.Module:
    """DeepLabV3 ASPP head (torchvision), bilinear upsampling."""
    _check_map(feature_shape)
    rates = options.rates if options.rates is not None else scaled_rates(feature_shape)
    return ASPPHead(feature_shape, out_channels, output_size, rates, options.width)


def build_dense_head(options: DenseHeadOptions, feature_shape: tuple[int, ...], out_channels: int,
                     output_size: tuple[int, int]) -> nn.Module:
    """The head ``options`` describes (called by a dense task's ``build_head``)."""
    return DENSE_HEADS[options.name].builder(options, tuple(feature_shape), out_channels, tuple(output_size))


def apply_heads(tasks: list, heads: dict[str, DenseHeadOptions]) -> None:
    """Give each task named in ``heads`` (``model.heads``) its head options; only dense tasks
    (those with an ``output_size``) take one."""
    by_name = {t.name: t for t in tasks}
    for name, options in heads.items():
        task = by_name.get(name)
        if task is None:
            raise ConfigError(f"model.heads.{name}: unknown task; tasks are {', '.join(by_name)}")
        if not hasattr(task, "output_size"):
            raise ConfigError(f"model.heads.{name}: {task.kind!r} is not a dense (per-pixel) task; only "
                              f"segmentation, normals and depth tasks take a dense head")
        task.head_options = options
