"""Shared fixtures.

Tests that need the real datasets in ``../shared/data`` skip with a reason on a fresh clone;
``.ci/run`` sets ``TASKLOOM_REQUIRE_SHARED=1`` so that there a missing folder is a failure.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
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


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield
