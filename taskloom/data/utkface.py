"""UTKFace (Zhang, Song, Qi, CVPR 2017): aligned, cropped faces labelled by file name.

* **Files.** ``images/`` under the data root (or the root itself) holds
  ``{age}_{gender}_{race}_{date}.jpg.chip.jpg`` files (the "Aligned & Cropped Faces" release;
  the shared copy is downscaled to 64x64). Labels: age in years, gender 0 male / 1 female,
  race 0 White, 1 Black, 2 Asian, 3 Indian, 4 Others. Images of another size are resized
  (bicubic) to ``size`` x ``size``.
* **Malformed names.** A name whose first three ``_``-separated fields are not valid labels is
  malformed (in the real release: 3 names lack the race field, e.g.
  ``39_1_20170116174525125.jpg.chip.jpg``). With ``skip_malformed: true`` (default) they are
  skipped with a warning giving the count and names; with ``false`` they are an error. A name
  with valid labels but a damaged suffix (2 in the release: ``..657 .jpg.chip.jpg`` with a
  space, ``..357jpg.chip.jpg`` without a dot) is kept and reported. Images that cannot be
  decoded are treated like malformed names. So 23,707 files give 23,704 usable faces.
* **Split** (fixed, documented, independent of any seed or file order): ``int(md5(name), 16)
  mod 10``: 0-7 train, 8 val, 9 test (80/10/10).
* **Tasks.** ``age``: ``regression`` (L1 by default; the head predicts ``age_mean + age_scale *
  z``) or ``ordinal_expectation`` (NDDR's recipe: softmax over ages ``age_low..age_high``,
  prediction = expected age), chosen by ``age_task``; ``gender`` (2 classes); ``race`` (5 classes).

Faces are decoded once per process and cached as uint8 ``(N, 3, S, S)`` (about 290 MB at 64x64).
Training images are flipped horizontally with probability 0.5 (``flip``; labels unchanged).
"""
from __future__ import annotations

import dataclasses
import hashlib
import re
import time
import warnings
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from taskloom.data import DATASETS, DataBundle, DataOptions, resolve_root
from taskloom.data.manifest import ManifestSet
from taskloom.errors import DataError
from taskloom.tasks import ClassificationTask, OrdinalExpectationTask, RegressionTask

FOLDER = "utkface64"
HOW_TO_GET = (
    "Expected a folder of UTKFace face images named AGE_GENDER_RACE_DATE.jpg.chip.jpg (directly or under "
    "images/): the 'Aligned&Cropped Faces' archive (UTKFace.tar.gz) from the UTKFace project page "
    "(Zhang, Song, Qi, 'Age Progression/Regression by Conditional Adversarial Autoencoder', CVPR 2017)."
)
GENDERS = ("male", "female")
RACES = ("white", "black", "asian", "indian", "others")
SUFFIX = ".jpg.chip.jpg"
_NAME = re.compile(r"^(\d+)_(\d+)_(\d+)_(\d+)(.*)$")


@dataclasses.dataclass
class UTKFaceOptions(DataOptions):
    """UTKFace age / gender / race (see the module docstring)."""

    name: str = "utkface"
    size: int = 64
    """Side of the square RGB input (other image sizes are resized to it)."""
    age_task: Literal["regression", "ordinal_expectation"] = "regression"
    age_loss: Literal["l1", "mse"] = "l1"
    """Loss of the ``regression`` age task."""
    age_mean: float = 33.0
    age_scale: float = 20.0
    """``regression``: the head predicts ``age_mean + age_scale * z`` (fixed, not learned)."""
    age_low: int = 1
    age_high: int = 116
    """``ordinal_expectation``: the softmax covers the integer ages ``age_low..age_high``."""
    skip_malformed: bool = True
    """Skip names without valid labels and undecodable images (with a warning giving the count);
    ``false``: they are an error."""
    flip: bool = True
    """Random horizontal flips of training images."""
    limit: int | None = None
    """Use only the first ``limit`` file names in sorted order (quick tests / smoke runs)."""

    def __post_init__(self) -> None:
        getattr(super(), "__post_init__", lambda: None)()  # the common loader checks
        if self.size < 8:
            raise ValueError("size must be at least 8")
        if self.age_high <= self.age_low:
            raise ValueError("age_high must exceed age_low")
        if self.age_scale <= 0:
            raise ValueError("age_scale must be positive")
        if self.limit is not None and self.limit < 1:
            raise ValueError("limit must be positive or null")


@dataclasses.dataclass
class Entry:
    name: str
    age: int
    gender: int
    race: int
    damaged_suffix: bool


def parse_name(name: str) -> Entry:
    """Labels from a file name; ValueError saying what is wrong."""
    match = _NAME.match(name)
    if match is None:
        fields = name.split("_")
        if len(fields) == 3 and fields[0].isdigit() and fields[1].isdigit():
            raise ValueError("lacks the race field (expected AGE_GENDER_RACE_DATE.jpg.chip.jpg)")
        raise ValueError("does not match AGE_GENDER_RACE_DATE.jpg.chip.jpg")
    age, gender, race = (int(match.group(i)) for i in (1, 2, 3))
    if not 0 <= age <= 130:
        raise ValueError(f"age {age} outside 0..130")
    if gender not in (0, 1):
        raise ValueError(f"gender {gender} is not 0 (male) or 1 (female)")
    if race not in range(len(RACES)):
        raise ValueError(f"race {race} is not one of 0..4")
    return Entry(name, age, gender, race, match.group(5) != SUFFIX)


def split_of(name: str) -> str:
    """``train`` / ``val`` / ``test`` by ``int(md5(name), 16) mod 10`` (0-7 / 8 / 9)."""
    bucket = int(hashlib.md5(name.encode("utf-8")).hexdigest(), 16) % 10
    return "train" if bucket < 8 else ("val" if bucket == 8 else "test")


class UTKFaces(ManifestSet):
    """Faces ``(N, 3, S, S)`` uint8 with targets ``age`` (float), ``gender`` and ``race``
    (int64): a :class:`~taskloom.data.manifest.ManifestSet` with UTKFace's class counts."""

    @property
    def names(self) -> list[str]:
        return self.paths

    def class_counts(self) -> dict[str, dict[str, int]]:
        ages, gender, race = (self.targets[k] for k in ("age", "gender", "race"))
        ages = ages.long()
        bands = {f"{lo}-{hi}": int(((ages >= lo) & (ages <= hi)).sum())
                 for lo, hi in ((0, 9), (10, 19), (20, 29), (30, 39), (40, 49), (50, 59), (60, 69), (70, 130))}
        return {
            "gender": {g: int((gender == k).sum()) for k, g in enumerate(GENDERS)},
            "race": {r: int((race == k).sum()) for k, r in enumerate(RACES)},
            "age (years)": bands,
        }


@dataclasses.dataclass
class Scan:
    """Result of reading the folder: kept entries per split and what was wrong."""

    folder: Path
    total: int
    splits: dict[str, UTKFaces]
    malformed: list[str]  # "name: reason"
    damaged_suffix: list[str]
    seconds: float


_CACHE: dict[tuple, Scan] = {}


def image_folder(root: Path) -> Path:
    folder = root / "images" if (root / "images").is_dir() else root
    return folder


def scan(options: UTKFaceOptions) -> Scan:
    """Read (once per process) every face under the data root."""
    from PIL import Image, UnidentifiedImageError

    root = resolve_root(options, FOLDER, HOW_TO_GET)
    folder = image_folder(root)
    key = (str(folder.resolve()), folder.stat().st_mtime_ns, options.size, options.limit)
    if key in _CACHE:
        return _CACHE[key]
    started = time.perf_counter()
    names = sorted(p.name for p in folder.iterdir() if p.name.lower().endswith((".jpg", ".jpeg", ".png")))
    if not names:
        raise DataError(f"utkface: no .jpg images in {folder}. {HOW_TO_GET}")
    if options.limit is not None:
        names = names[: options.limit]
    malformed, damaged = [], []
    parts: dict[str, dict[str, list]] = {s: {"img": [], "age": [], "gender": [], "race": [], "name": []}
                                         for s in ("train", "val", "test")}
    s = options.size
    for name in names:
        try:
            entry = parse_name(name)
        except ValueError as exc:
            malformed.append(f"{name}: {exc}")
            continue
        try:
            with Image.open(folder / name) as im:
                if im.format == "JPEG":
                    im.draft("RGB", im.size)
                im = im.convert("RGB")
                if im.size != (s, s):
                    im = im.resize((s, s), Image.Resampling.BICUBIC)
                array = np.asarray(im, dtype=np.uint8)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            malformed.append(f"{name}: image cannot be decoded ({type(exc).__name__}: {exc})")
            continue
        if entry.damaged_suffix:
            damaged.append(name)
        p = parts[split_of(name)]
        p["img"].append(array)
        p["age"].append(entry.age)
        p["gender"].append(entry.gender)
        p["race"].append(entry.race)
        p["name"].append(name)
    splits = {}
    for split, p in parts.items():
        n = len(p["img"])
        images = torch.from_numpy(np.stack(p["img"])).permute(0, 3, 1, 2).contiguous() if n else torch.zeros(0, 3, s, s, dtype=torch.uint8)
        targets = {"age": torch.tensor(p["age"], dtype=torch.float32),
                   "gender": torch.tensor(p["gender"], dtype=torch.int64),
                   "race": torch.tensor(p["race"], dtype=torch.int64)}
        splits[split] = UTKFaces(images, targets, p["name"])
    result = Scan(folder, len(names), splits, malformed, damaged, time.perf_counter() - started)
    _CACHE[key] = result
    return result


def make_tasks(options: UTKFaceOptions) -> list:
    if options.age_task == "regression":
        age = RegressionTask("age", 1, options.age_loss, options.age_mean, options.age_scale)
    else:
        age = OrdinalExpectationTask("age", options.age_low, options.age_high)
    return [age, ClassificationTask("gender", 2), ClassificationTask("race", 5)]


@DATASETS.register("utkface", UTKFaceOptions)
def build_utkface(options: UTKFaceOptions) -> DataBundle:
    """UTKFace faces: age (regression or ordinal expectation), gender, race."""
    result = scan(options)
    if result.malformed:
        listed = "; ".join(result.malformed)
        if not options.skip_malformed:
            raise DataError(f"utkface: {len(result.malformed)} malformed file(s) in {result.folder}: {listed}. "
                            f"Rename or remove them, or set data.skip_malformed=true to skip them")
        warnings.warn(f"utkface: skipped {len(result.malformed)} malformed file(s): {listed}", stacklevel=2)
    if min(len(v) for v in result.splits.values()) == 0:
        raise DataError(f"utkface: too few usable images in {result.folder} for train/val/test "
                        f"({ {k: len(v) for k, v in result.splits.items()} })")
    train = result.splits["train"]
    train = UTKFaces(train.images, train.targets, train.paths, flip=options.flip)
    s = options.size
    return DataBundle(train, result.splits["val"], result.splits["test"], make_tasks(options), (3, s, s))


def check(options: UTKFaceOptions) -> dict:
    """Everything ``taskloom data check utkface`` prints."""
    started = time.perf_counter()
    result = scan(options)
    usable = sum(len(v) for v in result.splits.values())
    return {
        "root": str(result.folder),
        "files": {"image files": result.total, "usable": usable},
        "splits": {k: len(v) for k, v in result.splits.items()},
        "class_counts": {k: v.class_counts() for k, v in result.splits.items()},
        "kept": [f"{n}: damaged suffix, labels valid (kept)" for n in result.damaged_suffix],
        "skipped": result.malformed if options.skip_malformed else [],
        "errors": [] if options.skip_malformed else result.malformed,
        "seconds": time.perf_counter() - started,
    }
