"""Backbones as stages: torchvision ResNet / VGG cut at the papers' boundaries, pretrained
weights from a file (never downloaded), grey-input stems, the small CPU ResNet."""
import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from taskloom.backbones import (
    BACKBONES, Backbone, stage_shapes, ResNet18Options, ResNet34Options, ResNet50Options, ResNet101Options, SmallResNetOptions,
    VGG11Options, VGG16Options,
)
from taskloom.errors import ConfigError


def chain(stages, x):
    for s in stages:
        x = s(x)
    return x


@pytest.mark.parametrize("options, block, widths", [
    (ResNet18Options(), BasicBlock, [64, 64, 128, 256, 512]),
    (ResNet34Options(), BasicBlock, [64, 64, 128, 256, 512]),
    (ResNet50Options(), Bottleneck, [64, 256, 512, 1024, 2048]),
    (ResNet101Options(), Bottleneck, [64, 256, 512, 1024, 2048]),
])
def test_resnet_stages_are_stem_and_layer1_to_4(options, block, widths):
    stages = BACKBONES[options.name].builder(options, (3, 32, 32))  # one build (ResNet-101 is big)
    assert [s[0] for s in stage_shapes(stages, (3, 32, 32))] == widths
    assert isinstance(stages[0][-1], nn.MaxPool2d)
    assert all(isinstance(b, block) for s in stages[1:] for b in s)
    expected_blocks = {"resnet18": [2, 2, 2, 2], "resnet34": [3, 4, 6, 3], "resnet50": [3, 4, 6, 3],
                       "resnet101": [3, 4, 23, 3]}[options.name]
    assert [len(s) for s in stages[1:]] == expected_blocks


@pytest.mark.parametrize("options", [VGG11Options(), VGG11Options(batch_norm=True), VGG16Options(),
                                     VGG16Options(batch_norm=True)])
def test_vgg_stages_end_after_each_pool(options):
    recipe = Backbone(options, (3, 32, 32))
    assert [s[0] for s in recipe.shapes] == [64, 128, 256, 512, 512]
    assert [s[1] for s in recipe.shapes] == [16, 8, 4, 2, 1]
    stages = recipe.build()
    for stage in stages:
        assert isinstance(stage[-1], nn.MaxPool2d)
        assert sum(isinstance(m, nn.MaxPool2d) for m in stage) == 1
        assert any(isinstance(m, nn.BatchNorm2d) for m in stage) == options.batch_norm
    convs = sum(isinstance(m, nn.Conv2d) for s in stages for m in s)
    assert convs == (8 if options.name == "vgg11" else 13)


@pytest.mark.parametrize("arch, options", [("resnet18", ResNet18Options), ("vgg11", VGG11Options)])
def test_pretrained_weights_from_a_file_give_the_torchvision_network(tmp_path, arch, options):
    torch.manual_seed(1)
    if arch == "vgg11":  # features only (the classifier is 120M parameters); loading skips it anyway
        reference = nn.Module()
        reference.features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["A"])
        reference.classifier = nn.Linear(2, 2)
        reference.eval()
    else:
        reference = getattr(torchvision.models, arch)(weights=None).eval()
    path = tmp_path / f"{arch}.pth"
    torch.save(reference.state_dict(), path)
    stages = Backbone(options(weights=str(path)), (3, 32, 32)).build()
    for s in stages:
        s.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        if arch == "vgg11":
            expected = reference.features(x)
        else:
            r = reference
            expected = r.layer4(r.layer3(r.layer2(r.layer1(r.maxpool(r.relu(r.bn1(r.conv1(x))))))))
        assert torch.allclose(chain(stages, x), expected, atol=1e-5)
        # grey input: the first conv sums the RGB kernels, so grey x gives the colour network's
        # response to the same image repeated over R, G and B
        grey = Backbone(options(weights=str(path)), (1, 32, 32)).build()
        for s in grey:
            s.eval()
        g = torch.randn(2, 1, 32, 32)
        ref_grey = reference.features(g.repeat(1, 3, 1, 1)) if arch == "vgg11" else None
        if ref_grey is not None:
            assert torch.allclose(chain(grey, g), ref_grey, atol=1e-4)
        else:
            assert torch.allclose(chain(grey, g), chain(stages, g.repeat(1, 3, 1, 1)), atol=1e-4)


def test_torchvision_weight_names_are_never_downloaded(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("tried to download"))
    with pytest.raises(ConfigError, match="not in the local torch hub cache.*never downloads"):
        Backbone(ResNet18Options(weights="IMAGENET1K_V1"), (3, 32, 32))
    with pytest.raises(ConfigError, match="model.backbone.weights: 'IMAGENET_V9' is neither a file nor"):
        Backbone(ResNet18Options(weights="IMAGENET_V9"), (3, 32, 32))
    with pytest.raises(ConfigError, match="does not exist"):
        Backbone(ResNet18Options(weights=str(tmp_path / "missing.pt")), (3, 32, 32))


def test_weights_from_the_hub_cache(tmp_path, monkeypatch):
    torch.manual_seed(2)
    reference = torchvision.models.resnet18(weights=None)
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    (tmp_path / "checkpoints").mkdir()
    torch.save(reference.state_dict(), tmp_path / "checkpoints" / url.rsplit("/", 1)[1])
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    stages = Backbone(ResNet18Options(weights="IMAGENET1K_V1"), (3, 32, 32)).build()
    assert torch.equal(stages[1][0].conv1.weight, reference.layer1[0].conv1.weight)


def test_small_resnet_for_cpu():
    recipe = Backbone(SmallResNetOptions(), (1, 36, 36))
    assert recipe.shapes == [(16, 18, 18), (16, 18, 18), (32, 9, 9), (64, 5, 5)]
    stages = recipe.build()
    assert [len(s) for s in stages[1:]] == [1, 1, 3] and all(isinstance(b, BasicBlock) for s in stages[1:] for b in s)
    assert sum(p.numel() for s in stages for p in s.parameters()) < 300_000
    with pytest.raises(ValueError, match="same length"):
        Backbone(SmallResNetOptions(channels=[8], blocks=[1, 1]), (1, 36, 36))
