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


class Backbone:
    """A backbone recipe bound to an input shape: builds towers and knows stage shapes."""

    def __init__(self, options: BackboneOptions, input_shape: tuple[int, ...]):
        self.options = options
        self.input_shape = tuple(input_shape)
        self._builder = BACKBONES[options.name].builder
        self.shapes = stage_shapes(self.build(), self.input_shape)

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
