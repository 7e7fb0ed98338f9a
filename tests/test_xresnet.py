"""Cross-residual networks (X-ResNet): reductions to the plain multi-task ResNet and to a plain
residual block, parameter counts, torchvision basic and bottleneck blocks."""
import pytest
import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from taskloom import config as cfg
from taskloom.architectures import SplitOptions, XResNetOptions, build_model
from taskloom.backbones import ResNet18Options, ResNet50Options, SmallResNetOptions, LeNetOptions
from taskloom.blocks import CrossResidual
from taskloom.errors import ConfigError
from taskloom.mixers import CrossShortcut
from taskloom.models import parameter_kinds
from taskloom.train import count_parameters as count

from helpers import classification_tasks as tasks

SMALL = SmallResNetOptions(channels=[8, 16], blocks=[1, 3], stem_channels=8)
INPUT = (1, 16, 16)


def copy_model(dst, src):
    """Copy every stage of every tower (and the trunk) and the heads of ``src`` into ``dst``."""
    for t in range(len(src.tasks)):
        for a, b in zip(dst.tower_stages(t), src.tower_stages(t), strict=True):
            a.load_state_dict(b.state_dict())
    dst.heads.load_state_dict(src.heads.state_dict())


def randomise_bn(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_()
                m.bias.normal_()


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("backbone, shape", [(SMALL, INPUT), (ResNet18Options(), (3, 32, 32))])
def test_x0_is_a_multitask_resnet_split_at_the_branch_point(k, backbone, shape):
    ts = tasks(k)
    split = build_model(SplitOptions(at=4 if backbone.name == "resnet18" else 2), backbone, ts, shape)
    x0 = build_model(XResNetOptions(cross="zero", bn_after_add=False), backbone, ts, shape)
    assert count(x0) == count(split)
    randomise_bn(split)
    copy_model(x0, split)
    split.eval(), x0.eval()
    x = torch.randn(2, *shape)
    a, b = split(x), x0(x)
    for t in ts:
        assert torch.allclose(a[t.name], b[t.name], atol=1e-4)


@pytest.mark.parametrize("block", [
    lambda: BasicBlock(8, 8),
    lambda: BasicBlock(4, 8, 2, nn.Sequential(nn.Conv2d(4, 8, 1, 2, bias=False), nn.BatchNorm2d(8))),
    lambda: Bottleneck(16, 4),
    lambda: Bottleneck(8, 4, 2, nn.Sequential(nn.Conv2d(8, 16, 1, 2, bias=False), nn.BatchNorm2d(16))),
])
def test_xi_with_one_task_is_a_plain_residual_block(block):
    b = block().double()
    randomise_bn(b)
    b.eval()
    unit = CrossResidual([b], CrossShortcut(1, b.conv1.out_channels * (4 if isinstance(b, Bottleneck) else 1), "identity"),
                         bn_after_add=False).double().eval()
    x = torch.randn(2, b.conv1.in_channels, 6, 6, dtype=torch.float64)
    (y,) = unit([x])
    assert torch.allclose(y, b(x), atol=1e-10)


def test_cross_residual_matches_the_paper_formula():
    # y_t = ReLU(BN_t(F'_t(x_t) + x_t + sum_{s != t} a_{s->t} * x_s)), BN moved after the addition.
    k, c = 3, 8
    blocks = [BasicBlock(c, c).double() for _ in range(k)]
    for b in blocks:
        randomise_bn(b)
        b.eval()
    shortcut = CrossShortcut(k, c, "scale").double()
    unit = CrossResidual(blocks, shortcut, bn_after_add=True).eval()
    xs = [torch.randn(2, c, 5, 5, dtype=torch.float64) for _ in range(k)]
    ys = unit(xs)
    for t, b in enumerate(blocks):
        f = b.conv2(b.relu(b.bn1(b.conv1(xs[t]))))
        cross = sum(shortcut.weight[p].reshape(1, c, 1, 1) * xs[s] for p, (tt, s) in enumerate(shortcut.pairs) if tt == t)
        assert torch.allclose(ys[t], torch.relu(b.bn2(f + xs[t] + cross)), atol=1e-10)


@pytest.mark.parametrize("cross, per_connection", [("zero", 0), ("identity", 0), ("scale", 16), ("conv1x1", 16 * 16)])
def test_parameter_counts_per_cross_kind(cross, per_connection):
    k = 3
    model = build_model(XResNetOptions(cross=cross), SMALL, tasks(k), INPUT)
    base = build_model(SplitOptions(at=2), SMALL, tasks(k), INPUT)
    units = [m for _, m in model.mixers()]
    assert len(units) == (2 if cross else 0)  # last stage has 3 blocks: the last 2 are cross-residual
    assert count(model) - count(base) == len(units) * k * (k - 1) * per_connection
    fusion = sum(p.numel() for p in parameter_kinds(model).get("fusion", []))
    assert fusion == len(units) * k * (k - 1) * per_connection


def test_branch_point_and_cross_blocks_are_configurable():
    model = build_model(XResNetOptions(split_at=1, cross_blocks=4), SMALL, tasks(2), INPUT)
    residual = [b for b in model.body if isinstance(b, CrossResidual)]
    assert len(residual) == 4 and [b.shortcut is not None for b in residual] == [True] * 4
    assert len(model.trunk) == 1
    model(torch.randn(2, *INPUT))
    with pytest.raises(ConfigError, match="cross_blocks"):
        build_model(XResNetOptions(cross_blocks=5), SMALL, tasks(2), INPUT)
    with pytest.raises(ConfigError, match="split_at"):
        build_model(XResNetOptions(split_at=3), SMALL, tasks(2), INPUT)
    with pytest.raises(ConfigError, match="residual blocks"):
        build_model(XResNetOptions(), LeNetOptions(), tasks(2), (1, 36, 36))


def test_bad_cross_kind_is_a_config_error_naming_the_key():
    with pytest.raises(ConfigError, match=r"model.architecture.cross: 'sclae' is not one of .*did you mean 'scale'"):
        cfg.from_dict({"model": {"architecture": {"name": "xresnet", "cross": "sclae"}}})
    with pytest.raises(ConfigError, match="model.architecture.cross"):
        build_model(XResNetOptions(cross="sclae"), SMALL, tasks(2), INPUT)


def test_bottleneck_resnet50_cross_residual_trains():
    ts = tasks(2)
    model = build_model(XResNetOptions(), ResNet50Options(stem="small"), ts, (3, 16, 16))
    units = [m for _, m in model.mixers()]
    assert len(units) == 2 and all(u.weight.shape == (2, 2048) for u in units)
    out = model(torch.randn(2, 3, 16, 16))
    sum(o.sum() for o in out.values()).backward()
    assert all(u.weight.grad is not None and u.weight.grad.abs().sum() > 0 for u in units)
    # per-task BN after the addition: each task's branch block owns its own BN
    residual = [b for b in model.body if isinstance(b, CrossResidual)]
    assert len(residual) == 3 and residual[0].bn_after_add
    assert residual[0].blocks[0].bn3 is not residual[0].blocks[1].bn3
