"""CIFAR-100 (Krizhevsky, 2009) with both label sets: ``fine`` (100 classes) and ``coarse``
(20 superclasses), the class / superclass pair the X-ResNet paper names as a benchmark.

* **Files.** torchvision's on-disk format: ``ROOT/cifar-100-python/{train,test,meta}`` pickles
  (``data``: uint8 ``(N, 3072)`` in CHW order, ``fine_labels``, ``coarse_labels``; ``meta``: the
  label names). They are read directly (no checksum, so a generated fixture works); with
  ``download: true`` and no files yet, ``torchvision.datasets.CIFAR100(root, download=True)``
  fetches and verifies them first. Nothing is downloaded otherwise, and never at import.
* **Splits.** test = ``test`` (10,000); validation = ``val_size`` (5,000) images of ``train``
  drawn by a permutation seeded with ``seed`` (default 0); train = the other 45,000.
* **Augmentation** (train, ``augment: true``): random crop 32 from the 4-pixel zero-padded
  image, and horizontal flip.
"""
from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from taskloom.data import DATASETS, DataBundle, DataOptions, resolve_root
from taskloom.errors import DataError
from taskloom.tasks import ClassificationTask

FOLDER = "cifar100"
SUBDIR = "cifar-100-python"
HOW_TO_GET = (
    "Expected cifar-100-python/{train,test,meta} (the 'CIFAR-100 python version' archive from Alex "
    "Krizhevsky's 'The CIFAR-10 and CIFAR-100 datasets' page, unpacked), or set data.download=true to let "
    "torchvision download it into the data root."
)


@dataclasses.dataclass
class CIFAR100Options(DataOptions):
    """CIFAR-100, tasks ``fine`` (100) and ``coarse`` (20)."""

    name: str = "cifar100"
    download: bool = False
    """Download with torchvision into the data root when the files are missing."""
    val_size: int = 5000
    seed: int = 0
    """Seed of the train / val permutation (independent of the training seed)."""
    augment: bool = True

    def __post_init__(self) -> None:
        getattr(super(), "__post_init__", lambda: None)()  # the common loader checks
        if self.val_size < 1:
            raise ValueError("val_size must be positive")


def _load_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            raw = pickle.load(f, encoding="bytes")
    except FileNotFoundError:
        raise DataError(f"cifar100: {path} not found. {HOW_TO_GET}") from None
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise DataError(f"cifar100: {path} is not a readable CIFAR pickle ({exc}); re-download it") from None
    if not isinstance(raw, dict):
        raise DataError(f"cifar100: {path} does not hold a dict")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in raw.items()}


def read_split(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images ``(N, 3, 32, 32)`` uint8, fine and coarse labels of one pickle."""
    d = _load_pickle(path)
    missing = [k for k in ("data", "fine_labels", "coarse_labels") if k not in d]
    if missing:
        raise DataError(f"cifar100: {path} lacks {', '.join(missing)}")
    data = np.asarray(d["data"], dtype=np.uint8)
    fine, coarse = np.asarray(d["fine_labels"], np.int64), np.asarray(d["coarse_labels"], np.int64)
    if data.ndim != 2 or data.shape[1] != 3072 or not len(data) == len(fine) == len(coarse):
        raise DataError(f"cifar100: {path}: data {data.shape}, {len(fine)} fine and {len(coarse)} coarse labels "
                        f"(expected (N, 3072) and N labels each)")
    if len(fine) and (fine.min() < 0 or fine.max() > 99 or coarse.min() < 0 or coarse.max() > 19):
        raise DataError(f"cifar100: {path}: labels out of range (fine 0..99, coarse 0..19)")
    return data.reshape(-1, 3, 32, 32), fine, coarse


class CIFARSet(Dataset):
    def __init__(self, images: Tensor, fine: Tensor, coarse: Tensor, augment: bool = False):
        self.images, self.fine, self.coarse, self.augment = images, fine, coarse, augment

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Tensor, dict[str, Tensor]]:
        x = self.images[i].float().div_(255.0)
        if self.augment:
            dx, dy = torch.randint(0, 9, (2,)).tolist()
            x = F.pad(x, (4, 4, 4, 4))[:, dy:dy + 32, dx:dx + 32]
            if torch.rand(()) < 0.5:
                x = x.flip(-1)
        return x, {"fine": self.fine[i], "coarse": self.coarse[i]}

    def class_counts(self) -> dict[str, dict[str, int]]:
        return {"coarse": {str(c): int((self.coarse == c).sum()) for c in range(20)},
                "fine (min / max per class)": {"min": int(torch.bincount(self.fine, minlength=100).min()),
                                               "max": int(torch.bincount(self.fine, minlength=100).max())}}


@DATASETS.register("cifar100", CIFAR100Options)
def build_cifar100(options: CIFAR100Options) -> DataBundle:
    """CIFAR-100: fine (100-way) and coarse (20-way superclass) classification."""
    if options.download and options.root and not (Path(options.root).expanduser() / SUBDIR / "train").is_file():
        from torchvision.datasets import CIFAR100

        Path(options.root).expanduser().mkdir(parents=True, exist_ok=True)
        CIFAR100(str(Path(options.root).expanduser()), train=True, download=True)
    root = resolve_root(options, FOLDER, HOW_TO_GET)
    folder = root / SUBDIR if (root / SUBDIR).is_dir() else root
    if not (folder / "train").is_file():
        raise DataError(f"cifar100: {folder / 'train'} not found. {HOW_TO_GET}")
    images, fine, coarse = read_split(folder / "train")
    test = read_split(folder / "test")
    if len(images) <= options.val_size:
        raise DataError(f"cifar100: {len(images)} training images, not more than data.val_size={options.val_size}")
    order = np.random.default_rng(options.seed).permutation(len(images))
    val, fit = np.sort(order[: options.val_size]), np.sort(order[options.val_size:])
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    return DataBundle(
        CIFARSet(t(images[fit]), t(fine[fit]), t(coarse[fit]), options.augment),
        CIFARSet(t(images[val]), t(fine[val]), t(coarse[val])),
        CIFARSet(t(test[0]), t(test[1]), t(test[2])),
        [ClassificationTask("fine", 100), ClassificationTask("coarse", 20)], (3, 32, 32),
    )
