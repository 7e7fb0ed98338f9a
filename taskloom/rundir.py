"""The run directory: the files of one training run and the order they are opened in.

::

    RUN_DIR/
        config.yaml           the resolved config (when fit() is given one)
        metrics.jsonl         one JSON record per finished epoch
        checkpoints/last.pt   after every epoch and on an interrupt (exact resume)
        checkpoints/best.pt   the epoch selected on validation (no optimizer state)
        tensorboard/          event files (train.tensorboard: true)
        final.json            test metrics of best.pt

Under torchrun only rank 0 writes; every rank reads ``last.pt`` and ``best.pt``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from taskloom.config import Config, dump
from taskloom.errors import ConfigError


class RunDir:
    """Paths of a run directory, and the steps that open it for a new or a resumed run."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.config = self.path / "config.yaml"
        self.metrics = self.path / "metrics.jsonl"
        self.last = self.path / "checkpoints" / "last.pt"
        self.best = self.path / "checkpoints" / "best.pt"
        self.final = self.path / "final.json"

    def should_resume(self, resume: bool, log: Callable[..., None]) -> bool:
        """Whether to continue from ``last.pt``.

        A directory that already holds a checkpoint is never trained over: without ``resume``
        that is a :class:`ConfigError`. With ``resume`` but no checkpoint the run starts afresh.
        """
        if resume and self.last.is_file():
            return True
        if resume:
            log(f"no checkpoint at {self.last}; starting from scratch")
        elif self.last.is_file():
            raise ConfigError(
                f"{self.path} already holds a run ({self.last}); pass --resume to continue it or choose another --run-dir"
            )
        return False

    def prepare(self, config: Config | None, epochs_done: int) -> None:
        """Create the folder, write ``config.yaml`` and cut the log back to ``epochs_done`` epochs."""
        self.path.mkdir(parents=True, exist_ok=True)
        if config is not None:
            dump(config, self.config)
        self.truncate_metrics(epochs_done)

    def truncate_metrics(self, epochs_done: int) -> None:
        """Drop log lines of epochs after the checkpoint (written before a crash or kill)."""
        if not self.metrics.is_file():
            return
        kept = [line for line in self._metric_lines() if json.loads(line).get("epoch", 0) <= epochs_done]
        self.metrics.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    def _metric_lines(self) -> list[str]:
        """The non-empty lines of ``metrics.jsonl``: every reader of the log goes through here."""
        if not self.metrics.is_file():
            return []
        return [line for line in self.metrics.read_text(encoding="utf-8").splitlines() if line.strip()]

    def append_metrics(self, record: dict[str, Any]) -> None:
        """Append one epoch's record to ``metrics.jsonl``."""
        with open(self.metrics, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def write_final(self, final: dict[str, Any]) -> None:
        """Write ``final.json``."""
        self.final.write_text(json.dumps(final, indent=2) + "\n", encoding="utf-8")
