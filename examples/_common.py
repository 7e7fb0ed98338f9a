"""Shared settings of the examples: ``--quick`` (used by the test suite) trains on a few hundred
MultiMNIST pairs for one epoch; without it, a few thousand pairs for two epochs."""
from __future__ import annotations

import sys
import tempfile


def settings() -> dict:
    quick = "--quick" in sys.argv
    pairs = (256, 128, 128) if quick else (4000, 1000, 1000)
    return {"data": {"name": "multimnist", "train_pairs": pairs[0], "val_pairs": pairs[1], "test_pairs": pairs[2],
                     "batch_size": 64},
            "train": {"epochs": 1 if quick else 2, "threads": 1, "progress": False}}


def run_dir(name: str) -> str:
    return sys.argv[sys.argv.index("--run-dir") + 1] if "--run-dir" in sys.argv else tempfile.mkdtemp(prefix=name)
