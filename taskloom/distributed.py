"""Distributed training through PyTorch's own engine: ``torchrun`` + DistributedDataParallel.

``torchrun --nproc_per_node=N -m taskloom train ...`` starts N processes with ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous variables set; :func:`setup` joins them into a
process group (NCCL on CUDA, gloo on CPU). Every rank sees the same shuffled *global* batches
and takes its own slice of each, so a run on N processes follows a single-process run with the
same global batch (up to the order of floating-point reductions).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


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

    def shard(self, indices: list[int]) -> list[int]:
        """This rank's slice of a global batch (or of an evaluation set)."""
        return indices[self.rank::self.world]


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
    dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return Context(rank, world, local_rank, owns_group=True)


def teardown(ctx: Context) -> None:
    """Destroy the process group if :func:`setup` created it."""
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()
