"""Dense heads (FCN, torchvision's DeepLabV3 ASPP) selectable per task, and dilated torchvision ResNets."""
from __future__ import annotations

import pytest
import torch

from taskloom import config as cfg
from taskloom.backbones import Backbone, ResNet18Options, ResNet34Options, ResNet50Options, SmallResNetOptions
from taskloom.errors import ConfigError
from taskloom.heads import ASPPHead, ASPPHeadOptions, FCNHeadOptions, apply_heads, build_dense_head, scaled_rates
from taskloom.architectures import build_model
from taskloom.dense import DenseHead, DepthTask, SegmentationTask
from taskloom.tasks import ClassificationTask


def test_aspp_head_is_torchvisions_deeplab_head_upsampled_to_the_label_size():
    from torchvision.models.segmentation.deeplabv3 import ASPP, DeepLabHead

    head = build_dense_head(ASPPHeadOptions(rates=[1, 2, 3]), (40, 8, 8), 3, (48, 48))
    assert isinstance(head, ASPPHead) and isinstance(head.body, DeepLabHead)
    rates = [m.convs[i][0].dilation[0] for m in head.body.modules() if isinstance(m, ASPP) for i in (1, 2, 3)]
    assert rates == [1, 2, 3]
    assert head(torch.randn(2, 40, 8, 8)).shape == (2, 3, 48, 48)
    narrow = build_dense_head(ASPPHeadOptions(rates=[2], width=32), (40, 8, 8), 3, (48, 48))
    assert isinstance(narrow.body[0], ASPP) and narrow(torch.randn(2, 40, 8, 8)).shape == (2, 3, 48, 48)


def test_default_rates_are_the_papers_scaled_to_the_feature_map():
    """12/24/36 belong to a 65 px map; on the 4-16 px maps of small inputs they would sample padding."""
    assert scaled_rates((320, 65, 65)) == [12, 24, 36]
    assert scaled_rates((320, 16, 16)) == [3, 6, 9]
    assert scaled_rates((320, 8, 8)) == [1, 3, 4]
    assert scaled_rates((320, 4, 4)) == [1, 1, 2]
    head = build_dense_head(ASPPHeadOptions(), (16, 8, 8), 2, (32, 32))
    assert head.rates == [1, 3, 4]


def test_aspp_trains_on_a_batch_of_one():
    """The image-pooling branch's BatchNorm sees one value per channel: it uses running statistics
    for such a batch instead of failing (a last, short batch of an epoch)."""
    head = build_dense_head(ASPPHeadOptions(rates=[1]), (8, 4, 4), 2, (16, 16)).train()
    head(torch.randn(1, 8, 4, 4)).sum().backward()
    assert all(bn.training for bn in head._pool_bns)


def test_fcn_is_the_default_and_heads_are_chosen_per_task():
    seg = SegmentationTask("seg", 3, output_size=(32, 32))
    depth = DepthTask("depth", output_size=(32, 32))
    assert isinstance(seg.build_head((16, 8, 8)), DenseHead)
    apply_heads([seg, depth], {"seg": ASPPHeadOptions(rates=[1, 2])})
    assert isinstance(seg.build_head((16, 8, 8)), ASPPHead)
    assert isinstance(depth.build_head((16, 8, 8)), DenseHead)
    apply_heads([depth], {"depth": FCNHeadOptions(hidden=8)})
    assert depth.build_head((16, 8, 8)).body[0].out_channels == 8
    with pytest.raises(ConfigError, match="not a dense"):
        apply_heads([ClassificationTask("c", 3)], {"c": ASPPHeadOptions()})
    with pytest.raises(ConfigError, match="unknown task"):
        apply_heads([seg], {"nope": ASPPHeadOptions()})


def test_heads_config_key_validates():
    c = cfg.from_dict({"model": {"heads": {"segmentation": {"name": "aspp", "rates": [1, 2, 3], "width": 64}}}})
    assert c.model.heads["segmentation"] == ASPPHeadOptions(rates=[1, 2, 3], width=64)
    with pytest.raises(ConfigError, match="unknown dense head"):
        cfg.from_dict({"model": {"heads": {"segmentation": {"name": "unet"}}}})
    with pytest.raises(ConfigError, match="rates"):
        cfg.from_dict({"model": {"heads": {"segmentation": {"name": "aspp", "rates": [0]}}}})


def test_ignored_pixels_stay_ignored_through_the_upsampled_head():
    seg = SegmentationTask("seg", 2, ignore_index=-1, output_size=(16, 16))
    seg.head_options = ASPPHeadOptions(rates=[1])
    head = seg.build_head((8, 4, 4))
    out = head(torch.randn(2, 8, 4, 4))
    target = torch.randint(0, 2, (2, 16, 16))
    ignored = target.clone()
    ignored[:, :8] = -1  # the top half unlabelled (the pets' trimap border)
    expected = torch.nn.functional.cross_entropy(out[:, :, 8:], target[:, 8:])
    assert torch.allclose(seg.loss(out, ignored), expected)
    metric = seg.metrics()
    metric.update(out, ignored)
    top_only = seg.metrics()
    top_only.update(out[:, :, 8:], target[:, 8:])
    assert metric.compute()["pixel_accuracy"] == top_only.compute()["pixel_accuracy"]

# --------------------------------------------------------------------------- dilated torchvision ResNets


@pytest.mark.parametrize("stride,sizes", [(32, [16, 16, 8, 4, 2]), (16, [16, 16, 8, 4, 4]), (8, [16, 16, 8, 8, 8])])
def test_torchvision_resnet50_output_stride(stride, sizes):
    backbone = Backbone(ResNet50Options(output_stride=stride), (3, 64, 64))
    assert [s[1] for s in backbone.shapes] == sizes and backbone.shapes[-1][0] == 2048


@pytest.mark.parametrize("options", [ResNet18Options, ResNet34Options])
def test_basic_block_resnets_refuse_dilation_clearly(options):
    with pytest.raises(ConfigError, match="BasicBlock .* does not support"):
        Backbone(options(output_stride=16), (3, 64, 64))
    Backbone(options(output_stride=32), (3, 32, 32))  # the default still builds


def test_dilated_resnet_keeps_the_parameters(tmp_path):
    """Same parameters at every output stride: pretrained weights load unchanged."""
    import torchvision

    path = tmp_path / "r50.pth"
    torch.save(torchvision.models.resnet50().state_dict(), path)
    for stride in (32, 8):
        stages = Backbone(ResNet50Options(weights=str(path), output_stride=stride), (3, 32, 32)).build()
        assert sum(p.numel() for s in stages for p in s.parameters()) == 23_508_032


def test_aspp_on_a_dilated_resnet_every_architecture():
    tasks = [SegmentationTask("seg", 3, output_size=(32, 32)), ClassificationTask("c", 4)]
    apply_heads(tasks, {"seg": ASPPHeadOptions(rates=[1, 2], width=16)})
    backbone = SmallResNetOptions(channels=[8, 16], blocks=[1, 2])
    for arch in ("single", "split@1", "cross_stitch", "nddr", "sluice", "xresnet"):
        model = build_model(cfg.from_dict({"model": {"architecture": arch}}).model.architecture, backbone, tasks,
                            (3, 32, 32))
        out = model(torch.randn(2, 3, 32, 32))
        assert out["seg"].shape == (2, 3, 32, 32) and out["c"].shape == (2, 4)
