"""Datasets: each yields ``(input, {task name: target})`` and declares its tasks.

A dataset is registered with its options class (which extends :class:`DataOptions`, so the
loader settings are common to all) and a builder returning a :class:`DataBundle`.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import ClassVar, Literal

import torch

from torch.utils.data import Dataset

from taskloom.errors import DataError
from taskloom.registry import Registry
from taskloom.tasks import Task

DATASETS: Registry[DataBundle] = Registry("dataset")

DATA_ENV = "TASKLOOM_DATA"


@dataclasses.dataclass
class DropLabelsOptions:
    """Remove the targets of some tasks from a seeded fraction of a split's samples (partial
    labels): those targets are replaced by the task's "missing" marker (``-1`` for
    classification / binary, ``NaN`` otherwise), which losses and metrics skip."""

    tasks: list[str] = dataclasses.field(default_factory=list)
    """Tasks whose labels are dropped (the same samples lose all of them)."""
    fraction: float = 0.0
    """Fraction of the split's samples that lose these labels (rounded to a whole count)."""
    seed: int = 0
    """Seed of the choice of samples (independent of the training seed)."""
    splits: list[Literal["train", "val", "test"]] = dataclasses.field(default_factory=lambda: ["train"])
    """Splits to drop labels from (default: training only, so evaluation stays complete)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.fraction <= 1.0:
            raise ValueError(f"fraction must be in [0, 1], got {self.fraction}")


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
    drop_labels: DropLabelsOptions | None = None
    """Simulate partially labelled data: ``{tasks: [gender, smile], fraction: 0.7, seed: 0}``
    removes those labels from 70% of the training samples (``null``: keep every label)."""
    train_size: int | None = None
    """Train on a random subset of this many training samples (reduced budgets). The subset is
    drawn with a fixed generator, independent of ``seed``, so every run of a comparison sees the
    same images; validation and test splits are untouched (``null``: the whole training split)."""

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.eval_batch_size < 1 or self.num_workers < 0:
            raise ValueError("batch_size and eval_batch_size must be >= 1 and num_workers >= 0")
        if self.train_size is not None and self.train_size < 1:
            raise ValueError(f"train_size must be positive or null, got {self.train_size}")


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


def default_data_home() -> Path:
    """The documented last resort: ``$XDG_DATA_HOME/taskloom`` (``~/.local/share/taskloom``)."""
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "taskloom"


def resolve_root(options: DataOptions, folder: str, how_to_get: str) -> Path:
    """The dataset folder, first found of: ``options.root`` (the ``--data-root`` flag sets it),
    ``$TASKLOOM_DATA/<folder>``, ``default_data_home()/<folder>``."""
    if options.root:
        root, origin = Path(options.root).expanduser(), "data.root / --data-root"
    elif os.environ.get(DATA_ENV):
        root, origin = Path(os.environ[DATA_ENV]).expanduser() / folder, f"${DATA_ENV}/{folder}"
    else:
        root, origin = default_data_home() / folder, "the default data folder"
        if not root.is_dir():
            raise DataError(
                f"{options.name}: no data folder given and {root} does not exist. Pass --data-root DIR, set "
                f"data.root, set {DATA_ENV} to a folder containing '{folder}/', or put the files in {root}. "
                f"{how_to_get}"
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
    if options.train_size is not None:
        if options.train_size > len(bundle.train):
            raise DataError(f"data.train_size: {options.train_size} exceeds the {len(bundle.train)} training "
                            f"samples of {options.name}")
        bundle.train = TrainSubset(bundle.train, options.train_size)
    if options.drop_labels is not None and options.drop_labels.tasks and options.drop_labels.fraction > 0:
        drop = options.drop_labels
        known = {t.name: t for t in bundle.tasks}
        unknown = [n for n in drop.tasks if n not in known]
        if unknown:
            raise DataError(f"data.drop_labels.tasks: {unknown} not among the tasks {sorted(known)}")
        for k, split in enumerate(drop.splits):
            dataset = bundle.split(split)
            wrapped = PartialLabels(dataset, [known[n] for n in drop.tasks], drop.fraction, drop.seed + 7919 * k)
            setattr(bundle, split, wrapped)
    return bundle


class _Wrapper(Dataset):
    """A dataset over another one that exposes the wrapped dataset's helpers."""

    dataset: Dataset

    def __getattr__(self, name: str):  # class_counts, boxes, ...
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


class TrainSubset(_Wrapper):
    """A fixed random subset of ``size`` samples of ``dataset`` (the same for every run)."""

    def __init__(self, dataset: Dataset, size: int):
        import numpy as np

        self.dataset = dataset
        rng = np.random.default_rng(0x5B5E7)
        self.index = torch.from_numpy(np.sort(rng.permutation(len(dataset))[:size]))

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int):
        return self.dataset[int(self.index[i])]


class PartialLabels(_Wrapper):
    """A dataset whose ``tasks`` lose their targets on a seeded ``fraction`` of the samples
    (replaced by :meth:`Task.missing_like`). Works on any dataset yielding ``(x, {task: y})``."""

    def __init__(self, dataset: Dataset, tasks: list[Task], fraction: float, seed: int = 0):
        self.dataset, self.tasks = dataset, list(tasks)
        import numpy as np

        n = len(dataset)
        # numpy's generator, seeded with a tag: a torch.randperm seeded alike would equal the
        # trainer's first-epoch shuffle (seed 0), putting every dropped sample in the first batches.
        rng = np.random.default_rng([seed, 0x0D0D1AB5])
        chosen = torch.from_numpy(rng.permutation(n)[: round(fraction * n)])
        self.dropped = torch.zeros(n, dtype=torch.bool)
        self.dropped[chosen] = True

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        x, y = self.dataset[i]
        if self.dropped[i]:
            y = dict(y)
            for t in self.tasks:
                y[t.name] = t.missing_like(torch.as_tensor(y[t.name]))
        return x, y


# Register the built-in datasets.
from taskloom.data import multimnist  # noqa: E402,F401
from taskloom.data import mtfl  # noqa: E402,F401
from taskloom.data import utkface  # noqa: E402,F401
from taskloom.data import nyuv2  # noqa: E402,F401
from taskloom.data import cifar100  # noqa: E402,F401
from taskloom.data import manifest  # noqa: E402,F401
from taskloom.data import mix  # noqa: E402,F401
from taskloom.data import packed  # noqa: E402,F401
from taskloom.data import pets  # noqa: E402,F401
