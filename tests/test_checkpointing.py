"""Activation checkpointing of tower stages gives the same outputs and gradients."""
import copy
import os

import pytest
import torch

from taskloom.architectures import CrossStitchOptions, SingleOptions, build_model
from taskloom.backbones import LeNetOptions, SmallResNetOptions
from taskloom.models import configure_towers
from taskloom.tasks import ClassificationTask

DEVICE = torch.device(os.environ.get("TASKLOOM_TEST_DEVICE", "cpu"))  # benchmarks/gpu_check.sh: cuda


@pytest.mark.parametrize("backbone,shape", [
    (LeNetOptions(channels=[4, 6], hidden=16), (1, 28, 28)),
    (SmallResNetOptions(channels=[4, 8], blocks=[1, 1], stem_channels=4), (1, 16, 16)),
], ids=["lenet", "resnet_small"])
@pytest.mark.parametrize("arch", [SingleOptions(), CrossStitchOptions()], ids=["single", "cross_stitch"])
def test_checkpointed_towers_same_gradients(arch, backbone, shape):
    torch.manual_seed(0)
    tasks = [ClassificationTask(f"t{i}", 5) for i in range(3)]
    plain = build_model(arch, backbone, tasks, shape).to(DEVICE).train()
    ckpt = copy.deepcopy(plain)
    configure_towers(ckpt, "off", checkpoint=True)
    x = torch.randn(4, *shape).to(DEVICE)
    y = {t.name: torch.randint(0, 5, (4,)).to(DEVICE) for t in tasks}
    outs = []
    for m in (plain, ckpt):
        out = m(x)
        sum(m.loss_terms(out, y).values()).backward()
        outs.append(out)
    for name in outs[0]:
        torch.testing.assert_close(outs[1][name], outs[0][name], atol=1e-5, rtol=1e-5)
    grads = dict(plain.named_parameters())
    for n, p in ckpt.named_parameters():
        torch.testing.assert_close(p.grad, grads[n].grad, atol=1e-5, rtol=1e-5, msg=n)
