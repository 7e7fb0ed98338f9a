"""Distributed training through PyTorch's own engine: ``torchrun`` + DistributedDataParallel.

``torchrun --nproc_per_node=N -m taskloom train ...`` starts N processes with ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous variables set; :func:`setup` joins them into a
process group (NCCL on CUDA, gloo on CPU). Every rank sees the same shuffled *global* batches
and takes its own slice of each, so a run on N processes follows a single-process run with the
same global batch (up to the order of floating-point reductions).

Also here: the device a process trains on (:func:`resolve_device`) and stop requests
(:func:`stop_requests`: SIGINT/SIGTERM, which every rank acts on after the same step).
"""
from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist

from taskloom.errors import ConfigError


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False  # True when setup() created the process group (and teardown ends it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def sum(self, values: list[float]) -> list[float]:
        """Sum a list of numbers over all ranks (identity on one process)."""
        if not self.enabled:
            return values
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    def any(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is true on any rank."""
        return bool(self.sum([float(flag)])[0]) if self.enabled else flag

    def mean(self, sums: dict[str, float], count: int | dict[str, int]) -> dict[str, float]:
        """Per-key means over all ranks: ``sums[k] / count`` (or ``/ count[k]``, per-key counts)."""
        names = sorted(sums)
        counts = [float(count[n] if isinstance(count, dict) else count) for n in names]
        totals = self.sum([sums[n] for n in names] + counts)
        return {n: s / max(c, 1.0) for n, s, c in zip(names, totals[:len(names)], totals[len(names):])}

    def shard(self, indices: list[int]) -> list[int]:
        """This rank's slice of a global batch (or of an evaluation set)."""
        return indices[self.rank::self.world]


def is_main_process() -> bool:
    """Whether this process is rank 0 of what torchrun started (or the only process): the one that
    writes the run directory and reports. Read from the environment, before :func:`setup`."""
    return int(os.environ.get("WORLD_SIZE", "1")) <= 1 or int(os.environ["RANK"]) == 0


def setup(device_type: str) -> Context:
    """Join the process group that torchrun describes (no-op for a single process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Context()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_initialized():  # the caller set up the group and keeps ownership of it
        return Context(rank, world, local_rank)
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    # Context.sum/any reduce host numbers as CPU tensors, and NCCL has no CPU collectives ("No
    # backend type associated with device type cpu"): on CUDA, gloo takes those, NCCL the rest.
    dist.init_process_group(backend="cpu:gloo,cuda:nccl" if device_type == "cuda" else "gloo")
    return Context(rank, world, local_rank, owns_group=True)


def teardown(ctx: Context) -> None:
    """Destroy the process group if :func:`setup` created it."""
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def resolve_device(name: str) -> torch.device:
    """The device ``train.device`` names; ``auto`` is CUDA, else MPS, else the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: 'cuda' requested but no CUDA device is available (use auto or cpu)")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("train.device: 'mps' requested but MPS is not available (use auto or cpu)")
    return torch.device(name)


@contextmanager
def stop_requests() -> Iterator[list[int]]:
    """Turn SIGINT/SIGTERM into a flag (a non-empty list) for the loop to check after every step.

    Combine it over ranks with :meth:`Context.any`, so that every rank stops after the same step.
    A second signal stops at once (``KeyboardInterrupt``). Signal handlers can only be set in the
    main thread: elsewhere the flag stays empty.
    """
    received: list[int] = []
    if not hasattr(signal, "SIGTERM") or threading.current_thread() is not threading.main_thread():
        yield received
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum: int, frame: Any) -> None:
        if received:  # a second signal: stop now
            signal.signal(signum, previous[signum])
            raise KeyboardInterrupt
        received.append(signum)

    for s in previous:
        signal.signal(s, handler)
    try:
        yield received
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
