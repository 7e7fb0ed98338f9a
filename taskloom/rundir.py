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

import contextlib
import json
import os
import socket
import time
from pathlib import Path
from typing import Any, Callable, Iterator

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
        self.lockfile = self.path / ".lock"
        self._holding = 0  # nesting depth of lock() on this object (re-entrant for its holder)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold an advisory lock on the folder for the ``with`` block: one writer per run directory.

        ``fcntl.flock`` on ``RUN_DIR/.lock``: the kernel releases it when the holder exits in any
        way (``kill -9`` included), so a lock is never stale. A second writer is refused with a
        :class:`ConfigError` naming the holder's pid, host and start time (written in the file).
        Re-entrant on the same object (``taskloom train`` takes it before building the data and
        model, and :func:`~taskloom.train.fit` again); another ``RunDir`` of the folder is refused.
        """
        if self._holding:
            self._holding += 1
            try:
                yield
            finally:
                self._holding -= 1
            return
        try:
            import fcntl
        except ImportError:  # no flock (Windows): no lock
            yield
            return
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.lockfile, os.O_RDWR | os.O_CREAT, 0o644)
        except (FileExistsError, NotADirectoryError):
            raise ConfigError(f"--run-dir {self.path}: is a file, not a folder; choose another --run-dir") from None
        except OSError as exc:
            raise ConfigError(f"--run-dir {self.path}: cannot create ({exc.strerror or exc})") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 400, 0).decode("utf-8", "replace").strip() or "another process"
                raise ConfigError(
                    f"{self.path} is in use by {holder}; one process writes a run directory at a time: "
                    f"wait for it to finish (or stop it), or choose another --run-dir"
                ) from None
            os.ftruncate(fd, 0)
            stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} (since {stamp})\n".encode(), 0)
            self._holding = 1
            yield
        finally:
            self._holding = 0
            os.close(fd)  # releases the lock

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

    def prepare(self, config: Config | None, epochs_done: int, log: Callable[..., None] = lambda *a: None) -> None:
        """Create the folder, write ``config.yaml`` and cut the log back to ``epochs_done`` epochs."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise ConfigError(f"--run-dir {self.path}: is a file, not a folder; choose another --run-dir") from None
        if config is not None:
            dump(config, self.config)
        self.truncate_metrics(epochs_done, log)

    def truncate_metrics(self, epochs_done: int, log: Callable[..., None] = lambda *a: None) -> None:
        """Drop log lines of epochs after the checkpoint (written before a crash or kill), and a
        torn last line (a crash or a full disk in the middle of writing it)."""
        if not self.metrics.is_file():
            return
        records = self._metric_records(log)
        kept = [line for line, record in records if record.get("epoch", 0) <= epochs_done]
        self.metrics.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    def _metric_records(self, log: Callable[..., None] = lambda *a: None) -> list[tuple[str, dict[str, Any]]]:
        """The lines of ``metrics.jsonl`` with their records. A torn final line is dropped (with a
        message); a corrupt earlier line is a :class:`ConfigError` naming its line number."""
        lines = self._metric_lines()
        records = []
        for number, line in enumerate(lines, 1):
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError("not a JSON object")
            except ValueError:
                if number == len(lines):
                    log(f"{self.metrics}: dropping the torn last line {number} (left by a crash or a full disk)")
                    break
                raise ConfigError(
                    f"{self.metrics}, line {number}: corrupt record (not a JSON object); repair or delete "
                    f"that line before resuming"
                ) from None
            records.append((line, record))
        return records

    def _metric_lines(self) -> list[str]:
        """The non-empty lines of ``metrics.jsonl``: every reader of the log goes through here."""
        if not self.metrics.is_file():
            return []
        try:
            text = self.metrics.read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            raise ConfigError(f"{self.metrics}: cannot read ({exc.strerror or exc})") from None
        return [line for line in text.splitlines() if line.strip()]

    def append_metrics(self, record: dict[str, Any]) -> None:
        """Append one epoch's record to ``metrics.jsonl``."""
        with open(self.metrics, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def write_final(self, final: dict[str, Any]) -> None:
        """Write ``final.json``."""
        self.final.write_text(json.dumps(final, indent=2) + "\n", encoding="utf-8")
