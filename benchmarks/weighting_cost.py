"""Cost of one training step under each loss weighting, relative to ``fixed``, side by side.

One process, one batch of real MultiMNIST, one model per (architecture, weighting) starting
from the same weights. Every round times one full trainer step (forward, losses, penalties,
zero_grad, ``weighting.backward``, optimiser step; the same calls as ``taskloom.train.fit``)
for every weighting, in a fresh random order each round, so drift in machine load hits all
of them alike. Reports per weighting the median step time, its interquartile range, and the
median over rounds of the paired ratio ``t_weighting / t_fixed`` (same round) with its IQR.

    python benchmarks/weighting_cost.py --rounds 60 --warmup 10 --json benchmarks/weighting_cost.json
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from taskloom.architectures import CrossStitchOptions, SplitOptions, build_model  # noqa: E402
from taskloom.backbones import LeNetOptions  # noqa: E402
from taskloom.config import TrainConfig  # noqa: E402
from taskloom.data import build_data  # noqa: E402
from taskloom.data.multimnist import MultiMNISTOptions  # noqa: E402
from taskloom.train import build_optimizer  # noqa: E402
from taskloom.weighting import WEIGHTINGS, build_weighting  # noqa: E402

METHODS = ["fixed", "uncertainty", "dwa", "gradnorm", "pcgrad"]
ARCHS = {"split@1": SplitOptions(at=1), "cross_stitch": CrossStitchOptions()}


def quartiles(values: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], statistics.median(values), q[2]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_arch(arch_name, data, x, y, args, device) -> dict:
    torch.manual_seed(0)
    base = build_model(ARCHS[arch_name], LeNetOptions(), data.tasks, data.input_shape)
    names = [t.name for t in data.tasks]
    cfg = TrainConfig(lr=1e-3)
    setups = {}
    for method in METHODS:
        model = copy.deepcopy(base).to(device).train()
        weighting = build_weighting(WEIGHTINGS[method].options(), names, {}).to(device)
        setups[method] = (model, weighting, build_optimizer(model, cfg, weighting))

    def step(method: str) -> float:
        model, weighting, optimizer = setups[method]
        sync(device)
        start = time.perf_counter()
        losses = model.loss_terms(model(x), y)
        penalties = model.penalty()
        optimizer.zero_grad(set_to_none=True)
        weighting.backward(losses, penalties, model)
        optimizer.step()
        sync(device)
        return time.perf_counter() - start

    rng = random.Random(0)
    times = {m: [] for m in METHODS}
    for r in range(args.warmup + args.rounds):
        order = METHODS[:]
        rng.shuffle(order)
        for m in order:
            t = step(m)
            if r >= args.warmup:
                times[m].append(t)
    fixed = times["fixed"]
    result = {}
    for m in METHODS:
        ratios = [a / b for a, b in zip(times[m], fixed)]
        q1, med, q3 = quartiles(times[m])
        r1, rmed, r3 = quartiles(ratios)
        result[m] = {"median_ms": med * 1e3, "iqr_ms": [q1 * 1e3, q3 * 1e3],
                     "ratio_median": rmed, "ratio_iqr": [r1, r3], "ratio_of_medians": med / statistics.median(fixed)}
    params = sum(p.numel() for p in base.parameters())
    return {"params": params, "methods": result}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--archs", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    data = build_data(MultiMNISTOptions(train_pairs=args.batch_size, val_pairs=8, test_pairs=8))
    batch = [data.train[i] for i in range(args.batch_size)]
    x = torch.stack([b[0] for b in batch]).to(device)
    y = {t.name: torch.stack([b[1][t.name] for b in batch]).to(device) for t in data.tasks}
    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "torch": torch.__version__, "threads": torch.get_num_threads(), "device": str(device),
               "cpu_count": __import__("os").cpu_count()}
    report = {"machine": machine, "batch_size": args.batch_size, "rounds": args.rounds, "warmup": args.warmup,
              "backbone": "lenet (20, 50, 500)", "archs": {}}
    print(f"# {machine}\n# batch {args.batch_size}, {args.warmup} warm-up + {args.rounds} timed rounds, interleaved")
    print(f"{'arch':<13} {'weighting':<12} {'median ms':>10} {'IQR ms':>15} {'x fixed':>8} {'ratio IQR':>13}")
    for arch in args.archs:
        res = bench_arch(arch, data, x, y, args, device)
        report["archs"][arch] = res
        for m, r in res["methods"].items():
            print(f"{arch:<13} {m:<12} {r['median_ms']:>10.2f} {r['iqr_ms'][0]:>7.2f}-{r['iqr_ms'][1]:<7.2f} "
                  f"{r['ratio_median']:>8.2f} {r['ratio_iqr'][0]:>6.2f}-{r['ratio_iqr'][1]:<6.2f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
