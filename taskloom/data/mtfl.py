"""MTFL (Multi-Task Facial Landmark, Zhang et al., ECCV 2014): 5 landmarks + 4 face attributes.

Protocol (seed 004 / REFERENCE §4 and §8; the default options):

* **Files.** ``training.txt`` (10,000 lines) and ``testing.txt`` (2,995 lines) in the data root,
  one image per line: ``path x1..x5 y1..y5 gender smile glasses pose``. Quirks handled: lines
  start with a space and end in CRLF, ``training.txt`` separates path parts with ``\\``,
  ``testing.txt`` with ``/``; blank lines are ignored.
* **Face crop.** MTFL has no face boxes, so a square box is derived from the true landmarks:
  centred on the mean of the 5 points, side ``crop_scale`` (2.2) x their larger extent
  ``max(max x - min x, max y - min y)``. Landmark coordinates are taken as positions in PIL's
  continuous pixel frame; parts of the box outside the image are filled with black. The crop is
  converted to grey and resized (bilinear) to ``size`` x ``size`` (40 x 40).
* **Targets.** ``landmarks``: ``(5, 2)`` points ``(x, y)`` in crop coordinates normalised to
  ``[0, 1]`` (``u = (x - box_x0) / side``); :func:`to_image_coords` maps predictions back to the
  image with the stored boxes. Attributes as 2-way / 5-way classification (0-based):
  ``gender`` 0 male / 1 female, ``smile`` 0 no / 1 yes, ``glasses`` 0 no / 1 yes,
  ``pose`` 0 left profile, 1 left, 2 frontal, 3 right, 4 right profile. Two-way softmax
  classification (not a 1-logit binary task) so that these attributes get the same accuracy,
  macro (class-balanced) accuracy and ensemble combination as every classification task --
  glasses is 93% "no", where the macro accuracy is the informative number.
* **Splits.** test = ``testing.txt``; of the 10,000 training lines, ``val_size`` (1,000) are held
  out for model selection: those with the smallest MD5 of their (``/``-normalised) path, so the
  split does not depend on line order or on any seed. train = the other 9,000.
* **Augmentation** (train split, ``flip: true``): horizontal flip with probability 0.5 mirrors
  the image, maps ``u -> 1 - u``, swaps left/right eyes and mouth corners and mirrors the pose
  label (left profile <-> right profile, left <-> right).
* **Metrics.** Landmark errors normalised by the inter-ocular distance (failure > 10%, the MTFL
  authors' protocol) and by the face-box width (failure > 5%, seed 004), per landmark and mean.

Images are decoded once per process and the cropped 40 x 40 grey faces are cached in memory
(uint8). Bad input (a missing or corrupt image, a line without 15 fields, a bad number or label,
a landmark outside the image) is a :class:`DataError` naming the file and line, or, with
``skip_malformed: true``, counted, reported and skipped.
"""
from __future__ import annotations

import dataclasses
import hashlib
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from taskloom.data import DATASETS, DataBundle, DataOptions, resolve_root
from taskloom.errors import DataError
from taskloom.metrics import LANDMARK_NAMES
from taskloom.tasks import ClassificationTask, LandmarkTask

FOLDER = "mtfl"
HOW_TO_GET = (
    "Expected training.txt, testing.txt and the image folders (AFLW/, lfw_5590/, net_7876/) of the "
    "'Multi-Task Facial Landmark (MTFL) dataset' (Zhang, Luo, Loy, Tang, ECCV 2014), available from the "
    "MMLAB CUHK project page 'Facial Landmark Detection by Deep Multi-task Learning' (MTFL.zip)."
)
ANNOTATIONS = {"train": "training.txt", "test": "testing.txt"}
ATTRIBUTES = ("gender", "smile", "glasses", "pose")
ATTRIBUTE_CLASSES = {
    "gender": ("male", "female"),
    "smile": ("no", "yes"),
    "glasses": ("no", "yes"),
    "pose": ("left_profile", "left", "frontal", "right", "right_profile"),
}
FLIP_LANDMARKS = (1, 0, 2, 4, 3)  # left eye <-> right eye, nose, mouth left <-> mouth right


@dataclasses.dataclass
class MTFLOptions(DataOptions):
    """MTFL with the seed-004 protocol (see the module docstring)."""

    name: str = "mtfl"
    size: int = 40
    """Side of the square grey input."""
    crop_scale: float = 2.2
    """Face box side = crop_scale x the larger extent of the 5 landmarks."""
    val_size: int = 1000
    """Training images held out for validation (selected by MD5 of the path)."""
    flip: bool = True
    """Random horizontal flips of training images (landmarks and pose mirrored)."""
    skip_malformed: bool = False
    """Skip (and count) bad lines / images instead of failing. Off: the real data is clean, and a
    silently smaller split would change the protocol."""
    limit: int | None = None
    """Read only the first ``limit`` lines of each annotation file (quick tests / smoke runs)."""
    iod_threshold: float = 0.10
    box_threshold: float = 0.05

    def __post_init__(self) -> None:
        getattr(super(), "__post_init__", lambda: None)()  # the common loader checks
        if self.size < 8:
            raise ValueError("size must be at least 8")
        if self.crop_scale <= 1:
            raise ValueError("crop_scale must exceed 1 (the box must contain the landmarks)")
        if self.val_size < 1:
            raise ValueError("val_size must be positive")
        if self.limit is not None and self.limit < 1:
            raise ValueError("limit must be positive or null")


@dataclasses.dataclass
class Record:
    """One parsed annotation line (landmarks in image pixels)."""

    path: str
    file: str
    line: int
    landmarks: np.ndarray  # (5, 2) float64
    attributes: np.ndarray  # (4,) int64, 0-based


@dataclasses.dataclass
class Problem:
    file: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}, line {self.line}: {self.message}"


def parse_line(text: str, file: str, line: int) -> Record:
    """Parse one annotation line; ValueError (with a plain message) when malformed."""
    parts = text.split()
    if len(parts) != 15:
        raise ValueError(f"expected 15 fields (path, x1..x5, y1..y5, gender, smile, glasses, pose), got {len(parts)}")
    path = parts[0].replace("\\", "/")
    try:
        coords = np.array([float(v) for v in parts[1:11]], dtype=np.float64)
    except ValueError:
        raise ValueError(f"landmark coordinates must be numbers, got {' '.join(parts[1:11])!r}") from None
    if not np.isfinite(coords).all():
        raise ValueError("landmark coordinates must be finite")
    raw = []
    for name, value, allowed in zip(ATTRIBUTES, parts[11:], ("12", "12", "12", "12345")):
        if value not in allowed:
            raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        raw.append(int(value))
    gender, smile, glasses, pose = raw
    attributes = np.array([gender - 1, 2 - smile, 2 - glasses, pose - 1], dtype=np.int64)
    landmarks = np.stack([coords[:5], coords[5:]], 1)
    return Record(path, file, line, landmarks, attributes)


def read_annotations(path: Path, limit: int | None = None) -> tuple[list[Record], list[Problem]]:
    """Records and problems (file, line, message) of one annotation file."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except OSError as exc:
        raise DataError(f"mtfl: cannot read {path} ({exc}). {HOW_TO_GET}") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"mtfl: {path} is not a text file ({exc})") from None
    records, problems = [], []
    count = 0
    for number, line in enumerate(text.splitlines(), 1):  # splitlines handles CRLF
        if not line.strip():
            continue
        count += 1
        if limit is not None and count > limit:
            break
        try:
            records.append(parse_line(line, path.name, number))
        except ValueError as exc:
            problems.append(Problem(path.name, number, str(exc)))
    return records, problems


def face_box(landmarks: np.ndarray, crop_scale: float) -> tuple[float, float, float]:
    """``(x0, y0, side)`` of the square box centred on the landmarks' mean with side
    ``crop_scale`` x their larger extent."""
    centre = landmarks.mean(0)
    extent = float(max(np.ptp(landmarks[:, 0]), np.ptp(landmarks[:, 1])))
    side = crop_scale * extent
    return float(centre[0] - side / 2), float(centre[1] - side / 2), side


def crop_face(image, box: tuple[float, float, float], size: int) -> np.ndarray:
    """The box of a PIL image as a ``size`` x ``size`` grey uint8 array (outside: black)."""
    from PIL import Image

    x0, y0, side = box
    grey = image.convert("L")
    out = grey.transform((size, size), Image.Transform.EXTENT, (x0, y0, x0 + side, y0 + side),
                         resample=Image.Resampling.BILINEAR, fillcolor=0)
    return np.asarray(out, dtype=np.uint8)


def to_image_coords(points: Tensor, boxes: Tensor) -> Tensor:
    """Map ``(N, L, 2)`` normalised crop coordinates back to image pixels with ``(N, 3)`` boxes
    ``(x0, y0, side)``."""
    return boxes[:, None, :2] + points * boxes[:, None, 2:3]


def _load_image(root: Path, record: Record):
    from PIL import Image, UnidentifiedImageError

    file = root / record.path
    if not file.is_file():
        raise ValueError(f"image {file} not found")
    try:
        with Image.open(file) as im:
            if im.format == "JPEG":
                im.draft("L", im.size)  # decode straight to grey, same size: about 2x faster
            im.load()
            return im.convert("L")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ValueError(f"image {file} cannot be decoded ({type(exc).__name__}: {exc})") from None


class MTFLFaces(Dataset):
    """Cropped faces ``(N, 1, S, S)`` uint8 with landmarks ``(N, 5, 2)`` (normalised crop
    coordinates), attributes ``(N, 4)`` and the boxes ``(N, 3)`` ``(x0, y0, side)`` in image pixels."""

    def __init__(self, images: Tensor, landmarks: Tensor, attributes: Tensor, boxes: Tensor,
                 paths: list[str], flip: bool = False):
        self.images, self.landmarks, self.attributes, self.boxes = images, landmarks, attributes, boxes
        self.paths, self.flip = paths, flip

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, index: list[int] | np.ndarray, flip: bool = False) -> MTFLFaces:
        idx = torch.as_tensor(np.asarray(index, dtype=np.int64))
        return MTFLFaces(self.images[idx], self.landmarks[idx], self.attributes[idx], self.boxes[idx],
                       [self.paths[i] for i in idx.tolist()], flip)

    def __getitem__(self, i: int) -> tuple[Tensor, dict[str, Tensor]]:
        x = self.images[i].float().div_(255.0)
        points = self.landmarks[i]
        attrs = self.attributes[i]
        if self.flip and torch.rand(()) < 0.5:
            x, points, attrs = flip_sample(x, points, attrs)
        y = {"landmarks": points}
        y.update({name: attrs[k] for k, name in enumerate(ATTRIBUTES)})
        return x, y

    def class_counts(self) -> dict[str, dict[str, int]]:
        return {name: {cls: int((self.attributes[:, k] == c).sum()) for c, cls in enumerate(ATTRIBUTE_CLASSES[name])}
                for k, name in enumerate(ATTRIBUTES)}


def flip_sample(x: Tensor, points: Tensor, attrs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Mirror one sample: image columns reversed, ``u -> 1 - u``, left/right landmarks swapped,
    pose mirrored (0 <-> 4, 1 <-> 3)."""
    x = torch.flip(x, dims=[-1])
    points = points[list(FLIP_LANDMARKS)].clone()
    points[:, 0] = 1.0 - points[:, 0]
    attrs = attrs.clone()
    attrs[3] = 4 - attrs[3]
    return x, points, attrs


_CACHE: dict[tuple, tuple[MTFLFaces, list[Problem]]] = {}


def load_split(root: Path, split: str, options: MTFLOptions) -> tuple[MTFLFaces, list[Problem]]:
    """All valid faces of one annotation file (cached per process) and the problems found.

    Problems are collected, not raised: the caller decides (error or skip)."""
    ann = root / ANNOTATIONS[split]
    stamp = ann.stat().st_mtime_ns if ann.is_file() else None
    key = (str(root.resolve()), split, stamp, options.size, options.crop_scale, options.limit)
    if key in _CACHE:
        return _CACHE[key]
    records, problems = read_annotations(ann, options.limit)
    images, points, attrs, boxes, paths = [], [], [], [], []
    for rec in records:
        try:
            image = _load_image(root, rec)
            w, h = image.size
            lm = rec.landmarks
            outside = (lm[:, 0] < 0) | (lm[:, 0] > w) | (lm[:, 1] < 0) | (lm[:, 1] > h)
            if outside.any():
                k = int(np.flatnonzero(outside)[0])
                raise ValueError(
                    f"landmark {LANDMARK_NAMES[k]} at ({lm[k, 0]:g}, {lm[k, 1]:g}) is outside the {w}x{h} image {rec.path}"
                )
            box = face_box(lm, options.crop_scale)
            if box[2] <= 0:
                raise ValueError("all 5 landmarks coincide; no face box can be derived")
            if np.linalg.norm(lm[0] - lm[1]) <= 0:
                raise ValueError("the two eye landmarks coincide (zero inter-ocular distance)")
            images.append(crop_face(image, box, options.size))
        except ValueError as exc:
            problems.append(Problem(rec.file, rec.line, str(exc)))
            continue
        points.append((lm - np.array(box[:2])) / box[2])
        attrs.append(rec.attributes)
        boxes.append(box)
        paths.append(rec.path)
    n = len(images)
    faces = MTFLFaces(
        torch.from_numpy(np.stack(images)).unsqueeze(1) if n else torch.zeros(0, 1, options.size, options.size, dtype=torch.uint8),
        torch.from_numpy(np.stack(points)).float() if n else torch.zeros(0, 5, 2),
        torch.from_numpy(np.stack(attrs)) if n else torch.zeros(0, 4, dtype=torch.int64),
        torch.tensor(boxes, dtype=torch.float64) if n else torch.zeros(0, 3, dtype=torch.float64),
        paths,
    )
    _CACHE[key] = (faces, problems)
    return faces, problems


def validation_index(paths: list[str], val_size: int) -> np.ndarray:
    """Indices of the ``val_size`` paths with the smallest MD5 digest (order-independent)."""
    digests = [hashlib.md5(p.encode("utf-8")).hexdigest() for p in paths]
    order = sorted(range(len(paths)), key=lambda i: digests[i])
    return np.sort(np.array(order[:val_size], dtype=np.int64))


def build_splits(options: MTFLOptions) -> tuple[dict[str, MTFLFaces], dict[str, list[Problem]], Path]:
    root = resolve_root(options, FOLDER, HOW_TO_GET)
    missing = [name for name in ANNOTATIONS.values() if not (root / name).is_file()]
    if missing:
        raise DataError(f"mtfl: {root} is incomplete: {', '.join(missing)} not found. {HOW_TO_GET}")
    train_all, train_problems = load_split(root, "train", options)
    test, test_problems = load_split(root, "test", options)
    problems = {"train": train_problems, "test": test_problems}
    if len(train_all) <= options.val_size:
        error = DataError(
            f"mtfl: only {len(train_all)} usable training images, not more than data.val_size={options.val_size}"
        )
        error.counts, error.problems, error.root = {"train": len(train_all), "val": 0, "test": len(test)}, problems, root
        raise error
    val_idx = validation_index(train_all.paths, options.val_size)
    train_idx = np.setdiff1d(np.arange(len(train_all)), val_idx)
    splits = {"train": train_all.subset(train_idx, flip=options.flip), "val": train_all.subset(val_idx),
              "test": test.subset(np.arange(len(test)))}
    return splits, problems, root


def make_tasks(options: MTFLOptions) -> list:
    return [
        LandmarkTask("landmarks", 5, LANDMARK_NAMES, eyes=(0, 1), iod_threshold=options.iod_threshold,
                     box_threshold=options.box_threshold),
        ClassificationTask("gender", 2), ClassificationTask("smile", 2), ClassificationTask("glasses", 2),
        ClassificationTask("pose", 5),
    ]


@DATASETS.register("mtfl", MTFLOptions)
def build_mtfl(options: MTFLOptions) -> DataBundle:
    """MTFL faces (40x40 grey crops): landmarks + gender, smile, glasses, pose."""
    splits, problems, _ = build_splits(options)
    found = problems["train"] + problems["test"]
    if found:
        listed = "; ".join(str(p) for p in found[:5]) + (f"; ... ({len(found)} in all)" if len(found) > 5 else "")
        if not options.skip_malformed:
            raise DataError(f"mtfl: {len(found)} bad annotation line(s) or image(s): {listed}. "
                            f"Fix the files, or set data.skip_malformed=true to skip them")
        warnings.warn(f"mtfl: skipped {len(found)} bad line(s) or image(s): {listed}", stacklevel=2)
    s = options.size
    return DataBundle(splits["train"], splits["val"], splits["test"], make_tasks(options), (1, s, s))


def check(options: MTFLOptions) -> dict:
    """Everything ``taskloom data check mtfl`` prints."""
    started = time.perf_counter()
    try:
        splits, problems, root = build_splits(options)
        sizes, counts, fatal = {k: len(v) for k, v in splits.items()}, {k: v.class_counts() for k, v in splits.items()}, []
    except DataError as exc:  # too few images for the validation split: still list the malformed lines
        if not hasattr(exc, "counts"):
            raise
        sizes, counts, fatal, problems, root = exc.counts, {}, [str(exc)], exc.problems, exc.root
    found = problems["train"] + problems["test"]
    return {
        "root": str(root),
        "files": {"training.txt": sizes["train"] + sizes["val"], "testing.txt": sizes["test"]},
        "splits": sizes,
        "class_counts": counts,
        "skipped": [str(p) for p in found] if options.skip_malformed else [],
        "errors": ([] if options.skip_malformed else [str(p) for p in found]) + fatal,
        "seconds": time.perf_counter() - started,
    }
