"""Datasets: each yields ``(input, {task name: target})`` and declares its tasks.

A dataset is registered with its options class (which extends :class:`DataOptions`, so the
loader settings are common to all) and a builder returning a :class:`DataBundle`.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Callable, ClassVar

from torch.utils.data import Dataset

from taskloom.errors import DataError
from taskloom.registry import Registry
from taskloom.tasks import Task

DATASETS: Registry[DataBundle] = Registry("dataset")

DATA_ENV = "TASKLOOM_DATA"


@dataclasses.dataclass
class DataOptions:
    """Settings common to every dataset; ``name`` picks the dataset."""

    registry: ClassVar[Registry] = DATASETS
    name: str = ""
    root: str | None = None
    """Folder of this dataset's files. Resolution order: ``--data-root`` flag, this key, then
    ``$TASKLOOM_DATA/<dataset folder>``."""
    tasks: list[str] | None = None
    """Train on these tasks only (``null``: all of the dataset's tasks)."""
    batch_size: int = 128
    eval_batch_size: int = 512
    num_workers: int = 0


@dataclasses.dataclass
class DataBundle:
    """Train/val/test splits of one dataset with its tasks and input shape."""

    train: Dataset
    val: Dataset
    test: Dataset
    tasks: list[Task]
    input_shape: tuple[int, ...]

    def split(self, name: str) -> Dataset:
        return {"train": self.train, "val": self.val, "test": self.test}[name]


def resolve_root(options: DataOptions, folder: str, how_to_get: str) -> Path:
    """The dataset folder: ``options.root`` (the CLI flag overrides it) or ``$TASKLOOM_DATA/folder``."""
    if options.root:
        root, origin = Path(options.root).expanduser(), "data.root / --data-root"
    elif os.environ.get(DATA_ENV):
        root, origin = Path(os.environ[DATA_ENV]).expanduser() / folder, f"${DATA_ENV}/{folder}"
    else:
        raise DataError(
            f"{options.name}: no data folder given. Pass --data-root DIR, set data.root, or set "
            f"{DATA_ENV} to a folder containing '{folder}/'. {how_to_get}"
        )
    if not root.is_dir():
        raise DataError(f"{options.name}: data folder {root} (from {origin}) does not exist. {how_to_get}")
    return root


def build_data(options: DataOptions) -> DataBundle:
    """Build a dataset's splits, keeping only the tasks ``options.tasks`` names."""
    bundle = DATASETS[options.name].builder(options)
    if options.tasks is not None:
        known = {t.name: t for t in bundle.tasks}
        unknown = [n for n in options.tasks if n not in known]
        if unknown or not options.tasks:
            raise DataError(
                f"data.tasks: {unknown or '[]'} not available; {options.name} has tasks {sorted(known)}"
            )
        bundle.tasks = [known[n] for n in options.tasks]
    return bundle


Builder = Callable[[DataOptions], DataBundle]

# Register the built-in datasets.
from taskloom.data import multimnist  # noqa: E402,F401
