"""Batched (vmap) execution of the task towers equals the loop: forward, gradients, state_dict."""
import copy

import pytest
import torch

from taskloom.architectures import CrossStitchOptions, NDDROptions, SingleOptions, SluiceOptions, build_model
from taskloom.backbones import LeNetOptions, SmallResNetOptions, TCDCNOptions
from taskloom.models import TaskParallel, configure_towers
from taskloom.tasks import ClassificationTask

from helpers import DEVICE, assert_same_training_step


def _tasks(k):
    return [ClassificationTask(f"t{i}", 5 + i) for i in range(k)]


def _compare(arch, backbone, shape, k, batched="on", batch=4, dtype=torch.float32):
    torch.manual_seed(0)
    tasks = _tasks(k)
    loop = build_model(arch, backbone, tasks, shape).to(DEVICE, dtype)
    fast = copy.deepcopy(loop)
    counts = configure_towers(fast, batched)
    x = torch.randn(batch, *shape, dtype=dtype).to(DEVICE)
    y = {t.name: torch.randint(0, t.num_classes if hasattr(t, "num_classes") else 5, (batch,)).to(DEVICE) for t in tasks}
    assert_same_training_step(loop, fast, x, y)
    assert list(fast.state_dict()) == list(loop.state_dict())
    return counts


# Same computation, different float32 summation order (grouped conv, batched matmul): in float64
# the two agree to ~1e-12; in float32 a BatchNorm over a tiny batch in NDDR's mixers amplifies the
# rounding differences to ~2e-5 relative, so NDDR is compared in float64, the others in both.
_CASES = [(arch, dtype) for arch in ("single", "cross_stitch", "nddr", "sluice")
          for dtype in ("f32", "f64") if (arch, dtype) != ("nddr", "f32")]
_ARCHS = {"single": SingleOptions, "cross_stitch": CrossStitchOptions, "nddr": NDDROptions, "sluice": SluiceOptions}


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("arch_name, dtype_name", _CASES, ids=[f"{a}-{d}" for a, d in _CASES])
def test_vmap_equals_loop_lenet(arch_name, dtype_name, k):
    arch = _ARCHS[arch_name]()
    dtype = {"f32": torch.float32, "f64": torch.float64}[dtype_name]
    counts = _compare(arch, LeNetOptions(channels=[4, 6], hidden=16), (1, 28, 28), k, dtype=dtype)
    assert counts["vmap"] == 3 and counts["loop"] == 0


def test_vmap_equals_loop_tcdcn():
    counts = _compare(CrossStitchOptions(), TCDCNOptions(channels=[4, 6, 8, 8], hidden=16), (1, 40, 40), 3)
    assert counts == {"vmap": 5, "loop": 0, "auto": 0, "packed": 0}


def test_auto_mode():
    # conv stages get "auto" (vmap on a GPU, loop on CPU); the fully connected stage stays a loop
    counts = _compare(CrossStitchOptions(), TCDCNOptions(channels=[4, 6, 8, 8], hidden=16), (1, 40, 40), 3, "auto")
    assert counts == {"vmap": 0, "loop": 1, "auto": 4, "packed": 0}
    counts = _compare(CrossStitchOptions(), TCDCNOptions(channels=[4, 6, 8, 8], hidden=16), (1, 40, 40), 2, "auto")
    assert counts == {"vmap": 0, "loop": 5, "auto": 0, "packed": 0}


def test_batchnorm_towers_fall_back_to_loop():
    counts = _compare(SingleOptions(), SmallResNetOptions(channels=[4, 8], blocks=[1, 1], stem_channels=4),
                      (1, 16, 16), 3)
    assert counts == {"vmap": 0, "loop": 3, "auto": 0, "packed": 0}


def test_vmap_eval_and_no_grad():
    torch.manual_seed(0)
    loop = build_model(CrossStitchOptions(), LeNetOptions(channels=[4, 6], hidden=16), _tasks(3), (1, 28, 28)).eval()
    fast = copy.deepcopy(loop)
    configure_towers(fast, "on")
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        a, b = loop(x), fast(x)
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-5, rtol=1e-5)


def test_off_is_default_and_bad_value():
    model = build_model(SingleOptions(), LeNetOptions(channels=[4, 6], hidden=16), _tasks(2), (1, 28, 28))
    assert all(m.mode == "loop" and not m.checkpoint for m in model.modules() if isinstance(m, TaskParallel))
    with pytest.raises(ValueError):
        configure_towers(model, "yes")


def test_config_option():
    from taskloom import config as cfg

    c = cfg.from_dict({"model": {"batched_towers": "auto"}, "train": {"checkpoint_towers": True}})
    assert c.model.batched_towers == "auto" and c.train.checkpoint_towers is True
    assert cfg.Config().model.batched_towers == "off"
