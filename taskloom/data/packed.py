"""Packed datasets: the arrays of MTFL or UTKFace as the original loaders make them, stored
compactly and served a whole batch at a time, optionally from GPU memory.

A *pack* is a folder written by :func:`write_pack` (``scripts/gpu_record.py pack`` writes the MTFL
and UTKFace packs of the GPU record)::

    meta.json                 dataset, input shape, splits, flip rule, source options, checksums
    {split}_images.med.xz     uint8 images, lossless (colour decorrelation + JPEG-LS's MED
                              predictor + LZMA: about half the raw size of these faces)
    {split}_images.npy        or the same images raw (what :func:`unpack` writes; read first)
    {split}_targets.npz       one array per task (the loaders' dtypes and shapes)

The images and targets are exactly the tensors the ``mtfl`` / ``utkface`` loaders build (same
crops, resizing, splits and label coding), so a run on ``data.name: packed`` trains on the same
samples as one on the original loader; the tasks are built by those loaders' own ``make_tasks``
from the task options below, with the same names and defaults. What differs:

* **Batches, not samples.** The dataset implements ``__getitems__``: a batch is gathered with one
  ``index_select`` and flipped with one ``torch.where`` instead of per sample. Flips draw
  ``torch.rand(batch)`` from the global CPU generator (so resumed runs stay exact) instead of one
  draw per sample: the flip pattern differs from the per-sample loader's, the rule does not
  (MTFL: image mirrored, ``u -> 1 - u``, left/right landmarks swapped, pose mirrored).
* **On the GPU** (``data.device: cuda`` or ``auto``): the uint8 images are moved to the device once
  (MTFL 21 MB, UTKFace at 32x32 73 MB) and batches are gathered there; targets stay on the CPU
  (they are a few hundred bytes per batch, and code such as ``taskloom compare``'s class counts
  reads them there). Needs ``data.num_workers: 0``.
* **Training subsets** use ``data.subset`` (the same fixed draw as ``data.train_size``, applied
  inside the pack) because the generic ``train_size`` / ``drop_labels`` wrappers index sample by
  sample.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import lzma
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from taskloom.data import DATASETS, DataBundle, DataOptions, resolve_root
from taskloom.errors import DataError

FOLDER = "packed"
FORMAT = 1
SPLITS = ("train", "val", "test")
HOW_TO_GET = ("A pack is written by `python scripts/gpu_record.py pack` (from the mtfl / utkface data) "
              "or taskloom.data.packed.write_pack.")
SUBSET_SEED = 0x5B5E7  # the generator of taskloom.data.TrainSubset (data.train_size)


@dataclasses.dataclass
class PackedOptions(DataOptions):
    """A pack written by :func:`write_pack` (see the module docstring)."""

    name: str = "packed"
    pack: str | None = None
    """Subfolder of ``root`` holding the pack's ``meta.json`` (``null``: ``root`` itself)."""
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    """Where the images live: ``cuda`` (moved to the GPU once, batches gathered there), ``auto``
    (``cuda`` when available) or ``cpu``."""
    flip: bool = True
    """Random horizontal flips of training images, with the source dataset's flip rule."""
    subset: int | None = None
    """Train on a fixed random subset of this many of the pack's training samples (the draw of
    ``data.train_size``; ``null``: all)."""
    size: int | None = None
    """Side of the images; must equal the pack's when given (``null``: the pack's)."""
    # Task options of the source datasets (same names and defaults as theirs).
    iod_threshold: float = 0.10
    """MTFL: landmark failure threshold (fraction of the inter-ocular distance)."""
    box_threshold: float = 0.05
    """MTFL: landmark failure threshold (fraction of the face-box width)."""
    age_task: Literal["regression", "ordinal_expectation"] = "regression"
    """UTKFace: how age is predicted (see the utkface dataset)."""
    age_loss: Literal["l1", "mse"] = "l1"
    """UTKFace: loss of the ``regression`` age task."""
    age_mean: float = 33.0
    """UTKFace ``regression``: the head predicts ``age_mean + age_scale * z``."""
    age_scale: float = 20.0
    """UTKFace ``regression``: see ``age_mean``."""
    age_low: int = 1
    """UTKFace ``ordinal_expectation``: lowest age of the softmax."""
    age_high: int = 116
    """UTKFace ``ordinal_expectation``: highest age of the softmax."""

    def __post_init__(self) -> None:
        getattr(super(), "__post_init__", lambda: None)()
        if self.subset is not None and self.subset < 1:
            raise ValueError("subset must be positive or null")


# --------------------------------------------------------------------------- image codec


def _med_residuals(a: np.ndarray) -> np.ndarray:
    """JPEG-LS's median edge detector over the last two axes: ``a - prediction`` mod 256.
    Neighbours outside the image count as 0."""
    a = a.astype(np.int16)
    left = np.zeros_like(a)
    left[..., 1:] = a[..., :-1]
    up = np.zeros_like(a)
    up[..., 1:, :] = a[..., :-1, :]
    ul = np.zeros_like(a)
    ul[..., 1:, 1:] = a[..., :-1, :-1]
    hi, lo = np.maximum(left, up), np.minimum(left, up)
    pred = np.where(ul >= hi, lo, np.where(ul <= lo, hi, left + up - ul))
    return ((a - pred) & 255).astype(np.uint8)


def _med_decode(res: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_med_residuals` (pixel by pixel, vectorised over the leading axes)."""
    h, w = res.shape[-2:]
    r = np.ascontiguousarray(np.moveaxis(res, (-2, -1), (0, 1))).astype(np.int16)  # (H, W, ...)
    out = np.zeros_like(r)
    zero = np.zeros(r.shape[2:], np.int16)
    for i in range(h):
        for j in range(w):
            left = out[i, j - 1] if j else zero
            up = out[i - 1, j] if i else zero
            ul = out[i - 1, j - 1] if i and j else zero
            hi, lo = np.maximum(left, up), np.minimum(left, up)
            pred = np.where(ul >= hi, lo, np.where(ul <= lo, hi, left + up - ul))
            out[i, j] = (r[i, j] + pred) & 255
    return np.moveaxis(out.astype(np.uint8), (0, 1), (-2, -1)).copy()


def encode_images(images: np.ndarray) -> bytes:
    """Lossless, compact bytes of ``(N, C, H, W)`` uint8 images: for 3 channels ``(R - G, G,
    B - G)`` mod 256, then MED residuals per plane, then LZMA (preset 6)."""
    a = np.asarray(images, dtype=np.uint8)
    if a.ndim != 4:
        raise ValueError(f"expected (N, C, H, W) images, got shape {a.shape}")
    if a.shape[1] == 3:
        g = a[:, 1].astype(np.int16)
        a = np.stack([(a[:, 0] - g) & 255, g, (a[:, 2] - g) & 255], 1).astype(np.uint8)
    return lzma.compress(_med_residuals(a).tobytes(), preset=6)


def decode_images(blob: bytes, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of :func:`encode_images`."""
    res = np.frombuffer(lzma.decompress(blob), dtype=np.uint8).reshape(shape)
    a = _med_decode(res)
    if shape[1] == 3:
        g = a[:, 1].astype(np.int16)
        a = np.stack([(a[:, 0] + g) & 255, g, (a[:, 2] + g) & 255], 1).astype(np.uint8)
    return a


def _digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()[:16]


# --------------------------------------------------------------------------- writing


def subset_index(n: int, size: int) -> np.ndarray:
    """The sorted indices ``data.train_size=size`` keeps of ``n`` training samples (nested: a
    smaller size keeps a subset of a larger one's samples)."""
    if not 1 <= size <= n:
        raise DataError(f"subset size {size} must be in 1..{n}")
    return np.sort(np.random.default_rng(SUBSET_SEED).permutation(n)[:size])


def bundle_arrays(bundle: DataBundle) -> dict[str, dict[str, Any]]:
    """``{split: {"images": (N, C, H, W) uint8, "targets": {task: array}, "paths": [...]}}`` of
    an ``mtfl`` or ``utkface`` bundle (whole splits: without ``train_size`` or label dropping)."""
    out = {}
    for split in SPLITS:
        ds = bundle.split(split)
        if not hasattr(ds, "images"):
            raise DataError(f"packed: the {split} split ({type(ds).__name__}) has no cached images to pack; "
                            f"pack the whole dataset (no data.train_size / drop_labels)")
        if hasattr(ds, "attributes"):  # mtfl.FaceSet
            from taskloom.data.mtfl import ATTRIBUTES

            targets = {"landmarks": ds.landmarks.numpy()}
            targets.update({name: ds.attributes[:, k].numpy() for k, name in enumerate(ATTRIBUTES)})
        else:  # a ManifestSet (utkface)
            targets = {k: v.numpy() for k, v in ds.targets.items()}
        out[split] = {"images": ds.images.numpy(), "targets": targets, "paths": list(ds.paths)}
    return out


FLIP_RULES = {
    "mtfl": {"points": {"landmarks": [1, 0, 2, 4, 3]}, "classes": {"pose": [4, 3, 2, 1, 0]}},
    "utkface": {"points": {}, "classes": {}},
}


def write_pack(folder: str | Path, dataset: str, arrays: dict[str, dict[str, Any]], *,
               source: dict[str, Any] | None = None, train_size: int | None = None,
               raw: bool = False) -> dict[str, Any]:
    """Write ``arrays`` (from :func:`bundle_arrays`) of ``dataset`` (``mtfl`` or ``utkface``) as a
    pack; ``train_size`` keeps that many training samples (the draw of ``data.train_size``);
    ``raw`` stores ``.npy`` images instead of the compressed form. Returns the meta mapping."""
    if dataset not in FLIP_RULES:
        raise DataError(f"packed: unknown dataset {dataset!r}; choose one of {sorted(FLIP_RULES)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {"format": FORMAT, "dataset": dataset, "flip": FLIP_RULES[dataset],
                            "source": source or {}, "splits": {}}
    for split in SPLITS:
        part = arrays[split]
        images, targets, paths = part["images"], dict(part["targets"]), list(part["paths"])
        full = len(images)
        if split == "train" and train_size is not None and train_size < full:
            keep = subset_index(full, train_size)
            images, paths = images[keep], [paths[i] for i in keep]
            targets = {k: v[keep] for k, v in targets.items()}
        images = np.ascontiguousarray(images, dtype=np.uint8)
        entry = {"count": len(images), "of": full, "shape": list(images.shape), "sha256": _digest(images),
                 "targets": {k: {"dtype": str(v.dtype), "shape": list(v.shape)} for k, v in targets.items()}}
        if raw:
            np.save(folder / f"{split}_images.npy", images)
            entry["images"] = f"{split}_images.npy"
        else:
            (folder / f"{split}_images.med.xz").write_bytes(encode_images(images))
            entry["images"] = f"{split}_images.med.xz"
        np.savez_compressed(folder / f"{split}_targets.npz", **targets,
                            __paths__=np.array(json.dumps(paths)))
        meta["splits"][split] = entry
    first = arrays["train"]["images"]
    meta["input_shape"] = list(first.shape[1:])
    (folder / "meta.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    return meta


def unpack(src: str | Path, dest: str | Path) -> Path:
    """Copy a pack to ``dest`` with its images decoded to ``.npy`` (fast, memory-mapped loads:
    every training process then skips the decoding). Checks the images' checksums."""
    src, dest = Path(src), Path(dest)
    meta = read_meta(src)
    dest.mkdir(parents=True, exist_ok=True)
    for split, entry in meta["splits"].items():
        images = _load_images(src, entry)
        if _digest(images) != entry["sha256"]:
            raise DataError(f"packed: {src / entry['images']} does not decode to the packed images (checksum)")
        np.save(dest / f"{split}_images.npy", images)
        entry["images"] = f"{split}_images.npy"
        (dest / f"{split}_targets.npz").write_bytes((src / f"{split}_targets.npz").read_bytes())
    (dest / "meta.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    return dest


# --------------------------------------------------------------------------- reading


def read_meta(folder: Path) -> dict[str, Any]:
    path = Path(folder) / "meta.json"
    if not path.is_file():
        raise DataError(f"packed: {path} not found. {HOW_TO_GET}")
    meta = json.loads(path.read_text(encoding="utf-8"))
    if meta.get("format") != FORMAT:
        raise DataError(f"packed: {path} has format {meta.get('format')!r}; this taskloom reads format {FORMAT}")
    return meta


def _load_images(folder: Path, entry: dict[str, Any]) -> np.ndarray:
    file = Path(folder) / entry["images"]
    if not file.is_file():
        raise DataError(f"packed: {file} not found. {HOW_TO_GET}")
    if file.suffix == ".npy":
        return np.load(file)
    return decode_images(file.read_bytes(), tuple(entry["shape"]))


def load_split(folder: Path, meta: dict[str, Any], split: str) -> tuple[np.ndarray, dict[str, np.ndarray], list[str]]:
    entry = meta["splits"][split]
    images = _load_images(folder, entry)
    with np.load(Path(folder) / f"{split}_targets.npz") as npz:
        targets = {k: npz[k] for k in npz.files if k != "__paths__"}
        paths = json.loads(str(npz["__paths__"])) if "__paths__" in npz.files else []
    return images, targets, paths


class Batch:
    """One collated batch ``(x, {task: y})``: iterable as that pair. ``pin_memory`` pins what is
    on the CPU and leaves tensors already on a GPU as they are (a ``DataLoader`` with
    ``pin_memory=True`` would otherwise fail on them)."""

    __slots__ = ("x", "y")

    def __init__(self, x: Tensor, y: dict[str, Tensor]):
        self.x, self.y = x, y

    def __iter__(self):
        yield self.x
        yield self.y

    def pin_memory(self, device: Any = None) -> Batch:
        x = self.x.pin_memory() if self.x.device.type == "cpu" else self.x
        return Batch(x, {k: v.pin_memory() if v.device.type == "cpu" else v for k, v in self.y.items()})


def _collate_batch(batch, *, collate_fn_map=None):
    return batch[0]


# A DataLoader collates what __getitems__ returns, [Batch], with default_collate: this entry
# (the documented extension point of default_collate) hands the Batch through unchanged.
from torch.utils.data._utils.collate import default_collate_fn_map  # noqa: E402

default_collate_fn_map[Batch] = _collate_batch


class PackedSet(Dataset):
    """Images ``(N, C, S, S)`` uint8 (on the CPU or a GPU) and per-task targets (CPU)."""

    def __init__(self, images: Tensor, targets: dict[str, Tensor], paths: list[str], flip: bool = False,
                 flip_rule: dict[str, Any] | None = None):
        self.images, self.targets, self.paths, self.flip = images, targets, paths, flip
        rule = flip_rule or {"points": {}, "classes": {}}
        self._flip_points = {k: torch.tensor(v) for k, v in rule.get("points", {}).items() if k in targets}
        self._flip_classes = {k: torch.tensor(v) for k, v in rule.get("classes", {}).items() if k in targets}

    def __len__(self) -> int:
        return len(self.images)

    def _flip_targets(self, y: dict[str, Tensor], mask: Tensor) -> dict[str, Tensor]:
        y = dict(y)
        for name, order in self._flip_points.items():
            points = y[name][:, order].clone()
            points[..., 0] = 1.0 - points[..., 0]
            y[name] = torch.where(mask.view(-1, *([1] * (points.dim() - 1))), points, y[name])
        for name, mapping in self._flip_classes.items():
            y[name] = torch.where(mask, mapping[y[name]], y[name])
        return y

    def __getitem__(self, i: int) -> tuple[Tensor, dict[str, Tensor]]:
        x = self.images[i].float().div_(255.0)
        y = {k: v[i] for k, v in self.targets.items()}
        if self.flip and torch.rand(()) < 0.5:
            x = torch.flip(x, dims=[-1])
            y = {k: v[0] for k, v in self._flip_targets({k: v[None] for k, v in y.items()}, torch.ones(1, dtype=torch.bool)).items()}
        return x, y

    def __getitems__(self, indices: list[int]) -> list[Batch]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        y = {k: v.index_select(0, idx) for k, v in self.targets.items()}
        mask = torch.rand(len(idx)) < 0.5 if self.flip else None
        if mask is not None:
            y = self._flip_targets(y, mask)
        if self.images.device.type != "cpu":  # one small copy: index * 2 + flip bit
            code = (idx * 2 + mask) if mask is not None else idx
            code = code.to(self.images.device)
            if mask is not None:
                idx, mask = code >> 1, (code & 1).bool()
            else:
                idx = code
        x = self.images.index_select(0, idx).float().div_(255.0)
        if mask is not None:
            x = torch.where(mask.view(-1, 1, 1, 1), x.flip(-1), x)
        return [Batch(x, y)]

    def subset(self, index: np.ndarray) -> PackedSet:
        idx = torch.as_tensor(np.asarray(index, dtype=np.int64))
        images = self.images[idx.to(self.images.device)]
        out = PackedSet(images, {k: v[idx] for k, v in self.targets.items()},
                        [self.paths[i] for i in idx.tolist()] if self.paths else [], self.flip)
        out._flip_points, out._flip_classes = self._flip_points, self._flip_classes
        return out

    def to(self, device: torch.device | str) -> PackedSet:
        """Move the images to ``device`` (in place); returns ``self``."""
        self.images = self.images.to(device)
        return self


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DataError("data.device: 'cuda' requested but no CUDA device is available (use auto or cpu)")
    return torch.device(name)


def make_tasks(meta: dict[str, Any], options: PackedOptions) -> list:
    if meta["dataset"] == "mtfl":
        from taskloom.data import mtfl

        return mtfl.make_tasks(mtfl.MTFLOptions(iod_threshold=options.iod_threshold, box_threshold=options.box_threshold))
    from taskloom.data import utkface

    return utkface.make_tasks(utkface.UTKFaceOptions(
        age_task=options.age_task, age_loss=options.age_loss, age_mean=options.age_mean,
        age_scale=options.age_scale, age_low=options.age_low, age_high=options.age_high))


@DATASETS.register("packed", PackedOptions)
def build_packed(options: PackedOptions) -> DataBundle:
    """A pack of MTFL or UTKFace arrays (scripts/gpu_record.py pack), optionally held on the GPU."""
    if options.train_size is not None:
        raise DataError("packed: data.train_size wraps the set sample by sample; use data.subset "
                        "(the same fixed draw, applied inside the pack)")
    if options.drop_labels is not None and options.drop_labels.tasks and options.drop_labels.fraction > 0:
        raise DataError("packed: data.drop_labels is not supported; use the source dataset (mtfl / utkface)")
    root = resolve_root(options, FOLDER, HOW_TO_GET)
    folder = root / options.pack if options.pack else root
    meta = read_meta(folder)
    shape = tuple(meta["input_shape"])
    if options.size is not None and options.size != shape[-1]:
        raise DataError(f"packed: data.size={options.size} but the pack {folder} holds {shape[-1]}x{shape[-1]} images")
    device = resolve_device(options.device)
    if device.type != "cpu" and options.num_workers:
        raise DataError("packed: data.device on a GPU needs data.num_workers=0 (batches are gathered on the GPU)")
    sets = {}
    for split in SPLITS:
        images, targets, paths = load_split(folder, meta, split)
        if split == "train" and options.subset is not None:
            if options.subset > len(images):
                raise DataError(f"data.subset: {options.subset} exceeds the {len(images)} training samples of {folder}")
            keep = subset_index(len(images), options.subset)
            images, paths = images[keep], [paths[i] for i in keep] if paths else []
            targets = {k: v[keep] for k, v in targets.items()}
        tensor = torch.from_numpy(np.ascontiguousarray(images)).to(device)
        sets[split] = PackedSet(tensor, {k: torch.from_numpy(np.array(v)) for k, v in targets.items()}, paths,
                                flip=options.flip and split == "train", flip_rule=meta["flip"])
    return DataBundle(sets["train"], sets["val"], sets["test"], make_tasks(meta, options), shape)


def describe(folder: str | Path) -> str:
    """One line per split: counts and where the images are stored."""
    folder = Path(folder)
    meta = read_meta(folder)
    lines = [f"{folder}: {meta['dataset']} {'x'.join(map(str, meta['input_shape']))}"]
    for split, e in meta["splits"].items():
        size = os.path.getsize(folder / e["images"])
        lines.append(f"  {split}: {e['count']} of {e['of']} ({e['images']}, {size / 2**20:.1f} MiB)")
    return "\n".join(lines)
