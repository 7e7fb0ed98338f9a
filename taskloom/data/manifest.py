"""Your own images and labels: a folder of images plus a CSV or JSON-lines manifest.

A manifest has one row per image: the image path (relative to the data root) and one column per
task. ``data.targets`` declares each task (its kind and, for example, its classes)::

    path,species,weight,split
    img/0001.png,cat,4.1,train
    img/0002.png,dog,,val          <- an empty cell: weight is missing for this image

* **Tasks.** ``targets: {TASK: {kind: ..., ...}}``; ``kind`` is any registered task kind
  (:data:`taskloom.tasks.TASK_KINDS`). Cell formats: ``classification``: one of ``classes``
  (names) or a 0-based integer below ``num_classes``; ``binary``: 0/1 (also true/false,
  yes/no), space-separated for ``num_labels > 1``; ``regression`` / ``ordinal_expectation``:
  numbers (space-separated when ``dims > 1``); ``landmarks``: ``x1 y1 x2 y2 ...`` in ``[0, 1]``
  image coordinates (fraction of width / height). Subclasses of these kinds parse the same way;
  other kinds: space-separated numbers (float).
* **Missing labels.** An empty cell (CSV) or ``null`` (JSON) marks the target missing; losses
  and metrics skip it (partially labelled data, :mod:`taskloom.tasks`).
* **Splits.** A ``split`` column (``train`` / ``val`` / ``test``) if the manifest has one
  (an empty cell falls back to the hash); otherwise by the MD5 of the path: ``val_fraction``
  and ``test_fraction`` of the images, independent of order and seed.
* **Images.** Decoded once, converted to grey (``channels: 1``) or RGB (``channels: 3``),
  resized (bilinear) to ``size`` x ``size`` and cached in memory as uint8.

Every problem (unknown column, bad value, missing or undecodable image) is a
:class:`~taskloom.errors.DataError` naming the manifest file and line.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from taskloom.data import DATASETS, DataBundle, DataOptions
from taskloom.errors import DataError
import taskloom.dense  # noqa: F401  (registers the dense kinds in TASK_KINDS)
from taskloom.tasks import TASK_KINDS, BinaryTask, ClassificationTask, LandmarkTask, Task

SPLITS = ("train", "val", "test")


@dataclasses.dataclass
class TargetSpec:
    """How one manifest column becomes a task."""

    kind: str = "classification"
    """A registered task kind (``classification``, ``binary``, ``regression``, ``landmarks``, ...)."""
    column: str | None = None
    """Manifest column holding this task's target (default: the task's name)."""
    classes: list[str] | None = None
    """``classification``: class names in label order (cells may then use names)."""
    num_classes: int | None = None
    """``classification`` without ``classes``: cells are integers ``0 .. num_classes - 1``."""
    args: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Extra keyword arguments of the task class (``{dims: 2}``, ``{mean: 30, scale: 20}``,
    ``{num_landmarks: 5}``, ``{num_labels: 3}``, ...)."""


@dataclasses.dataclass
class ManifestOptions(DataOptions):
    """A folder of images listed in a CSV / JSON-lines manifest (see the module docstring)."""

    name: str = "manifest"
    manifest: str = "manifest.csv"
    """Manifest file, relative to ``root`` (or absolute). ``.jsonl`` / ``.json``: JSON lines, else CSV."""
    targets: dict[str, TargetSpec] = dataclasses.field(default_factory=dict)
    """The tasks: ``{task name: {kind: ..., classes: [...], ...}}``."""
    path_column: str = "path"
    split_column: str = "split"
    """Used when present in the manifest; otherwise the MD5 split below."""
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    size: int = 32
    """Side of the square input images."""
    channels: Literal[1, 3] = 3
    """1: grey, 3: RGB."""
    flip: bool = False
    """Random horizontal flips of training images (only valid when no target depends on left/right)."""

    def __post_init__(self) -> None:
        getattr(super(), "__post_init__", lambda: None)()
        if self.size < 4:
            raise ValueError("size must be at least 4")
        if not (0 <= self.val_fraction < 1 and 0 <= self.test_fraction < 1 and self.val_fraction + self.test_fraction < 1):
            raise ValueError("val_fraction and test_fraction must be in [0, 1) with a sum below 1")


def make_task(name: str, spec: TargetSpec) -> Task:
    if spec.kind not in TASK_KINDS:
        raise DataError(f"data.targets.{name}.kind: unknown task kind {spec.kind!r}; "
                        f"choose one of {', '.join(sorted(TASK_KINDS))}")
    kwargs = dict(spec.args)
    if issubclass(TASK_KINDS[spec.kind], ClassificationTask):
        if spec.classes is not None:
            kwargs["num_classes"] = len(spec.classes)
        elif spec.num_classes is not None:
            kwargs["num_classes"] = spec.num_classes
        if "num_classes" not in kwargs:
            raise DataError(f"data.targets.{name}: a classification task needs 'classes' or 'num_classes'")
    try:
        return TASK_KINDS[spec.kind](name, **kwargs)
    except (TypeError, ValueError) as exc:
        raise DataError(f"data.targets.{name}: cannot build a {spec.kind} task ({exc})") from None


_TRUE, _FALSE = {"1", "true", "yes", "1.0"}, {"0", "false", "no", "0.0"}


def parse_value(task: Task, spec: TargetSpec, raw: Any) -> Tensor:
    """One cell -> a target tensor (the task's "missing" marker for an empty cell / null).
    ValueError with a plain message when malformed."""
    empty = raw is None or (isinstance(raw, str) and not raw.strip())
    if isinstance(task, ClassificationTask):
        if empty:
            return torch.tensor(-1)
        text = str(raw).strip()
        if spec.classes is not None and text in spec.classes:
            return torch.tensor(spec.classes.index(text))
        try:
            value = int(text)
        except ValueError:
            allowed = f"one of {spec.classes}" if spec.classes else f"an integer 0..{task.num_classes - 1}"
            raise ValueError(f"{task.name}: {text!r} is not {allowed}") from None
        if not 0 <= value < task.num_classes:
            raise ValueError(f"{task.name}: label {value} outside 0..{task.num_classes - 1}")
        return torch.tensor(value)
    numbers = _numbers(task, raw, empty)
    if isinstance(task, BinaryTask):
        n = getattr(task, "num_labels", 1)
        if numbers is None:
            return torch.full((n,) if n > 1 else (), -1.0)
        if len(numbers) != n:
            raise ValueError(f"{task.name}: expected {n} label(s), got {len(numbers)}")
        return torch.tensor(numbers if n > 1 else numbers[0])
    if isinstance(task, LandmarkTask):
        n = task.num_landmarks
        if numbers is None:
            return torch.full((n, 2), float("nan"))
        if len(numbers) != 2 * n:
            raise ValueError(f"{task.name}: expected {2 * n} numbers (x1 y1 .. x{n} y{n}), got {len(numbers)}")
        return torch.tensor(numbers, dtype=torch.float32).reshape(n, 2)
    dims = getattr(task, "dims", 1)
    if numbers is None:
        return torch.full((dims,) if dims > 1 else (), float("nan"))
    if len(numbers) != dims:
        raise ValueError(f"{task.name}: expected {dims} number(s), got {len(numbers)}")
    return torch.tensor(numbers if dims > 1 else numbers[0], dtype=torch.float32)


def _numbers(task: Task, raw: Any, empty: bool) -> list[float] | None:
    if empty:
        return None
    items = raw if isinstance(raw, list) else (str(raw).split() if not isinstance(raw, (int, float)) else [raw])
    out = []
    for item in items:
        text = str(item).strip().lower()
        if isinstance(task, BinaryTask) and text in _TRUE | _FALSE:
            out.append(1.0 if text in _TRUE else 0.0)
            continue
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"{task.name}: {item!r} is not a number") from None
        if not np.isfinite(value):
            raise ValueError(f"{task.name}: {item!r} is not finite (leave the cell empty for a missing label)")
        out.append(value)
    return out


def read_rows(path: Path) -> tuple[list[tuple[int, dict[str, Any]]], list[str]]:
    """``[(line number, row)]`` and the column names of a CSV or JSON-lines manifest."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise DataError(f"manifest: cannot read {path} ({exc})") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"manifest: {path} is not a UTF-8 text file ({exc})") from None
    rows: list[tuple[int, dict[str, Any]]] = []
    if path.suffix.lower() in (".jsonl", ".json"):
        columns: list[str] = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}, line {number}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}, line {number}: expected a JSON object, got {type(row).__name__}")
            columns += [k for k in row if k not in columns]
            rows.append((number, row))
        return rows, columns
    reader = csv.DictReader(text.splitlines())
    columns = list(reader.fieldnames or [])
    for row in reader:
        if not any((v or "").strip() for v in row.values() if isinstance(v, str)):
            continue  # blank line
        if None in row:
            raise DataError(f"{path}, line {reader.line_num}: more cells than the {len(columns)} header columns")
        rows.append((reader.line_num, row))
    return rows, columns


def _hash_split(path: str, options: ManifestOptions) -> str:
    u = int(hashlib.md5(path.encode("utf-8")).hexdigest(), 16) % 10_000 / 10_000
    if u < options.test_fraction:
        return "test"
    if u < options.test_fraction + options.val_fraction:
        return "val"
    return "train"


def _load_image(file: Path, options: ManifestOptions) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    if not file.is_file():
        raise ValueError(f"image {file} not found")
    try:
        with Image.open(file) as im:
            im = im.convert("L" if options.channels == 1 else "RGB")
            im = im.resize((options.size, options.size), Image.Resampling.BILINEAR)
            array = np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ValueError(f"image {file} cannot be decoded ({type(exc).__name__}: {exc})") from None
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


class ManifestSet(Dataset):
    """Images ``(N, C, S, S)`` uint8 and per-task stacked targets."""

    def __init__(self, images: Tensor, targets: dict[str, Tensor], paths: list[str], flip: bool = False):
        self.images, self.targets, self.paths, self.flip = images, targets, paths, flip

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Tensor, dict[str, Tensor]]:
        x = self.images[i].float().div_(255.0)
        if self.flip and torch.rand(()) < 0.5:
            x = torch.flip(x, dims=[-1])
        return x, {name: t[i] for name, t in self.targets.items()}


def load(options: ManifestOptions) -> tuple[dict[str, ManifestSet], list[Task]]:
    if not options.root:
        raise DataError("manifest: set data.root (or --data-root) to the folder holding the images")
    root = Path(options.root).expanduser()
    if not root.is_dir():
        raise DataError(f"manifest: data folder {root} does not exist")
    path = Path(options.manifest).expanduser()
    path = path if path.is_absolute() else root / path
    if not path.is_file():
        raise DataError(f"manifest: {path} not found (data.manifest is relative to data.root {root})")
    if not options.targets:
        raise DataError("manifest: data.targets is empty; declare at least one task, for example "
                        "targets: {label: {kind: classification, classes: [cat, dog]}}")
    tasks = [make_task(name, spec) for name, spec in options.targets.items()]
    rows, columns = read_rows(path)
    if not rows:
        raise DataError(f"manifest: {path} lists no images")
    needed = [options.path_column] + [spec.column or name for name, spec in options.targets.items()]
    absent = [c for c in needed if c not in columns]
    if absent:
        raise DataError(f"{path}: column(s) {absent} not found; the manifest has columns {columns}")
    has_split = options.split_column in columns
    data: dict[str, dict[str, list]] = {s: {"images": [], "paths": [], **{t.name: [] for t in tasks}} for s in SPLITS}
    for number, row in rows:
        try:
            rel = row.get(options.path_column)
            if not isinstance(rel, str) or not rel.strip():
                raise ValueError(f"empty {options.path_column!r}")
            rel = rel.strip()
            split = str(row.get(options.split_column) or "").strip() if has_split else ""
            if split and split not in SPLITS:
                raise ValueError(f"split {split!r} is not one of train, val, test (or empty)")
            split = split or _hash_split(rel, options)
            values = {t.name: parse_value(t, options.targets[t.name], row.get(options.targets[t.name].column or t.name))
                      for t in tasks}
            image = _load_image(root / rel, options)
        except ValueError as exc:
            raise DataError(f"{path}, line {number}: {exc}") from None
        bucket = data[split]
        bucket["images"].append(image)
        bucket["paths"].append(rel)
        for name, value in values.items():
            bucket[name].append(value)
    empty = [s for s in SPLITS if not data[s]["images"]]
    if empty:
        raise DataError(f"{path}: no images in split(s) {empty} ({len(rows)} rows); add a "
                        f"{options.split_column!r} column or raise data.val_fraction / data.test_fraction")
    s, c = options.size, options.channels
    sets = {}
    for split in SPLITS:
        bucket = data[split]
        images = torch.from_numpy(np.stack(bucket["images"])).reshape(-1, c, s, s)
        targets = {t.name: torch.stack(bucket[t.name]) for t in tasks}
        sets[split] = ManifestSet(images, targets, bucket["paths"], flip=options.flip and split == "train")
    return sets, tasks


@DATASETS.register("manifest", ManifestOptions)
def build_manifest(options: ManifestOptions) -> DataBundle:
    """Your images + a CSV / JSON-lines manifest of per-task labels."""
    sets, tasks = load(options)
    return DataBundle(sets["train"], sets["val"], sets["test"], tasks, (options.channels, options.size, options.size))
