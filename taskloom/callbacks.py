"""The training loop's side effects, as callbacks: the metrics log, checkpoints, the progress bar
(and TensorBoard, in :mod:`taskloom.tracking`).

:func:`taskloom.train.fit` calls the hooks of a :class:`Callback` at fixed points of the loop
and hands each one the :class:`Loop`: the model, optimizer, ... and the checkpointed counters.
Under torchrun ``fit`` gives the callbacks that write files to rank 0 only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from taskloom import checkpoint, distributed
from taskloom.config import diff
from taskloom.errors import CheckpointError, ConfigError
from taskloom.optim import Precision
from taskloom.rundir import RunDir
from taskloom.tasks import Task

# Keys that may differ between a run and its resumption without changing the result.
RESUME_SAFE_KEYS = {"train.device", "train.progress", "train.threads", "train.tensorboard", "train.sync_every",
                    "data.num_workers", "data.root", "data.eval_batch_size"}


def new_state() -> dict[str, Any]:
    """The counters of a run that has not trained yet."""
    return {"epoch": 0, "step": 0, "best_score": -math.inf, "best_epoch": -1, "seconds": 0.0,
            "partial": empty_partial()}


def empty_partial() -> dict[str, Any]:
    """Running sums of the epoch in progress (checkpointed for mid-epoch resume)."""
    return {"loss_sum": {}, "labelled": {}, "penalty_sum": {}, "weight_sum": {}, "count": 0}


@dataclass
class Loop:
    """The objects of one training run and its counters: what the loop updates and what every
    hook receives.

    ``state`` is saved as the checkpoint's ``"state"``: ``epoch`` (finished epochs), ``step``
    (finished steps of the epoch in progress), ``best_score``, ``best_epoch``, ``seconds`` and
    ``partial`` (running sums of the epoch in progress), so that a resumed run goes on exactly
    where it stopped, also in the middle of an epoch.
    """

    model: nn.Module  # the bare model: state dicts, loss terms, penalties
    net: nn.Module  # what the forward pass runs through: the model, or DistributedDataParallel around it
    weighting: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    precision: Precision
    tasks: list[Task]
    ctx: distributed.Context
    device: torch.device
    state: dict[str, Any] = field(default_factory=new_state)
    sync_every: int = 1  # steps between reads of the epoch's sums from the device (train.sync_every)


class Callback:
    """Base class of the loop's callbacks; every hook does nothing unless overridden."""

    def on_epoch_start(self, loop: Loop, num_batches: int) -> None:
        """Before the first training batch of an epoch of ``num_batches`` batches (in a resumed
        epoch, ``loop.state["step"]`` of them are already done)."""

    def on_batch_end(self, loop: Loop, losses: dict[str, Tensor]) -> None:
        """After each optimizer step, with that step's task losses."""

    def on_epoch_end(self, loop: Loop, record: dict[str, Any]) -> None:
        """After validation, with the epoch's ``metrics.jsonl`` record; ``loop.state`` already
        counts the epoch as done."""

    def on_interrupt(self, loop: Loop) -> None:
        """After the step during which SIGINT/SIGTERM arrived, before ``fit`` raises ``Interrupted``."""

    def close(self) -> None:
        """When training ends, normally or by an exception."""


class MetricsLog(Callback):
    """Appends every epoch's record to ``metrics.jsonl``."""

    def __init__(self, run_dir: RunDir):
        self.run_dir = run_dir

    def on_epoch_end(self, loop: Loop, record: dict[str, Any]) -> None:
        self.run_dir.append_metrics(record)


class ProgressBar(Callback):
    """A tqdm bar over each epoch's training batches, showing the epoch's mean task losses so
    far (as of the last read of the sums from the device: every ``train.sync_every`` steps).

    The bar is closed when its last batch is done, so that it is gone before validation starts.
    """

    def __init__(self, epochs: int):
        from tqdm import tqdm  # only imported when a bar is shown

        self.tqdm, self.epochs, self.bar = tqdm, epochs, None

    def on_epoch_start(self, loop: Loop, num_batches: int) -> None:
        self.close()
        self.bar = self.tqdm(total=num_batches, initial=loop.state["step"], leave=False, dynamic_ncols=True,
                             desc=f"epoch {loop.state['epoch'] + 1}/{self.epochs}")

    def on_batch_end(self, loop: Loop, losses: dict[str, Tensor]) -> None:
        partial = loop.state["partial"]  # host numbers: reading them does not wait for the device
        labelled = partial.get("labelled", {})
        self.bar.set_postfix({n: f"{partial['loss_sum'][n] / labelled[n]:.3f}"
                              for n in losses if labelled.get(n)})
        self.bar.update()
        if self.bar.n >= self.bar.total:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class Checkpointer(Callback):
    """Saves ``last.pt`` after every epoch and on an interrupt, and ``best.pt`` (without the
    optimizer and scheduler states) after an epoch that improved the selection score.

    Every save is atomic (:func:`taskloom.checkpoint.save`); :func:`restore` loads ``last.pt`` back.
    """

    def __init__(self, run_dir: RunDir, config: dict[str, Any] | None, params: int):
        self.run_dir, self.config, self.params = run_dir, config, params

    def on_epoch_end(self, loop: Loop, record: dict[str, Any]) -> None:
        if loop.state["best_epoch"] == record["epoch"]:  # this epoch set the best score
            self.save(loop, self.run_dir.best, with_optimizer=False)
        self.save(loop, self.run_dir.last)

    def on_interrupt(self, loop: Loop) -> None:
        self.save(loop, self.run_dir.last)

    def save(self, loop: Loop, path: Path, with_optimizer: bool = True) -> None:
        payload = {"config": self.config, "model": loop.model.state_dict(), "weighting": loop.weighting.state_dict(),
                   "state": dict(loop.state), "rng": {"torch": torch.get_rng_state()},
                   "params": self.params, "tasks": [t.name for t in loop.tasks]}
        if with_optimizer:
            payload["optimizer"] = loop.optimizer.state_dict()
            payload["scheduler"] = loop.scheduler.state_dict()
        checkpoint.save(payload, path)


def restore(loop: Loop, run_dir: RunDir, config: dict[str, Any] | None, *, force: bool = False) -> None:
    """Load ``run_dir.last`` into ``loop``: the model, weighting, optimizer and scheduler states,
    the counters and torch's RNG state.

    A checkpoint whose config differs from ``config`` in a key outside :data:`RESUME_SAFE_KEYS`
    is refused (:class:`ConfigError`) unless ``force``.
    """
    path = run_dir.last
    payload = checkpoint.load(path)
    if config is not None and payload.get("config") is not None and not force:
        changed = [k for k in diff(payload["config"], config) if k not in RESUME_SAFE_KEYS]
        if changed and _is_run_config(run_dir, config):
            raise ConfigError(
                f"{path}: the checkpoint does not match the run's config ({run_dir.config}); keys that differ: "
                f"{', '.join(changed)}. The checkpoint was written with another config: put that config back, "
                f"pass --force, or start afresh in another --run-dir"
            )
        if changed:
            raise ConfigError(
                f"{path}: cannot resume with a different config; changed keys: {', '.join(changed)}. "
                f"Resume with the run's own config ({run_dir.config}) or pass --force"
            )
    try:
        loop.model.load_state_dict(payload["model"])
        loop.weighting.load_state_dict(payload["weighting"])
        loop.optimizer.load_state_dict(payload["optimizer"])
        loop.scheduler.load_state_dict(payload["scheduler"])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{path}: does not match this model ({exc})") from None
    loop.state.update(payload["state"])
    torch.set_rng_state(payload["rng"]["torch"])


def _is_run_config(run_dir: RunDir, config: dict[str, Any]) -> bool:
    """Whether ``config`` is the one saved in ``run_dir``'s ``config.yaml`` (resume-safe keys aside)."""
    import yaml

    try:
        saved = yaml.safe_load(run_dir.config.read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return False
    return isinstance(saved, dict) and not [k for k in diff(saved, config) if k not in RESUME_SAFE_KEYS]
