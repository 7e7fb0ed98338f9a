"""Packed towers (taskloom.packed, REFERENCE §11) equal the loop: outputs, gradients, BatchNorm
running statistics, eval mode; stages they cannot take loop; the config option."""
import copy

import pytest
import torch
from torch import nn

from taskloom.architectures import CrossStitchOptions, NDDROptions, SingleOptions, SluiceOptions, SplitOptions, build_model
from taskloom.backbones import LeNetOptions, SmallResNetOptions, TCDCNOptions
from taskloom.models import TaskParallel, configure_towers
from taskloom.packed import packable, packed_forward
from taskloom.tasks import ClassificationTask

from helpers import DEVICE, assert_same_training_step

TCDCN_BN = TCDCNOptions(batch_norm=True, channels=[4, 6, 8, 8], hidden=16)
CASES = {  # label: architecture, backbone, input shape, stages packed (of all tower stages)
    "cross_stitch-tcdcn_bn": (CrossStitchOptions(), TCDCN_BN, (1, 40, 40), 5),
    "nddr-tcdcn_bn": (NDDROptions(), TCDCN_BN, (1, 40, 40), 5),
    "sluice-lenet": (SluiceOptions(), LeNetOptions(channels=[4, 6], hidden=16), (1, 28, 28), 3),
    "single-lenet": (SingleOptions(), LeNetOptions(channels=[4, 6], hidden=16), (1, 28, 28), 3),
    "split@2-tcdcn_bn": (SplitOptions(at=2), TCDCN_BN, (1, 40, 40), 3),  # first tower stage: a shared input
}


def _tasks(k):
    return [ClassificationTask(f"t{i}", 5 + i) for i in range(k)]


def _pair(arch, backbone, shape, k, dtype):
    torch.manual_seed(0)
    loop = build_model(arch, backbone, _tasks(k), shape).to(DEVICE, dtype)
    packed = copy.deepcopy(loop)
    return loop, packed, configure_towers(packed, "packed")


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("label", list(CASES))
def test_packed_equals_loop(label, k):
    arch, backbone, shape, stages = CASES[label]
    loop, packed, counts = _pair(arch, backbone, shape, k, torch.float64)
    assert counts["packed"] == stages and counts["loop"] == 0
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, *shape, dtype=torch.float64, generator=g).to(DEVICE)
    y = {t.name: torch.randint(0, t.num_classes, (6,), generator=g).to(DEVICE) for t in _tasks(k)}
    for _ in range(2):  # twice: the running statistics after one update feed the second
        assert_same_training_step(loop, packed, x, y, tol=1e-10)
    assert list(packed.state_dict()) == list(loop.state_dict())
    for (name, a), b in zip(loop.state_dict().items(), packed.state_dict().values()):
        torch.testing.assert_close(b, a, atol=1e-12, rtol=0, msg=name)  # running stats, num_batches_tracked
    loop.eval(), packed.eval()
    with torch.no_grad():
        a, b = loop(x), packed(x)
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-12, rtol=0)


def test_packed_float32():
    loop, packed, _ = _pair(CrossStitchOptions(), TCDCN_BN, (1, 40, 40), 3, torch.float32)
    x = torch.randn(16, 1, 40, 40).to(DEVICE)
    y = {t.name: torch.randint(0, t.num_classes, (16,)).to(DEVICE) for t in _tasks(3)}
    assert_same_training_step(loop, packed, x, y, tol=1e-4)


def test_residual_blocks_loop_and_the_stem_packs():
    backbone = SmallResNetOptions(channels=[4, 8], blocks=[1, 1], stem_channels=4)
    loop, packed, counts = _pair(CrossStitchOptions(), backbone, (1, 16, 16), 3, torch.float64)
    assert counts == {"loop": 2, "vmap": 0, "auto": 0, "packed": 1}
    x = torch.randn(4, 1, 16, 16, dtype=torch.float64).to(DEVICE)
    y = {t.name: torch.randint(0, t.num_classes, (4,)).to(DEVICE) for t in _tasks(3)}
    assert_same_training_step(loop, packed, x, y, tol=1e-10)


@pytest.mark.parametrize("bn", [dict(momentum=None), dict(track_running_stats=False), dict(affine=False)])
def test_batchnorm_variants(bn):
    torch.manual_seed(0)
    towers = [nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, groups=1), nn.BatchNorm2d(3, **bn), nn.ReLU(inplace=True),
                            nn.Flatten(), nn.Linear(3 * 5 * 5, 4), nn.BatchNorm1d(4, **bn)).double() for _ in range(3)]
    twins = copy.deepcopy(towers)
    assert packable(towers)
    for train in (True, True, False):
        for m in towers + twins:
            m.train(train)
        xs = [torch.randn(5, 2, 5, 5, dtype=torch.float64) for _ in towers]
        for a, b in zip([m(x) for m, x in zip(towers, xs)], packed_forward(twins, xs)):
            torch.testing.assert_close(b, a, atol=1e-12, rtol=0)
    for m, t in zip(towers, twins):
        for (name, a), b in zip(m.state_dict().items(), t.state_dict().values()):
            torch.testing.assert_close(b, a, atol=1e-12, rtol=0, msg=name)


def test_grouped_conv_on_a_shared_input():
    torch.manual_seed(0)
    towers = [nn.Sequential(nn.Conv2d(4, 6, 3, groups=2), nn.ReLU()) for _ in range(3)]
    x = torch.randn(2, 4, 7, 7)
    for a, b in zip([m(x) for m in towers], packed_forward(towers, [x, x, x])):
        torch.testing.assert_close(b, a)


def test_what_does_not_pack():
    def conv(**kw):
        return nn.Sequential(nn.Conv2d(2, 3, 3, **kw), nn.ReLU())

    assert not packable([conv()])  # one tower
    assert not packable([conv(), conv(stride=2)])  # different hyperparameters
    assert not packable([conv(), nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh())])
    assert not packable([conv(padding_mode="reflect", padding=1)] * 2)
    assert not packable([nn.Sequential(nn.LSTM(3, 3))] * 2)

    class Standardized(nn.Conv2d):  # a subclass may compute something else
        def forward(self, x):
            return super().forward(x) * 2

    assert not packable([nn.Sequential(Standardized(2, 3, 3))] * 2)
    linear_on_maps = [nn.Sequential(nn.Conv2d(2, 3, 3), nn.Linear(3, 4)) for _ in range(2)]
    assert packable(linear_on_maps)  # (shapes are known only at run time)
    with pytest.raises(ValueError, match="linear layers on flat features only"):
        packed_forward(linear_on_maps, [torch.randn(1, 2, 5, 5)] * 2)


def test_config_option_and_mode():
    from taskloom import config as cfg

    c = cfg.from_dict({"model": {"batched_towers": "packed"}})
    assert c.model.batched_towers == "packed"
    model = build_model(CrossStitchOptions(), TCDCN_BN, _tasks(2), (1, 40, 40))
    configure_towers(model, "packed")
    assert {m.mode for m in model.modules() if isinstance(m, TaskParallel)} == {"packed"}
    configure_towers(model, "off")
    assert {m.mode for m in model.modules() if isinstance(m, TaskParallel)} == {"loop"}
