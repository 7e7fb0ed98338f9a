"""Time of the trainer's steps when it reads its running sums from the device every step
(``train.sync_every: 1``) against every ``--every`` steps (default 50, the default setting).

Reading a number from a GPU waits for all queued work, so the host cannot queue step ``n + 1``
while the GPU runs step ``n``; on a CPU there is nothing to wait for, and the ratio should be
1 there. The network is the MTFL record's (TCDCN towers with cross-stitch units, 5 tasks:
landmarks and 4 two-class attributes, 1x40x40 inputs), on generated data held on the host as the
trainer's loader serves it (pinned on CUDA).

Method: one process; each variant is the same model from the same seed with its own optimizer.
Every round times one call of :func:`taskloom.train.train_one_epoch` over ``--steps`` batches for
every variant, in a fresh random order, after ``--warmup`` rounds. Reported: median ms per step,
IQR, and the median over rounds of the paired ratio to ``sync_every: 1``.

    python benchmarks/trainer_reads.py --rounds 10 --warmup 2 --threads 2
"""
from __future__ import annotations

import argparse
import copy
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from step_time import add_timing_arguments, quartiles, write_json  # noqa: E402

from taskloom import distributed  # noqa: E402
from taskloom.architectures import CrossStitchOptions, build_model  # noqa: E402
from taskloom.backbones import TCDCNOptions  # noqa: E402
from taskloom.callbacks import Loop, empty_partial  # noqa: E402
from taskloom.config import TrainConfig  # noqa: E402
from taskloom.data.packed import Batch  # noqa: E402  (also lets the DataLoader pass a Batch through)
from taskloom.tasks import ClassificationTask, LandmarkTask  # noqa: E402
from taskloom.train import build_loop, train_one_epoch  # noqa: E402

SHAPE = (1, 40, 40)
TASKS = [LandmarkTask("landmarks", 5, eyes=(0, 1))] + [ClassificationTask(n, 2) for n in
                                                        ("gender", "smile", "glasses", "pose")]


class Generated(torch.utils.data.Dataset):
    def __init__(self, n: int):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, *SHAPE, generator=g)
        self.y = {"landmarks": torch.rand(n, 5, 2, generator=g)}
        self.y.update({t.name: torch.randint(0, 2, (n,), generator=g) for t in TASKS[1:]})

    def __len__(self):
        return len(self.x)

    def __getitems__(self, indices):  # a whole batch at once, as taskloom's packed datasets serve it
        i = torch.tensor(indices)
        return [Batch(self.x[i], {k: v[i] for k, v in self.y.items()})]


def make_loop(base: torch.nn.Module, sync_every: int, device: torch.device) -> Loop:
    loop, _ = build_loop(copy.deepcopy(base), TrainConfig(sync_every=sync_every), distributed.Context(), device)
    return loop


def timed_epoch(loop: Loop, data, batches) -> float:
    loop.state.update(step=0, partial=empty_partial())
    if loop.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    train_one_epoch(loop, data, batches)  # ends with a read, which waits for the device
    return time.perf_counter() - start


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_timing_arguments(p, "")
    p.add_argument("--every", nargs="+", type=int, default=[50], help="sync_every values to compare with 1")
    p.add_argument("--steps", type=int, default=20, help="training steps per timed call")
    p.add_argument("--batch", type=int, default=64)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    started = time.perf_counter()
    torch.manual_seed(0)
    base = build_model(CrossStitchOptions(), TCDCNOptions(), TASKS, SHAPE)
    data = Generated(args.steps * args.batch)
    batches = [list(range(i, i + args.batch)) for i in range(0, len(data), args.batch)]
    settings = [1] + [e for e in args.every if e != 1]
    loops = {e: make_loop(base, e, device) for e in settings}
    times: dict[int, list[float]] = {e: [] for e in settings}
    for r in range(args.warmup + args.rounds):
        order = list(settings)
        random.Random(r).shuffle(order)
        for e in order:
            seconds = timed_epoch(loops[e], data, batches)
            if r >= args.warmup:
                times[e].append(seconds / len(batches) * 1e3)
    rows = []
    for e in settings:
        q1, med, q3 = quartiles(times[e])
        ratios = [a / b for a, b in zip(times[e], times[1])]
        rq1, ratio, rq3 = quartiles(ratios)
        rows.append({"sync_every": e, "ms_per_step": round(med, 3), "iqr": [round(q1, 3), round(q3, 3)],
                     "ratio_to_every_step": round(ratio, 4), "ratio_iqr": [round(rq1, 4), round(rq3, 4)]})
        print(f"sync_every {e:>4}: {med:8.2f} ms/step (IQR {q1:.2f}-{q3:.2f})  x{ratio:.3f} of sync_every 1 "
              f"(IQR {rq1:.3f}-{rq3:.3f})", flush=True)
    write_json(args, device, rows, round(time.perf_counter() - started, 1), steps=args.steps, batch=args.batch,
               model="cross_stitch tcdcn, 5 tasks", median=statistics.median(times[1]))
    return {"rows": rows}


if __name__ == "__main__":
    main()
