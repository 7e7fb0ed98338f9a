"""Train one network on the union of several datasets that label different tasks.

``data: {name: mix, members: [{name: mtfl, ...}, {name: utkface, ...}], channels: 1, size: 40}``

* **Tasks.** The union of the members' tasks, in member order. A task of the same name in two
  members (for example ``gender`` in MTFL and UTKFace) is one task, labelled by both; it must be
  of the same kind and size in both. A sample of a member that does not label a task gets that
  task's "missing" target (:meth:`taskloom.tasks.Task.missing_like`), which losses and metrics skip.
* **Inputs.** Every member's inputs must end up the same shape. ``channels`` (1: grey as the
  channel mean, 3: grey repeated) and ``size`` (bilinear resize) adapt them; a mismatch left
  is a clear error.
* **Sampling.** Without ``ratios`` the training split is the concatenation of the members'.
  ``ratios: {task: r}`` sets a per-task sampling ratio: member m gets the share
  ``sum over its tasks t of r_t / (members labelling t)`` of the ``epoch_size`` training samples
  per epoch (default: the members' total), drawn without replacement while a member has enough
  samples and with repetition beyond (a seeded choice, fixed for the run). Tasks not listed
  weigh 0. Validation and test splits are the concatenation of the members' (each task is
  evaluated on the samples that label it).
"""
from __future__ import annotations

import bisect
import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from taskloom.data import DATASETS, DataBundle, DataOptions
from taskloom.errors import DataError
from taskloom.tasks import Task


@dataclasses.dataclass
class MixOptions(DataOptions):
    """The union of several datasets (see the module docstring)."""

    name: str = "mix"
    members: list[DataOptions] = dataclasses.field(default_factory=list)
    """Member datasets, each a full dataset config (``{name: mtfl, root: ..., tasks: [...]}``)."""
    ratios: dict[str, float] | None = None
    """Per-task sampling ratio (``null``: concatenate the members' training splits)."""
    epoch_size: int | None = None
    """Training samples per epoch when ``ratios`` is set (``null``: the members' total)."""
    channels: int | None = None
    """Convert every member's input to 1 (grey) or 3 channels (``null``: leave as is)."""
    size: int | None = None
    """Resize every member's input to ``size`` x ``size`` (``null``: leave as is)."""
    seed: int = 0
    """Seed of the sampling choice."""

    def __post_init__(self) -> None:
        getattr(super(), "__post_init__", lambda: None)()
        if self.channels not in (None, 1, 3):
            raise ValueError("channels must be 1, 3 or null")
        if self.size is not None and self.size < 4:
            raise ValueError("size must be at least 4")
        if self.epoch_size is not None and self.epoch_size < 1:
            raise ValueError("epoch_size must be positive")
        if self.ratios and any(r < 0 for r in self.ratios.values()):
            raise ValueError("ratios must be >= 0")


def adapt_shape(shape: tuple[int, ...], channels: int | None, size: int | None) -> tuple[int, ...]:
    c, *hw = shape
    if channels is not None:
        c = channels
    if size is not None and len(hw) == 2:
        hw = [size, size]
    return (c, *hw)


def adapt_input(x: Tensor, channels: int | None, size: int | None) -> Tensor:
    """One ``(C, H, W)`` input converted to ``channels`` and resized to ``size`` x ``size``."""
    if channels is not None and x.shape[0] != channels:
        x = x.mean(0, keepdim=True) if channels == 1 else x.expand(channels, *x.shape[1:])
    if size is not None and x.ndim == 3 and tuple(x.shape[1:]) != (size, size):
        x = F.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False)[0]
    return x.contiguous()


class MixedSet(Dataset):
    """Samples ``index = [(member, i), ...]`` of member datasets with every task's target filled in."""

    def __init__(self, members: list[Dataset], index: list[tuple[int, int]] | None, tasks: list[Task],
                 labelled_by: list[set[str]], templates: dict[str, Tensor], channels: int | None, size: int | None):
        self.members, self.tasks, self.labelled_by = members, tasks, labelled_by
        self.templates, self.channels, self.size = templates, channels, size
        self.index = index
        self._offsets = [0]
        for m in members:
            self._offsets.append(self._offsets[-1] + len(m))

    def __len__(self) -> int:
        return len(self.index) if self.index is not None else self._offsets[-1]

    def locate(self, i: int) -> tuple[int, int]:
        if self.index is not None:
            return self.index[i]
        m = bisect.bisect_right(self._offsets, i) - 1
        return m, i - self._offsets[m]

    def __getitem__(self, i: int) -> tuple[Tensor, dict[str, Tensor]]:
        m, j = self.locate(i)
        x, y = self.members[m][j]
        out = {}
        for t in self.tasks:
            out[t.name] = torch.as_tensor(y[t.name]) if t.name in self.labelled_by[m] else self.templates[t.name]
        return adapt_input(x, self.channels, self.size), out


def sampling_index(sizes: list[int], shares: list[float], total: int, seed: int) -> list[tuple[int, int]]:
    """``total`` (member, sample) pairs, member m getting ``round(total * share_m)`` of them."""
    g = torch.Generator().manual_seed(seed)
    weight = sum(shares)
    index: list[tuple[int, int]] = []
    for m, (n, share) in enumerate(zip(sizes, shares)):
        want = round(total * share / weight)
        picks = []
        while len(picks) < want:
            picks += torch.randperm(n, generator=g)[: want - len(picks)].tolist()
        index += [(m, j) for j in picks]
    return index


@DATASETS.register("mix", MixOptions)
def build_mix(options: MixOptions) -> DataBundle:
    """The union of several datasets labelling different tasks (missing targets elsewhere)."""
    from taskloom.data import build_data

    if len(options.members) < 1:
        raise DataError("data.members: a mix needs at least one member dataset")
    bundles = []
    for k, member in enumerate(options.members):
        if member.name == "mix":
            raise DataError(f"data.members.{k}: a mix cannot contain another mix")
        try:
            bundles.append(build_data(member))
        except DataError as exc:
            raise DataError(f"data.members.{k} ({member.name}): {exc}") from None
    shapes = [adapt_shape(b.input_shape, options.channels, options.size) for b in bundles]
    if len(set(shapes)) > 1:
        listed = ", ".join(f"{m.name}: {b.input_shape} -> {s}" for m, b, s in zip(options.members, bundles, shapes))
        raise DataError(f"data: the members' inputs have different shapes ({listed}); set data.channels "
                        f"(1 or 3) and data.size so that they match")
    tasks: list[Task] = []
    by_name: dict[str, Task] = {}
    templates: dict[str, Tensor] = {}
    for k, b in enumerate(bundles):
        sample = b.train[0][1] if len(b.train) else None
        for t in b.tasks:
            if t.name in by_name:
                first = by_name[t.name]
                same = type(first) is type(t) and all(getattr(first, a, None) == getattr(t, a, None)
                                                       for a in ("num_classes", "num_labels", "dims", "num_landmarks"))
                if not same:
                    raise DataError(f"data.members.{k} ({options.members[k].name}): task {t.name!r} is {t!r} here "
                                    f"but {first!r} in an earlier member; rename one with data.tasks or use one kind")
                continue
            by_name[t.name] = t
            tasks.append(t)
            if sample is None:
                raise DataError(f"data.members.{k} ({options.members[k].name}): empty training split")
            templates[t.name] = t.missing_like(torch.as_tensor(sample[t.name]))
    labelled_by = [{t.name for t in b.tasks} for b in bundles]
    if options.ratios is not None:
        unknown = sorted(set(options.ratios) - set(by_name))
        if unknown:
            raise DataError(f"data.ratios: unknown task(s) {unknown}; the mix has tasks {list(by_name)}")
        members_labelling = {n: sum(n in lab for lab in labelled_by) for n in options.ratios}
        shares = [sum(r / members_labelling[n] for n, r in options.ratios.items() if n in labels)
                  for labels in labelled_by]
        if sum(shares) <= 0:
            raise DataError("data.ratios: every ratio is 0")
        sizes = [len(b.train) for b in bundles]
        total = options.epoch_size or sum(sizes)
        train_index = sampling_index(sizes, shares, total, options.seed)
    else:
        train_index = None
    common = dict(tasks=tasks, labelled_by=labelled_by, templates=templates, channels=options.channels,
                  size=options.size)
    train = MixedSet([b.train for b in bundles], train_index, **common)
    val = MixedSet([b.val for b in bundles], None, **common)
    test = MixedSet([b.test for b in bundles], None, **common)
    return DataBundle(train, val, test, tasks, shapes[0])
