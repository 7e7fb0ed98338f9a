"""Oxford-IIIT Pet (Parkhi, Vedaldi, Zisserman, Jawahar, CVPR 2012) and subsets of it in the
release's layout, such as the 3-breed sample in ``../shared/data/pets-sample/``.

* **Files** (the release's names): ``images/NAME.jpg``, ``trimaps/NAME.png`` (1 pet,
  2 background, 3 border / not classified), ``list.txt``, ``trainval.txt`` and ``test.txt``
  (``NAME CLASS-ID SPECIES BREED-ID``; ``#`` lines are comments) and the head boxes, either as
  ``heads.csv`` (``image,xmin,ymin,xmax,ymax,width,height`` in pixels of the image files, the
  sample's form) or as the release's ``xmls/NAME.xml`` (PASCAL VOC). Images in no list are not
  used (``taskloom data check pets`` names them).
* **Splits.** test = ``test.txt``; of ``trainval.txt``, ``val_size`` images (default 50) form a
  fixed validation fold: those with the smallest MD5 of their name, independent of line order
  and seed; train = the rest (250 of the sample's 300).
* **Tasks.** ``segmentation``: the trimap, either ``binary`` (the upstream protocol: 0
  background, 1 pet, border pixels ignored) or ``trimap`` (3 classes: 0 pet, 1 background,
  2 border); ignore index -1. ``breed``: classification over the breeds present, in the order
  of their 37-class id (the sample: 0 Abyssinian (id 1), 1 american_bulldog (id 2), 2 Bengal
  (id 6)); ``species``: binary, 1 = dog. ``head_box``: the head box as ``(x_min, y_min, x_max,
  y_max)`` divided by the image width and height (task kind ``box``, metric mean IoU); images
  without a box have a missing (``NaN``) target. The release has head boxes for trainval images
  only: in the sample 296 of the 300 trainval images and none of the 298 test images, so
  ``head_box`` is scored on the validation fold, and on test its metrics are NaN with count 0
  (delta_m on test is over the tasks that have test labels).
* **Input.** Every image and its trimap are resized together to ``size`` x ``size`` (bilinear for
  the image, nearest for the trimap; the aspect ratio is not kept, so normalised boxes stay
  valid). RGB, normalised with the ImageNet mean and std (``normalize: imagenet``, what
  pretrained backbones expect) or only scaled to [0, 1] (``none``).
* **Augmentation** (``flip``, train split only): horizontal flip with probability 0.5 of image
  and trimap; the box moves with them (``x_min' = 1 - x_max``, ``x_max' = 1 - x_min``).

Images are decoded once per process and kept in memory as uint8 at ``size`` (the sample at
128 px: 29 MB).
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import time
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from taskloom.boxes import BoxTask
from taskloom.data import DATASETS, DataBundle, DataOptions, resolve_root
from taskloom.errors import DataError
from taskloom.dense import SegmentationTask
from taskloom.tasks import BinaryTask, ClassificationTask

FOLDER = "pets-sample"  # $TASKLOOM_DATA/pets-sample: the 3-breed sample in ../shared/data (the full release: --data-root)
HOW_TO_GET = (
    "Expected images/, trimaps/, list.txt, trainval.txt, test.txt and heads.csv (or the release's xmls/) of "
    "the Oxford-IIIT Pet dataset (Parkhi et al., CVPR 2012; 'images.tar.gz' and 'annotations.tar.gz' from the "
    "Oxford VGG 'The Oxford-IIIT Pet Dataset' page), or a subset in the same layout such as ../shared/data/pets-sample."
)
IGNORE_INDEX = -1
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BREEDS_37 = (
    "Abyssinian", "american_bulldog", "american_pit_bull_terrier", "basset_hound", "beagle", "Bengal", "Birman",
    "Bombay", "boxer", "British_Shorthair", "chihuahua", "Egyptian_Mau", "english_cocker_spaniel", "english_setter",
    "german_shorthaired", "great_pyrenees", "havanese", "japanese_chin", "keeshond", "leonberger", "Maine_Coon",
    "miniature_pinscher", "newfoundland", "Persian", "pomeranian", "pug", "Ragdoll", "Russian_Blue", "saint_bernard",
    "samoyed", "scottish_terrier", "shiba_inu", "Siamese", "Sphynx", "staffordshire_bull_terrier",
    "wheaten_terrier", "yorkshire_terrier",
)
"""The 37 class names in the order of the release's CLASS-ID (1-based)."""
TASKS = ("segmentation", "breed", "species", "head_box")


@dataclasses.dataclass
class PetsOptions(DataOptions):
    """Oxford-IIIT Pet (or a subset in its layout; see the module docstring)."""

    name: str = "pets"
    size: int = 128
    """Side of the square input; image (bilinear) and trimap (nearest) are resized together."""
    segmentation: Literal["binary", "trimap"] = "binary"
    """``binary``: pet vs background, border pixels ignored (the upstream protocol); ``trimap``:
    3 classes (pet, background, border)."""
    val_size: int = 50
    """trainval images held out as the validation fold (smallest MD5 of the image name)."""
    flip: bool = True
    """Random horizontal flips of training samples (trimap and box move along)."""
    normalize: Literal["imagenet", "none"] = "imagenet"
    """``imagenet``: subtract the ImageNet mean and divide by its std per channel (pretrained
    backbones); ``none``: pixel values in [0, 1]."""
    box_loss: Literal["l1", "l1_giou"] = "l1"
    """Loss of the ``head_box`` task."""
    batch_size: int = 16
    eval_batch_size: int = 64

    def __post_init__(self) -> None:
        getattr(super(), "__post_init__", lambda: None)()  # the common loader checks
        if self.size < 16:
            raise ValueError("size must be at least 16")
        if self.val_size < 1:
            raise ValueError("val_size must be positive")


@dataclasses.dataclass
class Entry:
    name: str
    class_id: int  # 1..37
    species: int  # 1 cat, 2 dog
    file: str
    line: int


def read_list(path: Path) -> list[Entry]:
    """The entries of one list file (``NAME CLASS-ID SPECIES BREED-ID``), checked."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise DataError(f"pets: cannot read {path} ({exc}). {HOW_TO_GET}") from None
    entries = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split()
        where = f"pets: {path.name}, line {number}"
        if len(parts) != 4:
            raise DataError(f"{where}: expected 'NAME CLASS-ID SPECIES BREED-ID', got {line!r}")
        try:
            class_id, species = int(parts[1]), int(parts[2])
        except ValueError:
            raise DataError(f"{where}: CLASS-ID and SPECIES must be integers, got {line!r}") from None
        if not 1 <= class_id <= len(BREEDS_37) or species not in (1, 2):
            raise DataError(f"{where}: CLASS-ID must be 1..37 and SPECIES 1 (cat) or 2 (dog), got {line!r}")
        entries.append(Entry(parts[0], class_id, species, path.name, number))
    return entries


def read_boxes(root: Path) -> dict[str, tuple[float, float, float, float, int, int]]:
    """Head boxes ``name -> (xmin, ymin, xmax, ymax, width, height)`` in pixels of the image files,
    from ``heads.csv`` or the release's ``xmls/*.xml``."""
    csv_path = root / "heads.csv"
    boxes: dict[str, tuple[float, float, float, float, int, int]] = {}
    if csv_path.is_file():
        with open(csv_path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            need = {"image", "xmin", "ymin", "xmax", "ymax", "width", "height"}
            if not need <= set(reader.fieldnames or ()):
                raise DataError(f"pets: {csv_path} needs the columns {', '.join(sorted(need))}")
            for number, row in enumerate(reader, 2):
                try:
                    boxes[row["image"]] = (float(row["xmin"]), float(row["ymin"]), float(row["xmax"]),
                                           float(row["ymax"]), int(row["width"]), int(row["height"]))
                except ValueError:
                    raise DataError(f"pets: {csv_path.name}, line {number}: bad number in {row}") from None
        return boxes
    xmls = root / "xmls"
    if xmls.is_dir():
        import xml.etree.ElementTree as ET

        for path in sorted(xmls.glob("*.xml")):
            try:
                tree = ET.parse(path).getroot()
                size = tree.find("size")
                box = tree.find("object/bndbox")
                boxes[path.stem] = (float(box.findtext("xmin")), float(box.findtext("ymin")),
                                    float(box.findtext("xmax")), float(box.findtext("ymax")),
                                    int(size.findtext("width")), int(size.findtext("height")))
            except (ET.ParseError, AttributeError, TypeError, ValueError) as exc:
                raise DataError(f"pets: cannot read the head box in {path} ({exc})") from None
        return boxes
    raise DataError(f"pets: no head boxes in {root} (heads.csv or xmls/). {HOW_TO_GET}")


def _load(root: Path, name: str, size: int) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """Image ``(3, S, S)`` and trimap ``(S, S)`` (values 1..3) as uint8, and the original (w, h)."""
    from PIL import Image, UnidentifiedImageError

    image_path, trimap_path = root / "images" / f"{name}.jpg", root / "trimaps" / f"{name}.png"
    for path in (image_path, trimap_path):
        if not path.is_file():
            raise DataError(f"pets: {path} not found (listed in the split files)")
    try:
        with Image.open(image_path) as im:
            image = im.convert("RGB")  # the release has a few RGBA / palette / grey images
        with Image.open(trimap_path) as im:
            trimap = im.copy()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"pets: cannot decode {name} ({type(exc).__name__}: {exc})") from None
    if trimap.size != image.size:
        raise DataError(f"pets: trimaps/{name}.png is {trimap.size[0]}x{trimap.size[1]}, images/{name}.jpg "
                        f"{image.size[0]}x{image.size[1]}")
    if trimap.mode not in ("L", "P", "I", "I;16"):
        raise DataError(f"pets: trimaps/{name}.png has mode {trimap.mode}; expected a one-channel label image")
    labels = np.asarray(trimap)
    if labels.min() < 1 or labels.max() > 3:
        raise DataError(f"pets: trimaps/{name}.png has values {sorted(np.unique(labels).tolist())[:6]}; expected 1, 2, 3")
    original = image.size
    image = image.resize((size, size), Image.Resampling.BILINEAR)
    trimap = Image.fromarray(labels.astype(np.uint8)).resize((size, size), Image.Resampling.NEAREST)
    return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1).copy(), np.asarray(trimap, dtype=np.uint8), original


class PetSet(Dataset):
    """Decoded samples of one split: ``(image (3, S, S), {segmentation, breed, species, head_box})``."""

    def __init__(self, names: list[str], images: Tensor, trimaps: Tensor, breed: Tensor, species: Tensor,
                 boxes: Tensor, segmentation: str, normalize: str, flip: bool = False):
        self.names, self.images, self.trimaps = list(names), images, trimaps
        self.breed, self.species, self.boxes = breed, species, boxes
        self.segmentation, self.normalize, self.flip = segmentation, normalize, flip
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if normalize == "imagenet" else ((0.0,) * 3, (1.0,) * 3)
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.names)

    def subset(self, index: list[int], flip: bool = False) -> PetSet:
        idx = torch.as_tensor(index, dtype=torch.int64)
        out = PetSet([self.names[i] for i in index], self.images[idx], self.trimaps[idx], self.breed[idx],
                     self.species[idx], self.boxes[idx], self.segmentation, self.normalize, flip)
        out.breed_names = getattr(self, "breed_names", None)
        return out

    def mask(self, trimap: Tensor) -> Tensor:
        """Segmentation target of a trimap (values 1 pet, 2 background, 3 border)."""
        t = trimap.long()
        if self.segmentation == "trimap":
            return t - 1  # 0 pet, 1 background, 2 border
        return torch.where(t == 3, torch.full_like(t, IGNORE_INDEX), (t == 1).long())  # 1 pet, 0 background

    def __getitem__(self, i: int) -> tuple[Tensor, dict[str, Tensor]]:
        x = self.images[i].float().div_(255.0)
        trimap, box = self.trimaps[i], self.boxes[i]
        if self.flip and torch.rand(()) < 0.5:
            x, trimap, box = flip_sample(x, trimap, box)
        x = (x - self.mean) / self.std
        return x, {"segmentation": self.mask(trimap), "breed": self.breed[i], "species": self.species[i],
                   "head_box": box}

    def class_counts(self) -> dict[str, dict[str, int]]:
        breeds = getattr(self, "breed_names", None) or [str(c) for c in range(int(self.breed.max()) + 1)]
        labelled = int((~torch.isnan(self.boxes).any(1)).sum())
        return {
            "breed": {b: int((self.breed == c).sum()) for c, b in enumerate(breeds)},
            "species": {"cat": int((self.species == 0).sum()), "dog": int((self.species == 1).sum())},
            "head_box": {"labelled": labelled, "missing": len(self) - labelled},
        }


def flip_sample(x: Tensor, trimap: Tensor, box: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Mirror image and trimap; the normalised box ``(x0, y0, x1, y1)`` becomes ``(1 - x1, y0, 1 - x0, y1)``."""
    return x.flip(-1), trimap.flip(-1), torch.stack([1 - box[2], box[1], 1 - box[0], box[3]])


def validation_names(names: list[str], val_size: int) -> set[str]:
    """The ``val_size`` names with the smallest MD5 digest (independent of order and seed)."""
    return set(sorted(names, key=lambda n: hashlib.md5(n.encode("utf-8")).hexdigest())[:val_size])


_CACHE: dict[tuple, dict] = {}


def scan(root: Path, size: int) -> dict:
    """Lists, boxes and decoded images of every listed sample (cached per process)."""
    key = (str(root.resolve()), size)
    if key in _CACHE:
        return _CACHE[key]
    for part in ("images", "trimaps"):
        if not (root / part).is_dir():
            raise DataError(f"pets: {root / part} not found. {HOW_TO_GET}")
    for name in ("trainval.txt", "test.txt"):
        if not (root / name).is_file():
            raise DataError(f"pets: {root / name} not found. {HOW_TO_GET}")
    splits = {"trainval": read_list(root / "trainval.txt"), "test": read_list(root / "test.txt")}
    listed = {e.name for entries in splits.values() for e in entries}
    overlap = {e.name for e in splits["trainval"]} & {e.name for e in splits["test"]}
    if overlap:
        raise DataError(f"pets: {len(overlap)} image(s) in both trainval.txt and test.txt, e.g. {sorted(overlap)[0]}")
    all_list = read_list(root / "list.txt") if (root / "list.txt").is_file() else []
    boxes = read_boxes(root)
    entries = splits["trainval"] + splits["test"]
    decoded = {}
    for e in entries:
        image, trimap, (w, h) = _load(root, e.name, size)
        box = boxes.get(e.name)
        if box is not None:
            x0, y0, x1, y1, bw, bh = box
            if (bw, bh) != (w, h):
                raise DataError(f"pets: the head box of {e.name} is for a {bw}x{bh} image; images/{e.name}.jpg is {w}x{h}")
            if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
                raise DataError(f"pets: the head box of {e.name} ({x0}, {y0}, {x1}, {y1}) is not inside its {w}x{h} image")
            box = (x0 / w, y0 / h, x1 / w, y1 / h)
        decoded[e.name] = (image, trimap, box)
    files = {p.stem for p in (root / "images").glob("*.jpg")}
    result = {
        "splits": splits, "decoded": decoded, "boxes": boxes, "list": all_list,
        "unlisted": sorted(files - listed),
        "files": {"images/*.jpg": len(files), "trimaps/*.png": len(list((root / "trimaps").glob("*.png"))),
                  "list.txt": len(all_list), "trainval.txt": len(splits["trainval"]), "test.txt": len(splits["test"]),
                  "heads.csv" if (root / "heads.csv").is_file() else "xmls/*.xml": len(boxes)},
    }
    _CACHE[key] = result
    return result


def build_splits(options: PetsOptions) -> tuple[dict[str, PetSet], list[str], dict, Path]:
    root = resolve_root(options, FOLDER, HOW_TO_GET)
    found = scan(root, options.size)
    entries = found["splits"]["trainval"] + found["splits"]["test"]
    class_ids = sorted({e.class_id for e in entries})
    breeds = [BREEDS_37[c - 1] for c in class_ids]
    index = {c: k for k, c in enumerate(class_ids)}
    names = [e.name for e in entries]
    nan = (float("nan"),) * 4
    images = torch.from_numpy(np.stack([found["decoded"][n][0] for n in names]))
    trimaps = torch.from_numpy(np.stack([found["decoded"][n][1] for n in names]))
    boxes = torch.tensor([found["decoded"][n][2] or nan for n in names], dtype=torch.float32)
    every = PetSet(names, images, trimaps, torch.tensor([index[e.class_id] for e in entries]),
                   torch.tensor([e.species - 1 for e in entries]), boxes, options.segmentation, options.normalize)
    trainval = [e.name for e in found["splits"]["trainval"]]
    if len(trainval) <= options.val_size:
        raise DataError(f"pets: {len(trainval)} trainval images, not more than data.val_size={options.val_size}")
    val = validation_names(trainval, options.val_size)
    position = {n: i for i, n in enumerate(names)}
    splits = {
        "train": every.subset([position[n] for n in trainval if n not in val], flip=options.flip),
        "val": every.subset([position[n] for n in trainval if n in val]),
        "test": every.subset([position[e.name] for e in found["splits"]["test"]]),
    }
    for split in splits.values():
        split.breed_names = breeds
    return splits, breeds, found, root


def make_tasks(options: PetsOptions, breeds: list[str]) -> list:
    num_classes = 3 if options.segmentation == "trimap" else 2
    size = (options.size, options.size)
    return [SegmentationTask("segmentation", num_classes, IGNORE_INDEX, output_size=size),
            ClassificationTask("breed", len(breeds)), BinaryTask("species"), BoxTask("head_box", options.box_loss)]


@DATASETS.register("pets", PetsOptions)
def build_pets(options: PetsOptions) -> DataBundle:
    """Oxford-IIIT Pet: segmentation (trimap), breed, species, head box."""
    splits, breeds, _, _ = build_splits(options)
    if len(breeds) < 2:
        raise DataError(f"pets: the lists hold a single breed ({breeds[0]}); breed classification needs two or more")
    s = options.size
    return DataBundle(splits["train"], splits["val"], splits["test"], make_tasks(options, breeds), (3, s, s))


def check(options: PetsOptions) -> dict:
    """Everything ``taskloom data check pets`` prints: file counts, split sizes, class and box
    counts per split, images in no list and images without a head box."""
    started = time.perf_counter()
    splits, _, found, root = build_splits(options)
    kept = [f"image in no list (not used): {n}" for n in found["unlisted"]]
    for split in ("train", "val", "test"):
        missing = [n for n, b in zip(splits[split].names, splits[split].boxes) if torch.isnan(b).any()]
        if split == "test" and len(missing) == len(splits[split]):
            kept.append(f"no head box for any of the {len(missing)} test images (the release annotates trainval "
                        f"only): head_box is scored on the validation fold")
        else:
            kept.extend(f"no head box ({split}): {n}" for n in missing)
    return {
        "root": str(root),
        "files": found["files"],
        "splits": {k: len(v) for k, v in splits.items()},
        "class_counts": {k: v.class_counts() for k, v in splits.items()},
        "kept": kept, "skipped": [], "errors": [],
        "seconds": time.perf_counter() - started,
    }
