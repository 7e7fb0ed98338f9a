"""MTFL grid for issue 9: {hard sharing, cross-stitch} x {fixed, uncertainty, dwa, gradnorm, pcgrad}
x seeds, and the table ``docs/results/weighting_mtfl.md`` built from the run outputs only.

Every run is ``configs/mtfl/cross_stitch.yaml`` (seed 004's setup: TCDCN towers, landmarks +
gender, smile, glasses, pose; selection on the landmarks' validation error) with

* ``hard``: ``model.architecture=split@5`` (all 5 TCDCN stages shared, only the heads separate);
* ``cross_stitch``: the config as it is (per-channel units after every stage, init (0.9, 0.1));
* ``train.loss_weights``: 1 for every task (so every adaptive method starts from the same
  neutral point), plus one ``fixed_aux0.1`` row with the config's (1, 0.1, 0.1, 0.1, 0.1)
  (the seed's down-scaled auxiliaries);
* ``train.weighting`` = the method, and ``--epochs`` / ``--limit`` for a reduced budget.

Runs are trained in this process, sharing one decoded copy of the data (the same calls as
``taskloom train``); a run whose ``final.json`` exists is skipped, so the grid can be resumed.

    python scripts/weighting_mtfl.py run --data-root ../shared/data/mtfl --runs runs/weighting_mtfl \\
        --seeds 0 1 2 --epochs 30
    python scripts/weighting_mtfl.py report --runs runs/weighting_mtfl --out docs/results/weighting_mtfl.md

Each run is the equivalent of
``taskloom train configs/mtfl/cross_stitch.yaml --data-root ... --run-dir RUNS/ARCH/METHOD/seedS
seed=S train.epochs=E train.weighting=METHOD 'train.loss_weights={}' [model.architecture=split@5]``.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CONFIG = REPO / "configs" / "mtfl" / "cross_stitch.yaml"
ARCHS = {"hard": ["model.architecture=split@5"], "cross_stitch": []}
METHODS = {
    "fixed": ["train.weighting=fixed", "train.loss_weights={}"],
    "fixed_aux0.1": ["train.weighting=fixed"],  # the config's loss weights
    "uncertainty": ["train.weighting=uncertainty", "train.loss_weights={}"],
    "dwa": ["train.weighting=dwa", "train.loss_weights={}"],
    "gradnorm": ["train.weighting=gradnorm", "train.loss_weights={}"],
    "pcgrad": ["train.weighting=pcgrad", "train.loss_weights={}"],
}
ATTRIBUTES = ["gender", "smile", "glasses", "pose"]


def overrides(arch: str, method: str, seed: int, args) -> list[str]:
    extra = [f"seed={seed}", f"train.epochs={args.epochs}", "train.progress=false", "train.device=cpu",
             f"data.root={args.data_root}"]
    if args.limit:
        extra.append(f"data.limit={args.limit}")
    if args.val_size:
        extra.append(f"data.val_size={args.val_size}")
    return ARCHS[arch] + METHODS[method] + extra


def run_grid(args) -> None:
    import torch

    from taskloom.config import load
    from taskloom.data import build_data
    from taskloom.models import build_model
    from taskloom.regularizers import attach_regularizer
    from taskloom.train import count_parameters, fit

    data = None
    for seed in args.seeds:
        for arch in args.archs:
            for method in args.methods:
                run_dir = Path(args.runs) / arch / method / f"seed{seed}"
                if (run_dir / "final.json").is_file():
                    print(f"skip {run_dir} (done)", flush=True)
                    continue
                config = load(CONFIG, overrides(arch, method, seed, args))
                if data is None:
                    started = time.perf_counter()
                    data = build_data(config.data)
                    print(f"data: {len(data.train)} / {len(data.val)} / {len(data.test)} "
                          f"({time.perf_counter() - started:.0f}s to load)", flush=True)
                torch.manual_seed(config.seed)
                model = build_model(config.model.architecture, config.model.backbone, data.tasks, data.input_shape)
                attach_regularizer(model, config.model.regularizer)
                started = time.perf_counter()
                print(f"== {run_dir}: {count_parameters(model):,} parameters", flush=True)
                fit(model, data, config.train, run_dir, config=config, seed=config.seed,
                    batch_size=config.data.batch_size, eval_batch_size=config.data.eval_batch_size,
                    resume=True, log=lambda *a: print(*a, flush=True))
                print(f"   done in {time.perf_counter() - started:.0f}s", flush=True)


# --------------------------------------------------------------------------- report


def _stats(values: list[float]) -> str:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "–"
    mean = statistics.fmean(values)
    return f"{mean:.2f} ± {statistics.stdev(values):.2f}" if len(values) > 1 else f"{mean:.2f}"


def collect(runs: Path) -> dict:
    table = {}
    for final_path in sorted(runs.glob("*/*/seed*/final.json")):
        run_dir = final_path.parent
        arch, method = run_dir.parent.parent.name, run_dir.parent.name
        final = json.loads(final_path.read_text())
        lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]
        t = final["tasks"]
        row = {
            "landmarks_iod": 100 * t["landmarks"]["mean_error_iod"],
            "failure_iod": 100 * t["landmarks"]["failure_iod"],
            "landmarks_box": 100 * t["landmarks"]["mean_error_box"],
            **{a: 100 * t[a]["accuracy"] for a in ATTRIBUTES if a in t},
            **{f"{a}_macro": 100 * t[a]["macro_accuracy"] for a in ATTRIBUTES if a in t},
            "epochs": len(lines), "best_epoch": final["best_epoch"],
            "sec_per_epoch": final["seconds"] / max(len(lines), 1), "params": final["params"],
            "weights": lines[-1]["task_weights"] if lines else {},
        }
        table.setdefault((arch, method), []).append(row)
    return table


def report(args) -> None:
    runs = Path(args.runs)
    table = collect(runs)
    if not table:
        raise SystemExit(f"no finished runs (final.json) under {runs}")
    order = [(a, m) for a in ARCHS for m in METHODS if (a, m) in table]
    out = [
        "# Loss weighting on MTFL: hard sharing vs cross-stitch",
        "",
        "Generated by `python scripts/weighting_mtfl.py report` from the run outputs "
        f"(`{args.runs}`); do not edit by hand. Test split (2,995 images, or the first `limit` "
        "lines when a reduced budget was used), checkpoint selected on the landmarks' validation error "
        "(its epoch in brackets after the epoch count). "
        "Mean ± sample standard deviation over the seeds listed (n). Landmark errors in % "
        "(lower is better): mean error / inter-ocular distance and failure rate (> 10%). "
        "Attributes: accuracy % and, in brackets, macro (class-balanced) accuracy, where 50 (pose: 20) "
        "means one class predicted for every face (collapse). Weights: the mean task weight of the "
        "last epoch (landmarks / gender / smile / glasses / pose).",
        "",
        "| arch | weighting | n | epochs (best) | landmarks err | failure | gender | smile | glasses | pose | s/epoch | last-epoch weights |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arch, method in order:
        rows = table[(arch, method)]
        col = lambda k: _stats([r.get(k) for r in rows])  # noqa: E731
        names = ["landmarks"] + ATTRIBUTES
        weights = " / ".join(f"{statistics.fmean([r['weights'].get(n, math.nan) for r in rows]):.2f}" for n in names)
        epochs = sorted({r["epochs"] for r in rows})
        attrs = " | ".join(f"{col(a)} ({_stats([r.get(a + '_macro') for r in rows]).split(' ')[0]})" for a in ATTRIBUTES)
        out.append(f"| {arch} | {method} | {len(rows)} | {'/'.join(map(str, epochs))} ({'/'.join(str(r['best_epoch']) for r in rows)}) | {col('landmarks_iod')} | "
                   f"{col('failure_iod')} | {attrs} | {statistics.fmean(r['sec_per_epoch'] for r in rows):.0f} | {weights} |")
    if args.notes:
        out += ["", args.notes]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(out) + "\n", encoding="utf-8")
    print("\n".join(out))


def plot_weights(run_dirs: list[Path], out: Path) -> Path:
    """One panel per run: the logged per-epoch task weights (``task_weights`` in metrics.jsonl)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dirs = [Path(d) for d in run_dirs]
    cols = min(len(run_dirs), 4)
    rows = math.ceil(len(run_dirs) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, run_dir in zip(axes.flat, run_dirs):
        lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]
        for task in (lines[0]["task_weights"] if lines else {}):
            ax.plot([l["epoch"] for l in lines], [l["task_weights"][task] for l in lines], marker="o", label=task)
        ax.set_title(str(run_dir.relative_to(run_dir.parents[2])) if len(run_dir.parents) > 2 else str(run_dir), fontsize=8)
        ax.set_xlabel("epoch")
        ax.set_ylabel("task weight")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(run_dirs):]:
        ax.axis("off")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="train the grid (skips finished runs)")
    r.add_argument("--data-root", default=str(REPO.parent / "shared" / "data" / "mtfl"))
    r.add_argument("--runs", default="runs/weighting_mtfl")
    r.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    r.add_argument("--epochs", type=int, default=30)
    r.add_argument("--limit", type=int, default=None, help="data.limit: first N lines of each file (reduced budget)")
    r.add_argument("--val-size", type=int, default=None, help="data.val_size (default: the config's 1,000)")
    r.add_argument("--archs", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    r.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p = sub.add_parser("report", help="write the markdown table from finished runs")
    p.add_argument("--runs", default="runs/weighting_mtfl")
    p.add_argument("--out", default=str(REPO / "docs" / "results" / "weighting_mtfl.md"))
    p.add_argument("--notes", default="", help="a paragraph appended under the table (budget, machine)")
    q = sub.add_parser("plot", help="plot the per-epoch task weights of run directories into one PNG")
    q.add_argument("run_dirs", nargs="+")
    q.add_argument("--out", default=str(REPO / "docs" / "results" / "weighting_mtfl_weights.png"))
    args = parser.parse_args(argv)
    if args.command == "run":
        run_grid(args)
    elif args.command == "report":
        report(args)
    else:
        print(f"wrote {plot_weights(args.run_dirs, Path(args.out))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
