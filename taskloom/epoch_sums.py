"""The running sums of the epoch in progress, added on the device between reads.

Reading a number back from an accelerator (``.item()``, ``float(t)``, ``if t:``) waits until the
device has run every kernel queued so far. Done for every task loss of every step, it keeps the
host from queueing step ``n + 1`` while the device still works on step ``n``, and a network of
many small layers then leaves the device idle between launches. :class:`DeviceSums` keeps the
epoch's sums (task losses over their labelled samples, labelled counts, penalties, task weights)
and the first non-finite loss on the device, and the trainer reads them into
``loop.state["partial"]`` every ``train.sync_every`` steps and at the end of each
:func:`~taskloom.train.train_one_epoch`, in one transfer.

The sums are float64 and use the operations the Python floats of ``state["partial"]`` would
(``sum + float64(loss) * count``), so they equal those of per-step ``.item()`` bit for bit, and a
checkpoint holds the same numbers whatever ``sync_every`` is.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

# The integer sums of ``state["partial"]`` (the others are floats).
_INT_KEYS = ("labelled",)


@dataclass(frozen=True)
class NonFiniteLoss:
    """The first NaN or infinite task loss since a read: the task, the 1-based step of the
    epoch and the value."""

    task: str
    step: int
    value: float


class DeviceSums:
    """Running sums that :meth:`add` updates on ``device`` and :meth:`read` adds to ``partial``.

    ``partial`` is the epoch's ``{"loss_sum": {task: float}, "labelled": {task: int},
    "penalty_sum": {name: float}, "weight_sum": {task: float}, "count": int}``
    (:func:`taskloom.callbacks.empty_partial`); ``count`` is a host number and stays on the host.
    """

    def __init__(self, partial: dict[str, Any], device: torch.device):
        self.partial = partial
        # MPS has no float64: sum on the host there (each step then waits, as before).
        self.device = torch.device("cpu") if device.type == "mps" else device
        self._sums: dict[tuple[str, str], Tensor] = {}
        self._tasks: list[str] = []
        self._bad_step: Tensor | None = None  # per task: first step with a non-finite loss, or 0
        self._bad_value: Tensor | None = None

    def _add(self, key: str, name: str, value: Tensor | float) -> None:
        total = self._sums.get((key, name))
        if total is None:  # start from the host's sum; torch.full does not copy (no wait)
            start = self.partial.setdefault(key, {}).get(name, 0)
            total = torch.full((), start, dtype=torch.int64 if key in _INT_KEYS else torch.float64,
                               device=self.device)
        self._sums[key, name] = total + value

    def add(self, step: int, losses: dict[str, Tensor], labelled: dict[str, Tensor],
            penalties: dict[str, Tensor], weights: dict[str, Tensor | float], n: int) -> None:
        """Add step ``step`` (1-based in the epoch) of ``n`` samples: each task's mean loss over
        its ``labelled[task]`` samples (a count tensor), the penalties, the weights used."""
        for name, loss in losses.items():
            k = labelled[name].to(self.device)
            self._add("loss_sum", name, loss.detach().to(self.device, torch.float64) * k)
            self._add("labelled", name, k)
        for name, value in penalties.items():
            self._add("penalty_sum", name, value.detach().to(self.device, torch.float64) * n)
        for name, value in weights.items():
            if isinstance(value, Tensor):
                value = value.detach().to(self.device, torch.float64)
            self._add("weight_sum", name, value * n)
        self.partial["count"] += n
        self._track_finite(step, losses)

    def _track_finite(self, step: int, losses: dict[str, Tensor]) -> None:
        values = torch.stack([loss.detach().to(self.device, torch.float32) for loss in losses.values()])
        if self._bad_step is None:
            self._tasks = list(losses)
            self._bad_step = torch.zeros(len(values), dtype=torch.int64, device=self.device)
            self._bad_value = torch.zeros_like(values)
        new = ~torch.isfinite(values) & (self._bad_step == 0)
        self._bad_step = torch.where(new, step, self._bad_step)
        self._bad_value = torch.where(new, values, self._bad_value)

    def read(self) -> NonFiniteLoss | None:
        """Add the device's sums to ``partial`` (one transfer) and start over from there. Returns
        the earliest non-finite loss since the last read, if there was one."""
        keys = list(self._sums)
        parts = [self._sums[k] for k in keys]
        if self._bad_step is not None:
            parts += [self._bad_step, self._bad_value]
        if not parts:
            return None
        values = torch.cat([p.to(torch.float64).reshape(-1) for p in parts]).tolist()  # the one wait
        for (key, name), value in zip(keys, values):
            self.partial[key][name] = round(value) if key in _INT_KEYS else value
        bad = None
        if self._bad_step is not None:
            k = len(self._tasks)
            steps, bad_values = values[len(keys):len(keys) + k], values[len(keys) + k:]
            found = [(s, i) for i, s in enumerate(steps) if s > 0]
            if found:
                step, i = min(found)
                bad = NonFiniteLoss(self._tasks[i], int(step), bad_values[i])
        self._sums.clear()
        self._bad_step = self._bad_value = None
        return bad
