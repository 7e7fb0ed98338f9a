"""NDDR-CNN and NDDR-CNN-Shortcut: counts, reductions to cross-stitch and independent towers."""
import pytest
import torch

from taskloom.architectures import CrossStitchOptions, NDDROptions, NDDRShortcutOptions, SingleOptions, build_model
from taskloom.backbones import Backbone, LeNetOptions, SmallResNetOptions
from taskloom.blocks import NDDRShortcut
from taskloom.errors import ConfigError
from taskloom.mixers import NDDR
from taskloom.models import TaskParallel, parameter_kinds
from taskloom.train import count_parameters as count

from helpers import classification_tasks as tasks, copy_towers

LENET = LeNetOptions(channels=[6, 8], hidden=12)
SMALL = SmallResNetOptions(channels=[8, 16], blocks=[1, 1], stem_channels=8)
INPUT = (1, 36, 36)


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("backbone", [LENET, SMALL])
def test_nddr_adds_exactly_its_convs_and_bn(k, backbone):
    ts = tasks(k)
    single = build_model(SingleOptions(), backbone, ts, INPUT)
    nddr = build_model(NDDROptions(), backbone, ts, INPUT)
    channels = [shape[0] for shape in Backbone(backbone, INPUT).shapes]
    expected = sum(k * (k * c) * c + k * 2 * c for c in channels)  # 1x1 weights + BN (gamma, beta)
    assert count(nddr) - count(single) == expected
    assert sum(p.numel() for p in parameter_kinds(nddr)["fusion"]) == expected
    assert len(nddr.mixers()) == len(channels)


@pytest.mark.parametrize("k", [2, 3])
def test_nddr_at_its_independent_setting_is_independent_towers(k):
    ts = tasks(k)
    single = build_model(SingleOptions(), LENET, ts, INPUT)
    nddr = build_model(NDDROptions(alpha=1.0, beta=0.0, batch_norm=False, activation=False), LENET, ts, INPUT)
    copy_towers(nddr, single)
    x = torch.randn(3, *INPUT)
    a, b = single(x), nddr(x)
    for t in ts:
        assert torch.allclose(a[t.name], b[t.name], atol=1e-5)


def test_nddr_network_with_tied_diagonal_blocks_is_the_cross_stitch_network():
    ts = tasks(3)
    stitch = build_model(CrossStitchOptions(granularity="layer"), LENET, ts, INPUT).double()
    nddr = build_model(NDDROptions(batch_norm=False, activation=False), LENET, ts, INPUT).double()
    copy_towers(nddr, stitch)
    for (_, cs), (_, nd) in zip(stitch.mixers(), nddr.mixers(), strict=True):
        with torch.no_grad():
            cs.alpha.copy_(torch.randn_like(cs.alpha))
            eye = torch.eye(nd.channels, dtype=torch.float64)
            for t, conv in enumerate(nd.convs):
                conv.weight.copy_(torch.cat([cs.alpha[t, s] * eye for s in range(3)], 1)[:, :, None, None])
    x = torch.randn(2, *INPUT, dtype=torch.float64)
    a, b = stitch(x), nddr(x)
    for t in ts:
        assert torch.allclose(a[t.name], b[t.name], atol=1e-10)


def test_every_nddr_layer_is_used():
    model = build_model(NDDROptions(), SMALL, tasks(2), INPUT)
    sum(o.sum() for o in model(torch.randn(2, *INPUT)).values()).backward()
    for name, unit in model.mixers():
        assert all(conv.weight.grad.abs().sum() > 0 for conv in unit.convs), name


def test_shortcut_has_one_reduction_per_task_and_the_right_counts():
    k = 3
    ts = tasks(k)
    plain = build_model(NDDROptions(), SMALL, ts, INPUT)
    model = build_model(NDDRShortcutOptions(width=10), SMALL, ts, INPUT)
    (shortcut,) = [b for b in model.body if isinstance(b, NDDRShortcut)]
    channels = [s[0] for s in Backbone(SMALL, INPUT).shapes]  # NDDR after every stage: all kept
    assert len(shortcut.reduce) == k
    per_task = sum(channels) * 10 + 2 * 10
    head_change = sum(count(model.heads[t.name]) - count(plain.heads[t.name]) for t in ts)
    assert count(model) - count(plain) == k * per_task + head_change
    # one conv per task, not one shared: changing task 0's reduction changes only task 0
    model.eval()
    x = torch.randn(2, *INPUT)
    before = model(x)
    with torch.no_grad():
        shortcut.reduce[0][0].weight.mul_(2.0)
    after = model(x)
    assert not torch.allclose(before["t0"], after["t0"])
    for t in ts[1:]:
        assert torch.equal(before[t.name], after[t.name])


def test_shortcut_resizes_every_nddr_output_to_the_last_stage():
    ts = tasks(2)
    model = build_model(NDDRShortcutOptions(after=[1, 3], width=5), SMALL, ts, INPUT).eval()
    (shortcut,) = [b for b in model.body if isinstance(b, NDDRShortcut)]
    shapes = Backbone(SMALL, INPUT).shapes
    assert shortcut.shapes == [shapes[0], shapes[2]] and shortcut.out_shape == (5, *shapes[2][1:])
    captured = {}
    for name, unit in model.mixers():
        unit.register_forward_hook(lambda m, i, o, name=name: captured.setdefault(name, o))
    x = torch.randn(2, *INPUT)
    feats = model.features(x)
    first, last = captured.values()
    for t in range(2):
        small = torch.nn.functional.adaptive_avg_pool2d(first[t], shapes[2][1:])
        expected = shortcut.reduce[t](torch.cat([small, last[t]], 1))
        assert torch.allclose(feats[t], expected, atol=1e-6)
    with pytest.raises(ConfigError, match="model.architecture.after"):
        build_model(NDDRShortcutOptions(after=[5]), SMALL, ts, INPUT)
