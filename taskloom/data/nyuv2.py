"""NYUv2 (Silberman et al., ECCV 2012) in the widely used preprocessed layout (as distributed
with MTAN, Liu, Johns, Davison, CVPR 2019), for users who have it; there is no NYUv2 copy in
this project's shared data, and the tests use small generated fixtures in exactly this layout.

* **Layout.** ``ROOT/{train,val}/{image,label,depth,normal}/{i}.npy``, one file per sample and
  folder, ``i = 0..N-1``: ``image`` ``(H, W, 3)`` float in [0, 1], ``label`` ``(H, W)`` with
  13 classes ``0..12`` and ``-1`` for unlabelled pixels, ``depth`` ``(H, W, 1)`` (0: missing),
  ``normal`` ``(H, W, 3)`` (unit vectors; zero length: missing), at 288 x 384. The release has
  795 ``train`` and 654 ``val`` samples (the standard test set).
* **Splits.** test = ``val/`` (the standard 654-image test set); validation = ``val_size``
  samples of ``train/`` (the ones whose file path has the smallest MD5; default 80), train = the
  rest. Model selection never sees the test set.
* **Tasks.** ``segmentation`` (13 classes, ignore index -1), ``normals``, ``depth``: dense tasks
  whose heads upsample (bilinear) to the input size (an FCN-style head on the last stage of
  any backbone whose last stage is a feature map).
* **Options.** ``size: [H, W]`` resizes every sample (image bilinear; labels, depth, normals
  nearest) to fit a CPU budget; ``flip`` mirrors training samples (the normals' x component,
  channel 0, is negated).

Samples are read lazily (``np.load`` per item; the full set is about 7 GB as float32).
"""
from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from taskloom.data import DATASETS, DataBundle, DataOptions, resolve_root
from taskloom.errors import DataError
from taskloom.dense import DepthTask, NormalsTask, SegmentationTask

FOLDER = "nyuv2"
PARTS = ("image", "label", "depth", "normal")
NUM_CLASSES = 13
IGNORE_INDEX = -1
HOW_TO_GET = (
    "Expected the preprocessed NYUv2 layout train/{image,label,depth,normal}/0.npy ... and val/... "
    "(13-class labels, 288x384), as distributed with MTAN ('End-to-End Multi-Task Learning with Attention', "
    "Liu, Johns, Davison, CVPR 2019: the 'nyuv2.zip' linked from the MTAN GitHub README); the raw data is the "
    "'NYU Depth Dataset V2' page of Silberman et al."
)


@dataclasses.dataclass
class NYUv2Options(DataOptions):
    """Preprocessed NYUv2 (see the module docstring)."""

    name: str = "nyuv2"
    val_size: int = 80
    """Samples of train/ held out for model selection (smallest MD5 of their path)."""
    size: list[int] | None = None
    """``[H, W]`` to resize to; ``null``: the files' size (288 x 384)."""
    flip: bool = False
    """Random horizontal flips of training samples."""
    normals_loss: str = "cosine"
    """``cosine`` or ``l2`` (between unit vectors)."""
    batch_size: int = 8
    eval_batch_size: int = 16

    def __post_init__(self) -> None:
        getattr(super(), "__post_init__", lambda: None)()  # the common loader checks
        if self.val_size < 1:
            raise ValueError("val_size must be positive")
        if self.size is not None and (len(self.size) != 2 or min(self.size) < 8):
            raise ValueError("size must be [H, W] with both at least 8, or null")
        if self.normals_loss not in ("cosine", "l2"):
            raise ValueError("normals_loss must be 'cosine' or 'l2'")


def list_samples(folder: Path) -> list[int]:
    """Sample indices of one split folder, checking that every part has every file."""
    for part in PARTS:
        if not (folder / part).is_dir():
            raise DataError(f"nyuv2: {folder / part} not found. {HOW_TO_GET}")
    indices = []
    for f in (folder / "image").glob("*.npy"):
        if not f.stem.isdigit():
            raise DataError(f"nyuv2: unexpected file {f} (expected {{index}}.npy)")
        indices.append(int(f.stem))
    if not indices:
        raise DataError(f"nyuv2: no .npy files in {folder / 'image'}. {HOW_TO_GET}")
    indices.sort()
    for part in PARTS[1:]:
        missing = [i for i in indices if not (folder / part / f"{i}.npy").is_file()]
        if missing:
            raise DataError(f"nyuv2: {folder / part / f'{missing[0]}.npy'} not found "
                            f"({len(missing)} sample(s) of {folder.name}/image have no {part} file)")
    return indices


class NYUv2Set(Dataset):
    """Lazily loaded samples: ``(image (3, H, W), {segmentation, normals, depth})``."""

    def __init__(self, folder: Path, indices: list[int], size: tuple[int, int] | None, flip: bool = False):
        self.folder, self.indices, self.size, self.flip = folder, list(indices), size, flip

    def __len__(self) -> int:
        return len(self.indices)

    def _load(self, part: str, i: int, ndim: int) -> np.ndarray:
        path = self.folder / part / f"{i}.npy"
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise DataError(f"nyuv2: cannot read {path} ({exc})") from None
        if array.ndim == 2 and ndim == 3:
            array = array[..., None]
        if array.ndim != ndim:
            raise DataError(f"nyuv2: {path} has shape {array.shape}; expected {ndim} dimensions")
        return array

    def __getitem__(self, k: int) -> tuple[Tensor, dict[str, Tensor]]:
        i = self.indices[k]
        image = torch.from_numpy(np.ascontiguousarray(self._load("image", i, 3), dtype=np.float32)).permute(2, 0, 1)
        label = torch.from_numpy(np.ascontiguousarray(self._load("label", i, 2))).round().long()
        depth = torch.from_numpy(np.ascontiguousarray(self._load("depth", i, 3), dtype=np.float32)).permute(2, 0, 1)
        normal = torch.from_numpy(np.ascontiguousarray(self._load("normal", i, 3), dtype=np.float32)).permute(2, 0, 1)
        shape = image.shape[1:]
        if label.shape != shape or depth.shape != (1, *shape) or normal.shape != (3, *shape):
            raise DataError(
                f"nyuv2: sample {i} of {self.folder}: image {tuple(image.shape)}, label {tuple(label.shape)}, depth "
                f"{tuple(depth.shape)}, normal {tuple(normal.shape)} do not match (expected (3,H,W), (H,W), (1,H,W), (3,H,W))"
            )
        bad = (label < IGNORE_INDEX) | (label >= NUM_CLASSES)
        if bad.any():
            raise DataError(f"nyuv2: {self.folder / 'label' / f'{i}.npy'} has labels outside -1..{NUM_CLASSES - 1} "
                            f"(e.g. {int(label[bad][0])})")
        if self.size is not None and tuple(shape) != tuple(self.size):
            image = F.interpolate(image[None], size=self.size, mode="bilinear", align_corners=False)[0]
            label = F.interpolate(label[None, None].float(), size=self.size, mode="nearest")[0, 0].long()
            depth = F.interpolate(depth[None], size=self.size, mode="nearest")[0]
            normal = F.interpolate(normal[None], size=self.size, mode="nearest")[0]
        if self.flip and torch.rand(()) < 0.5:
            image, label, depth, normal = (t.flip(-1) for t in (image, label, depth, normal))
            normal = normal.clone()
            normal[0] = -normal[0]
        return image, {"segmentation": label, "normals": normal, "depth": depth}

    def class_counts(self) -> dict[str, dict[str, int]]:
        """Labelled pixels per class (reads every label file)."""
        counts = np.zeros(NUM_CLASSES + 1, dtype=np.int64)
        for i in self.indices:
            label = np.round(self._load("label", i, 2)).astype(np.int64)
            counts += np.bincount(np.clip(label.ravel() + 1, 0, NUM_CLASSES), minlength=NUM_CLASSES + 1)
        return {"pixels": {"unlabelled": int(counts[0]), **{f"class_{c}": int(counts[c + 1]) for c in range(NUM_CLASSES)}}}


def _digest(name: str) -> str:
    return hashlib.md5(name.encode("utf-8")).hexdigest()


@DATASETS.register("nyuv2", NYUv2Options)
def build_nyuv2(options: NYUv2Options) -> DataBundle:
    """NYUv2 (preprocessed, 13 classes): segmentation, surface normals, depth."""
    root = resolve_root(options, FOLDER, HOW_TO_GET)
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise DataError(f"nyuv2: {root / split} not found. {HOW_TO_GET}")
    train_idx = list_samples(root / "train")
    test_idx = list_samples(root / "val")
    if len(train_idx) <= options.val_size:
        raise DataError(f"nyuv2: {len(train_idx)} training samples, not more than data.val_size={options.val_size}")
    order = sorted(train_idx, key=lambda i: _digest(f"train/image/{i}.npy"))
    val_idx = sorted(order[: options.val_size])
    fit_idx = sorted(set(train_idx) - set(val_idx))
    size = tuple(options.size) if options.size is not None else None
    first = NYUv2Set(root / "train", train_idx[:1], None)[0][0]
    shape = size or tuple(first.shape[1:])
    tasks = [SegmentationTask("segmentation", NUM_CLASSES, IGNORE_INDEX, output_size=shape),
             NormalsTask("normals", options.normals_loss, output_size=shape),
             DepthTask("depth", output_size=shape)]
    return DataBundle(NYUv2Set(root / "train", fit_idx, size, options.flip), NYUv2Set(root / "train", val_idx, size),
                      NYUv2Set(root / "val", test_idx, size), tasks, (3, *shape))
