"""Activation checkpointing of tower stages gives the same outputs and gradients."""
import copy

import pytest
import torch

from taskloom.architectures import CrossStitchOptions, SingleOptions, build_model
from taskloom.backbones import LeNetOptions, SmallResNetOptions, TCDCNOptions
from taskloom.models import configure_towers
from taskloom.tasks import ClassificationTask

from helpers import DEVICE, assert_same_training_step


@pytest.mark.parametrize("backbone,shape", [
    (LeNetOptions(channels=[4, 6], hidden=16), (1, 28, 28)),
    (SmallResNetOptions(channels=[4, 8], blocks=[1, 1], stem_channels=4), (1, 16, 16)),
    (TCDCNOptions(batch_norm=True, channels=[4, 6, 8, 8], hidden=16), (1, 40, 40)),
], ids=["lenet", "resnet_small", "tcdcn_bn"])
@pytest.mark.parametrize("arch", [SingleOptions(), CrossStitchOptions()], ids=["single", "cross_stitch"])
@pytest.mark.parametrize("batched", ["off", "packed"])
def test_checkpointed_towers_same_gradients(arch, backbone, shape, batched):
    torch.manual_seed(0)
    tasks = [ClassificationTask(f"t{i}", 5) for i in range(3)]
    plain = build_model(arch, backbone, tasks, shape).to(DEVICE).train()
    ckpt = copy.deepcopy(plain)
    configure_towers(ckpt, batched, checkpoint=True)
    x = torch.randn(4, *shape).to(DEVICE)
    y = {t.name: torch.randint(0, 5, (4,)).to(DEVICE) for t in tasks}
    assert_same_training_step(plain, ckpt, x, y)
    assert all(p.grad is not None for p in ckpt.parameters())
    # the recomputation in backward must not update BatchNorm's running statistics a second time
    for (name, a), b in zip(plain.state_dict().items(), ckpt.state_dict().values()):
        torch.testing.assert_close(b, a, msg=name)
