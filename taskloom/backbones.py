"""Backbones as ordered lists of stages.

A backbone is a recipe that builds a fresh list of ``nn.Module`` stages (freshly initialised
each call, so every task tower gets its own weights). Stage boundaries are where towers may be
split and where mixers go. Nothing here depends on attribute names: any model that can be
written as a sequence of stages is a backbone.

Register a new one with::

    @BACKBONES.register("mynet", MyNetOptions)
    def build_mynet(options: MyNetOptions, input_shape: tuple[int, int, int]) -> list[nn.Module]:
        ...
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

import torch
from torch import nn

from taskloom.registry import Registry

BACKBONES: Registry[list[nn.Module]] = Registry("backbone")


@dataclasses.dataclass
class BackboneOptions:
    """Base of every backbone's options; ``name`` picks the backbone."""

    registry: ClassVar[Registry] = BACKBONES
    name: str = ""

    def known_shapes(self, input_shape: tuple[int, ...]) -> list[tuple[int, ...]] | None:
        """Stage output shapes known without building and running the stages (timm's
        ``feature_info``); ``None`` (the default): :class:`Backbone` finds them by a dry run."""
        return None


class Backbone:
    """A backbone recipe bound to an input shape: builds towers and knows stage shapes."""

    def __init__(self, options: BackboneOptions, input_shape: tuple[int, ...]):
        self.options = options
        self.input_shape = tuple(input_shape)
        self._builder = BACKBONES[options.name].builder
        known = options.known_shapes(self.input_shape)
        self.shapes = known if known is not None else stage_shapes(self.build(), self.input_shape)

    @property
    def num_stages(self) -> int:
        return len(self.shapes)

    def build(self) -> list[nn.Module]:
        """A fresh, freshly initialised list of stages."""
        return list(self._builder(self.options, self.input_shape))


@torch.no_grad()
def stage_shapes(stages: list[nn.Module], input_shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Output shape (without batch) of every stage, by a dry run on a zero input."""
    x = torch.zeros(2, *input_shape)
    shapes = []
    for stage in stages:
        stage.eval()
        x = stage(x)
        shapes.append(tuple(x.shape[1:]))
    return shapes


def _conv_block(cin: int, cout: int, kernel: int, pool: bool, batch_norm: bool, act: type[nn.Module]) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, kernel, bias=not batch_norm)]
    if batch_norm:
        layers.append(nn.BatchNorm2d(cout))
    layers.append(act())
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


def _fc_stage(stages: list[nn.Module], input_shape: tuple[int, ...], hidden: int, act: type[nn.Module]) -> nn.Sequential:
    flat = torch.Size(stage_shapes(stages, input_shape)[-1]).numel()
    return nn.Sequential(nn.Flatten(), nn.Linear(flat, hidden), act())


_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh}


@dataclasses.dataclass
class LeNetOptions(BackboneOptions):
    """LeNet-style CNN for digits: two conv + pool stages and one fully connected stage."""

    name: str = "lenet"
    channels: list[int] = dataclasses.field(default_factory=lambda: [20, 50])
    """Output channels of the two 5x5 conv stages."""
    hidden: int = 500
    """Width of the fully connected stage."""
    batch_norm: bool = False


@BACKBONES.register("lenet", LeNetOptions)
def build_lenet(options: LeNetOptions, input_shape: tuple[int, ...]) -> list[nn.Module]:
    """LeNet: [conv5-pool] x 2, then fc (3 stages)."""
    if len(options.channels) != 2:
        raise ValueError("lenet: channels must list exactly 2 widths")
    c1, c2 = options.channels
    stages: list[nn.Module] = [
        _conv_block(input_shape[0], c1, 5, True, options.batch_norm, nn.ReLU),
        _conv_block(c1, c2, 5, True, options.batch_norm, nn.ReLU),
    ]
    stages.append(_fc_stage(stages, input_shape, options.hidden, nn.ReLU))
    return stages


@dataclasses.dataclass
class TCDCNOptions(BackboneOptions):
    """The facial-landmark CNN of Zhang et al. (ECCV 2014) used in seed 004: 4 conv + 3 pool +
    1 fully connected layer on 40x40 grey faces (5 stages)."""

    name: str = "tcdcn"
    channels: list[int] = dataclasses.field(default_factory=lambda: [16, 48, 64, 64])
    hidden: int = 100
    activation: Literal["relu", "tanh"] = "relu"
    batch_norm: bool = False


@BACKBONES.register("tcdcn", TCDCNOptions)
def build_tcdcn(options: TCDCNOptions, input_shape: tuple[int, ...]) -> list[nn.Module]:
    """TCDCN-style: conv5-pool, conv3-pool, conv3-pool, conv2, fc (5 stages)."""
    if len(options.channels) != 4:
        raise ValueError("tcdcn: channels must list exactly 4 widths")
    act = _ACTIVATIONS[options.activation]
    c = [input_shape[0], *options.channels]
    kernels, pools = (5, 3, 3, 2), (True, True, True, False)
    stages: list[nn.Module] = [
        _conv_block(c[i], c[i + 1], kernels[i], pools[i], options.batch_norm, act) for i in range(4)
    ]
    stages.append(_fc_stage(stages, input_shape, options.hidden, act))
    return stages


# --------------------------------------------------------------------------- torchvision and residual backbones
#
# Stage boundaries follow the papers: ResNet = stem (conv1, bn1, relu, maxpool), layer1..layer4
# (5 stages; the X-ResNet / NDDR "stage outputs"); VGG = the conv features cut after each max
# pool (5 stages; NDDR's pool1..pool5). The final pooling and classifier are not stages: each
# task head pools and classifies.
#
# Inputs with other than 3 channels: the first convolution is rebuilt with the input's channel
# count. With pretrained weights its kernel becomes the mean of the RGB kernels repeated over
# the input channels, times 3 / channels (for grey input: the sum of the RGB kernels, so a grey
# image gives the response the RGB network gives to the same image in colour).


@dataclasses.dataclass
class TorchvisionOptions(BackboneOptions):
    """A torchvision model cut into stages."""

    weights: str | None = None
    """``null``: random init. A torchvision weight name (``DEFAULT``, ``IMAGENET1K_V1``, ...;
    loaded only from the local torch hub cache, never downloaded) or a path to a state dict
    (``.pt``/``.pth``: a torchvision ``state_dict``, or a mapping with a ``state_dict`` or
    ``model`` entry) of the full torchvision model."""


@dataclasses.dataclass
class ResNetOptions(TorchvisionOptions):
    stem: Literal["imagenet", "small"] = "imagenet"
    """``imagenet``: 7x7 stride-2 conv + max pool (as torchvision). ``small``: a 3x3 stride-1
    conv and no max pool (CIFAR-style, for 32-36 px inputs), pretrained conv1 weights dropped."""
    output_stride: Literal[8, 16, 32] = 32
    """Input size / last stage's size (with the ``imagenet`` stem). 16: layer4's stride becomes a
    dilation of 2; 8: layer3 and layer4 dilated (DeepLab's ``replace_stride_with_dilation``). Same
    parameters, so pretrained weights load unchanged. Bottleneck ResNets (50, 101) only:
    torchvision's BasicBlock (ResNet-18/34) does not support dilation."""


@dataclasses.dataclass
class ResNet18Options(ResNetOptions):
    """torchvision ResNet-18 (basic blocks): stem, layer1..layer4."""
    name: str = "resnet18"


@dataclasses.dataclass
class ResNet34Options(ResNetOptions):
    """torchvision ResNet-34 (basic blocks): stem, layer1..layer4."""
    name: str = "resnet34"


@dataclasses.dataclass
class ResNet50Options(ResNetOptions):
    """torchvision ResNet-50 (bottleneck blocks): stem, layer1..layer4."""
    name: str = "resnet50"


@dataclasses.dataclass
class ResNet101Options(ResNetOptions):
    """torchvision ResNet-101 (bottleneck blocks): stem, layer1..layer4."""
    name: str = "resnet101"


@dataclasses.dataclass
class VGGOptions(TorchvisionOptions):
    batch_norm: bool = False
    """Use the ``_bn`` variant (BatchNorm after every conv)."""


@dataclasses.dataclass
class VGG11Options(VGGOptions):
    """torchvision VGG-11 conv features, cut after each of the 5 max pools."""
    name: str = "vgg11"


@dataclasses.dataclass
class VGG16Options(VGGOptions):
    """torchvision VGG-16 conv features, cut after each of the 5 max pools."""
    name: str = "vgg16"


def _load_weights(model: nn.Module, options: TorchvisionOptions, arch: str, skip: str | None = None) -> None:
    """Load ``options.weights`` into a full torchvision model (never downloads)."""
    import os
    from pathlib import Path

    import torchvision

    from taskloom.checkpoint import load_state_dict_file
    from taskloom.errors import ConfigError

    value = options.weights
    path = Path(value).expanduser()
    if path.suffix in (".pt", ".pth") or path.exists():
        if not path.exists():
            raise ConfigError(f"model.backbone.weights: {value} does not exist")
        state = load_state_dict_file(path)
    else:
        try:
            enum = torchvision.models.get_model_weights(arch)
            weights = enum[value] if value != "DEFAULT" else enum.DEFAULT
        except KeyError:
            names = ", ".join(["DEFAULT", *enum.__members__])
            raise ConfigError(f"model.backbone.weights: {value!r} is neither a file nor a torchvision weight "
                              f"name of {arch} ({names})") from None
        cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
        if not cached.is_file():
            raise ConfigError(
                f"model.backbone.weights: {arch} {weights} is not in the local torch hub cache ({cached}); "
                f"taskloom never downloads. Fetch it once with: python -c \"import torchvision; "
                f"torchvision.models.{arch}(weights='{value}')\", or give a path to a state dict"
            )
        state = load_state_dict_file(cached)
    if skip:  # parts of the torchvision model that are not stages (VGG's classifier)
        state = {k: v for k, v in state.items() if not k.startswith(skip)}
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ConfigError(f"model.backbone.weights: {value} does not fit {arch}: {str(exc).splitlines()[0]}") from None


def _adapt_first_conv(conv: nn.Conv2d, channels: int, **changes) -> nn.Conv2d:
    """A copy of ``conv`` for ``channels`` input channels (see the note above)."""
    kwargs = dict(kernel_size=conv.kernel_size, stride=conv.stride, padding=conv.padding, bias=conv.bias is not None)
    kwargs.update(changes)
    new = nn.Conv2d(channels, conv.out_channels, **kwargs)
    if not changes and channels != conv.in_channels:
        with torch.no_grad():
            mean = conv.weight.mean(1, keepdim=True)
            new.weight.copy_(mean.repeat(1, channels, 1, 1) * (conv.in_channels / channels))
            if conv.bias is not None:
                new.bias.copy_(conv.bias)
    return new


def _torchvision_resnet(options: ResNetOptions, input_shape: tuple[int, ...]) -> list[nn.Module]:
    import torchvision

    dilate = {32: [False, False, False], 16: [False, False, True], 8: [False, True, True]}[options.output_stride]
    if any(dilate) and options.name in ("resnet18", "resnet34"):
        from taskloom.errors import ConfigError

        raise ConfigError(
            f"model.backbone.output_stride: {options.output_stride} needs dilated convolutions, which torchvision's "
            f"BasicBlock ({options.name}) does not support; use resnet50 or resnet101, or output_stride: 32")
    model = getattr(torchvision.models, options.name)(weights=None, replace_stride_with_dilation=dilate)
    if options.weights:
        _load_weights(model, options, options.name)
    channels = input_shape[0]
    if options.stem == "small":
        conv1 = _adapt_first_conv(model.conv1, channels, kernel_size=3, stride=1, padding=1)
        stem = nn.Sequential(conv1, model.bn1, model.relu)
    else:
        conv1 = model.conv1 if channels == 3 else _adapt_first_conv(model.conv1, channels)
        stem = nn.Sequential(conv1, model.bn1, model.relu, model.maxpool)
    return [stem, model.layer1, model.layer2, model.layer3, model.layer4]


for _name, _options in (("resnet18", ResNet18Options), ("resnet34", ResNet34Options),
                        ("resnet50", ResNet50Options), ("resnet101", ResNet101Options)):
    BACKBONES.register(_name, _options)(_torchvision_resnet)


def _torchvision_vgg(options: VGGOptions, input_shape: tuple[int, ...]) -> list[nn.Module]:
    import torchvision

    from torchvision.models import vgg

    arch = options.name + ("_bn" if options.batch_norm else "")
    # Only the conv features (VGG-16's classifier alone has 120M parameters; heads replace it),
    # initialised as torchvision initialises them.
    model = nn.Module()
    model.features = vgg.make_layers(vgg.cfgs["A" if options.name == "vgg11" else "D"], options.batch_norm)
    for m in model.features.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)
    if options.weights:
        _load_weights(model, options, arch, skip="classifier.")
    layers = list(model.features)
    if input_shape[0] != 3:
        layers[0] = _adapt_first_conv(layers[0], input_shape[0])
    stages, current = [], []
    for layer in layers:
        current.append(layer)
        if isinstance(layer, nn.MaxPool2d):
            stages.append(nn.Sequential(*current))
            current = []
    return stages


BACKBONES.register("vgg11", VGG11Options)(_torchvision_vgg)
BACKBONES.register("vgg16", VGG16Options)(_torchvision_vgg)


@dataclasses.dataclass
class SmallResNetOptions(BackboneOptions):
    """A small residual CNN for CPU runs (MultiMNIST): a 3x3 conv stem (+ BN + ReLU), then one
    stage per width of torchvision ``BasicBlock``s, every stage after the first halving the size
    (so X-ResNet's cross-residual blocks and any torchvision-ResNet code path run on a CPU)."""

    name: str = "resnet_small"
    channels: list[int] = dataclasses.field(default_factory=lambda: [16, 32, 64])
    """Width of each residual stage."""
    blocks: list[int] = dataclasses.field(default_factory=lambda: [1, 1, 3])
    """Basic blocks per stage (last stage: 3, as ResNet-50's conv5_x that X-ResNet branches)."""
    stem_channels: int = 16
    stem_stride: int = 2
    """Stride of the stem conv (2: a 36 px MultiMNIST canvas runs its stages at 18, 9 and 5 px)."""


@BACKBONES.register("resnet_small", SmallResNetOptions)
def build_resnet_small(options: SmallResNetOptions, input_shape: tuple[int, ...]) -> list[nn.Module]:
    """Small ResNet: stem (conv3x3-BN-ReLU), then len(channels) stages of basic blocks."""
    from torchvision.models.resnet import BasicBlock

    if len(options.channels) != len(options.blocks) or not options.channels:
        raise ValueError("resnet_small: channels and blocks must be non-empty lists of the same length")
    if min(options.blocks) < 1:
        raise ValueError("resnet_small: every stage needs at least one block")
    c = options.stem_channels
    if options.stem_stride < 1:
        raise ValueError("resnet_small: stem_stride must be at least 1")
    stages: list[nn.Module] = [nn.Sequential(nn.Conv2d(input_shape[0], c, 3, stride=options.stem_stride, padding=1, bias=False),
                                             nn.BatchNorm2d(c), nn.ReLU(inplace=True))]
    for i, (width, count) in enumerate(zip(options.channels, options.blocks)):
        stride = 1 if i == 0 else 2
        layers = []
        for b in range(count):
            downsample = None
            if b == 0 and (stride != 1 or c != width):
                downsample = nn.Sequential(nn.Conv2d(c, width, 1, stride=stride, bias=False), nn.BatchNorm2d(width))
            layers.append(BasicBlock(c, width, stride if b == 0 else 1, downsample))
            c = width
        stages.append(nn.Sequential(*layers))
    return stages
