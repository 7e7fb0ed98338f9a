"""``taskloom compare``: train a grid of architectures with the same budget and tabulate them.

A grid (YAML) names a base experiment config, overrides applied to every run, the number of
seeds, and a list of architecture entries::

    base: ../multimnist/cross_stitch.yaml      # relative to the grid file; null: built-in default
    overrides: [train.epochs=2, data.train_pairs=8000]
    seeds: 3
    architectures:
      - split@all                              # every split@k of the backbone (split search)
      - cross_stitch
      - {label: cs-layer, architecture: {name: cross_stitch, granularity: layer}}
      - {label: cs, architecture: cross_stitch, sweep: {model.architecture.alpha_same: [0.5, 0.9]}}

The single-task baselines that delta_m needs (one network per task, trained alone with the same
budget) are always added. Every run lives in ``RUN_ROOT/<label>/s<seed>-<fingerprint>``, where
the fingerprint hashes the run's whole resolved config: a changed config is a new run, never
mixed with the old one. ``--resume`` skips finished runs and continues interrupted ones; a job
that dies is retried once (resuming from its last checkpoint).

Outputs in RUN_ROOT: ``results.csv`` (one row per run), ``results.md`` (per architecture: mean
± std over seeds of every task metric, delta_m vs single-task, parameters and their ratio to the
sum of the single-task networks, training time; best per column in bold; regenerated from the
CSV alone), and plots: ``metric_vs_params.png`` and, for classification tasks, the data-starved
view of the cross-stitch paper (``per_class_gain_<task>.png``: per-class accuracy gain over
single-task against the class's training frequency).
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from taskloom.errors import ConfigError, TaskloomError

SINGLE = "single-task"
DEFAULT_GRID = Path(__file__).resolve().parent / "grids" / "multimnist.yaml"


@dataclass
class Job:
    label: str
    seed: int
    config: dict[str, Any]
    run_dir: Path
    task: str | None = None  # set for single-task baseline jobs
    baseline: str = "single-task"  # label of the single-task runs this run is compared with

    @property
    def final(self) -> Path:
        return self.run_dir / "final.json"


@dataclass
class Grid:
    base: Path | None
    overrides: list[str] = field(default_factory=list)
    seeds: int = 3
    entries: list[dict[str, Any]] = field(default_factory=list)


# --------------------------------------------------------------------------- grid


def load_grid(path: str | Path | None) -> Grid:
    """Read and check a grid file (``None``: the default MultiMNIST grid)."""
    path = Path(path) if path else DEFAULT_GRID
    from taskloom.config import read_yaml

    data, _ = read_yaml(path)
    allowed = {"base", "overrides", "seeds", "architectures"}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ConfigError(f"{path}: unknown grid keys {unknown}; allowed: {sorted(allowed)}")
    base = data.get("base")
    base_path = (path.parent / base).resolve() if base else None
    if base_path is not None and not base_path.is_file():
        raise ConfigError(f"{path}: base config {base_path} not found")
    entries = data.get("architectures") or []
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{path}: 'architectures' must be a non-empty list")
    normalised = []
    for i, entry in enumerate(entries):
        if isinstance(entry, str):
            entry = {"label": entry, "architecture": entry}
        if not isinstance(entry, dict) or "architecture" not in entry:
            raise ConfigError(f"{path}: architectures[{i}] must be a name or a mapping with 'architecture'")
        extra = sorted(set(entry) - {"label", "architecture", "overrides", "sweep"})
        if extra:
            raise ConfigError(f"{path}: architectures[{i}]: unknown keys {extra}")
        arch = entry["architecture"]
        label = entry.get("label") or (arch if isinstance(arch, str) else arch.get("name", f"arch{i}"))
        normalised.append({"label": str(label), "architecture": arch,
                           "overrides": list(entry.get("overrides") or []), "sweep": entry.get("sweep") or {}})
    seeds = data.get("seeds", 3)
    if not isinstance(seeds, int) or seeds < 1:
        raise ConfigError(f"{path}: seeds must be a positive integer")
    overrides = data.get("overrides") or []
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise ConfigError(f"{path}: overrides must be a list of KEY=VALUE strings")
    return Grid(base_path, overrides, seeds, normalised)


def fingerprint(config: dict[str, Any]) -> str:
    return hashlib.sha256(yaml.safe_dump(config, sort_keys=True).encode()).hexdigest()[:10]


def _resolve(base: Path | None, overrides: list[str]) -> dict[str, Any]:
    from taskloom import config as cfg

    return cfg.to_dict(cfg.load(base, overrides))


def expand(grid: Grid, seeds: int, run_root: Path) -> list[Job]:
    """All jobs of a grid: single-task baselines first, then every entry x sweep x seed."""
    from taskloom.backbones import Backbone
    from taskloom.config import from_dict
    from taskloom.data import build_data

    probe = from_dict(_resolve(grid.base, grid.overrides))
    data = build_data(probe.data)
    task_names = [t.name for t in data.tasks]
    num_stages = Backbone(probe.model.backbone, data.input_shape).num_stages

    variants: list[tuple[str, list[str], str | None]] = []
    for entry in grid.entries:
        arch = entry["architecture"]
        if arch == "split@all":
            for k in range(num_stages + 1):
                variants.append((f"split@{k}", [f"model.architecture=split@{k}", *entry["overrides"]], None))
            continue
        arch_override = f"model.architecture={json.dumps(arch)}"
        sweeps: list[tuple[str, list[str]]] = [("", [])]
        for key, values in entry["sweep"].items():
            sweeps = [(f"{tag},{key.rsplit('.', 1)[-1]}={v}" if tag else f"{key.rsplit('.', 1)[-1]}={v}",
                       [*ovr, f"{key}={json.dumps(v)}"]) for tag, ovr in sweeps for v in values]
        for tag, sweep_overrides in sweeps:
            label = f"{entry['label']}[{tag}]" if tag else entry["label"]
            variants.append((label, [arch_override, *entry["overrides"], *sweep_overrides], None))

    # Single-task baselines: one set per backbone used in the grid (delta_m and the parameter
    # ratio compare each run with single-task networks on its own backbone).
    base_backbone = _resolve(grid.base, grid.overrides)["model"]["backbone"]
    baselines = {json.dumps(base_backbone, sort_keys=True): (SINGLE, base_backbone)}
    resolved: list[tuple[str, list[str], str | None, str]] = []
    for label, overrides, task in variants:
        backbone = _resolve(grid.base, [*grid.overrides, *overrides])["model"]["backbone"]
        key = json.dumps(backbone, sort_keys=True)
        if key not in baselines:
            name = f"{SINGLE} ({backbone['name']})"
            if any(n == name for n, _ in baselines.values()):
                name = f"{name} #{len(baselines)}"
            baselines[key] = (name, backbone)
        resolved.append((label, overrides, task, baselines[key][0]))
    single_variants = []
    for name, backbone in baselines.values():
        for task_name in task_names:
            single_variants.append((name, ["model.architecture=single", f"data.tasks=[{task_name}]",
                                           f"model.backbone={json.dumps(backbone)}"], task_name, name))

    jobs = []
    for label, overrides, task, baseline in [*single_variants, *resolved]:
        for seed in range(seeds):
            config = _restrict_to_tasks(_resolve(grid.base, [*grid.overrides, *overrides, f"seed={seed}"]))
            run_dir = run_root / _safe(label) / f"s{seed}-{fingerprint(config)}"
            jobs.append(Job(label, seed, config, run_dir, task, baseline))
    return jobs


def _restrict_to_tasks(config: dict[str, Any]) -> dict[str, Any]:
    """Fit a resolved config to a run on a subset of the tasks (single-task baselines, pairs):
    drop the loss weights of absent tasks and, when model selection names an absent task, select
    on the mean over the run's own tasks instead."""
    tasks = config["data"].get("tasks")
    if not tasks:
        return config
    train = config["train"]
    train["loss_weights"] = {k: v for k, v in (train.get("loss_weights") or {}).items() if k in tasks}
    select = train.get("select", "mean")
    if select not in ("mean", "loss") and select.partition("/")[0] not in tasks:
        train["select"] = "mean"
    return config


def _safe(label: str) -> str:
    return "".join(c if c.isalnum() or c in "@-_.=,[]" else "_" for c in label)


# --------------------------------------------------------------------------- running


def run_jobs(jobs: list[Job], workers: int, resume: bool, log=print) -> list[Job]:
    """Run unfinished jobs, ``workers`` at a time; return the jobs that failed."""
    todo = [j for j in jobs if not j.final.is_file()]
    if not resume:
        started = [j for j in todo if j.run_dir.exists()]
        if started or len(todo) < len(jobs):
            raise ConfigError(
                f"{jobs[0].run_dir.parent.parent} already holds runs of this grid; pass --resume to skip "
                f"finished runs and continue the others, or choose another --run-root"
            )
    log(f"{len(jobs)} runs, {len(jobs) - len(todo)} already finished, {len(todo)} to run with {workers} job(s)")
    threads = max(1, (os.cpu_count() or 1) // workers)

    def one(job: Job) -> Job | None:
        for attempt in range(2):
            code = _launch(job, threads)
            if code == 0 and job.final.is_file():
                log(f"done   {job.label} seed {job.seed} ({job.run_dir})")
                return None
            log(f"failed {job.label} seed {job.seed} (exit {code}; see {job.run_dir / 'log.txt'})"
                + ("; retrying from its last checkpoint" if attempt == 0 else ""))
        return job

    with ThreadPoolExecutor(max_workers=workers) as pool:
        failed = [j for j in pool.map(one, todo) if j is not None]
    return failed


def _launch(job: Job, threads: int) -> int:
    job.run_dir.mkdir(parents=True, exist_ok=True)
    config_path = job.run_dir / "job.yaml"
    config_path.write_text(yaml.safe_dump(job.config, sort_keys=False), encoding="utf-8")
    cmd = [sys.executable, "-m", "taskloom", "train", str(config_path), "--run-dir", str(job.run_dir)]
    if (job.run_dir / "checkpoints" / "last.pt").is_file():
        cmd.append("--resume")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    with open(job.run_dir / "log.txt", "a", encoding="utf-8") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        return subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env).returncode


# --------------------------------------------------------------------------- results


def collect(jobs: list[Job]) -> list[dict[str, Any]]:
    """One row per finished run: identity, params, seconds, every metric as ``task/metric``."""
    rows = []
    for job in jobs:
        if not job.final.is_file():
            continue
        final = json.loads(job.final.read_text())
        row: dict[str, Any] = {"label": job.label, "seed": job.seed, "task": job.task or "",
                               "baseline": job.baseline,
                               "run_dir": str(job.run_dir), "params": final["params"],
                               "seconds": final["seconds"], "task_info": json.dumps(final.get("task_info", {}))}
        on_val = final.get("scored_on_val") or {}  # tasks without test labels: validation metrics
        if on_val:
            row["val_scored"] = ",".join(sorted(on_val))
        for task, metrics in final["tasks"].items():
            for metric, value in on_val.get(task, metrics).items():
                row[f"{task}/{metric}"] = json.dumps(value) if isinstance(value, list) else value
        rows.append(row)
    return rows


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def read_csv(path: Path) -> list[dict[str, Any]]:
    with open(path, newline="", encoding="utf-8") as f:
        return [{k: _parse(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _parse(value: str) -> Any:
    if value == "":
        return None
    try:
        return json.loads(value)
    except ValueError:
        return value


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Aggregate rows per label: metric mean/std, delta_m, params and ratio, seconds."""
    info: dict[str, Any] = {}
    for row in rows:
        info.update(row["task_info"] if isinstance(row["task_info"], dict) else {})
    tasks = list(info)
    baselines = {row["baseline"] for row in rows if row["label"] == row["baseline"]}
    single: dict[str, dict[str, dict[str, float]]] = {}
    single_params: dict[str, float] = {}
    task_params: dict[str, dict[str, float]] = {}  # per baseline: parameters of each task's network
    for base in baselines:
        single[base], single_params[base], task_params[base] = {}, 0.0, {}
        for task in tasks:
            runs = [r for r in rows if r["label"] == base and r["task"] == task]
            if runs:
                single[base][task] = {m: _mean_std([r.get(f"{task}/{m}") for r in runs])[0]
                                      for m in info[task]["higher_is_better"]
                                      if not isinstance(runs[0].get(f"{task}/{m}"), list)}
                task_params[base][task] = statistics.fmean(r["params"] for r in runs)
                single_params[base] += task_params[base][task]
    labels = list(dict.fromkeys(r["label"] for r in rows))
    table: dict[str, Any] = {}
    for label in labels:
        runs = [r for r in rows if r["label"] == label]
        is_single = label in baselines
        base = runs[0]["baseline"]
        entry: dict[str, Any] = {"metrics": {}, "seeds": len({r["seed"] for r in runs}), "baseline": base}
        for task in tasks:
            task_runs = [r for r in runs if not is_single or r["task"] == task]
            for metric in info[task]["higher_is_better"]:
                values = [r.get(f"{task}/{metric}") for r in task_runs]
                if values and not any(isinstance(v, list) for v in values):
                    entry["metrics"][(task, metric)] = _mean_std(values)
        if is_single:
            entry["params"] = single_params[label]
            entry["seconds"] = _mean_std([sum(r["seconds"] for r in runs if r["seed"] == s)
                                          for s in {r["seed"] for r in runs}])
            entry["delta_m"] = (0.0, 0.0) if single[label] else (math.nan, math.nan)
        else:
            entry["params"] = statistics.fmean(r["params"] for r in runs)
            entry["seconds"] = _mean_std([r["seconds"] for r in runs])
            entry["delta_m"] = _mean_std([delta_m(r, info, single.get(base, {})) for r in runs])
        # against the single-task networks of the run's own tasks (a pair is compared with two)
        own = runs[0]["task_info"] if isinstance(runs[0].get("task_info"), dict) and not is_single else {}
        reference = sum(task_params.get(base, {}).get(t, math.nan) for t in own) if own else single_params.get(base)
        entry["param_ratio"] = entry["params"] / reference if reference else math.nan
        table[label] = entry
    val_scored = sorted({t for r in rows for t in str(r.get("val_scored") or "").split(",") if t})
    return {"tasks": info, "table": table, "val_scored": val_scored}


def delta_m(row: dict[str, Any], info: dict[str, Any], single: dict[str, dict[str, float]]) -> float:
    """REFERENCE §6: mean over tasks of the signed relative change of the primary metric, in %."""
    own = row.get("task_info")
    own = own if isinstance(own, dict) and own else info  # a run on a subset of the tasks: its own
    on_val = set(str(row.get("val_scored") or "").split(","))  # no test labels: not in delta_m on test
    terms = []
    for task in own:
        if task in on_val:
            continue
        meta = info[task]
        primary = meta["primary"]
        if task not in single or row.get(f"{task}/{primary}") is None:
            return math.nan
        base = single[task][primary]
        sign = 1.0 if meta["higher_is_better"][primary] else -1.0
        terms.append(sign * (row[f"{task}/{primary}"] - base) / base)
    return 100.0 * statistics.fmean(terms) if terms else math.nan


def render_markdown(summary: dict[str, Any], title: str = "Comparison") -> str:
    info, table = summary["tasks"], summary["table"]
    columns = [(t, m) for t in info for m in [info[t]["primary"], *[k for k in info[t]["higher_is_better"]
               if k != info[t]["primary"]]] if any((t, m) in e["metrics"] for e in table.values())]
    best: dict[Any, str] = {}
    for col in columns:
        higher = info[col[0]]["higher_is_better"][col[1]]
        scored = [(e["metrics"][col][0], label) for label, e in table.items()
                  if col in e["metrics"] and not math.isnan(e["metrics"][col][0])]
        if scored:
            best[col] = (max if higher else min)(scored)[1]
    scored = [(e["delta_m"][0], label) for label, e in table.items()
              if label != e["baseline"] and not math.isnan(e["delta_m"][0])]
    if scored:
        best["delta_m"] = max(scored)[1]
    on_val = set(summary.get("val_scored") or [])
    header = ["architecture", *[f"{t} {m}{' (val)' if t in on_val else ''} {'↑' if info[t]['higher_is_better'][m] else '↓'}"
                                for t, m in columns],
              "Δm % ↑", "params", "× single", "seconds", "seeds"]
    lines = [f"# {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, e in table.items():
        cells = [label]
        for col in columns:
            mean, std = e["metrics"].get(col, (math.nan, math.nan))
            text = "–" if math.isnan(mean) else (f"{mean:.4f} ± {std:.4f}" if e["seeds"] > 1 else f"{mean:.4f}")
            cells.append(f"**{text}**" if best.get(col) == label else text)
        dm, dstd = e["delta_m"]
        text = "–" if math.isnan(dm) else (f"{dm:+.2f} ± {dstd:.2f}" if e["seeds"] > 1 else f"{dm:+.2f}")
        cells.append(f"**{text}**" if best.get("delta_m") == label else text)
        cells += [f"{e['params']:,.0f}", f"{e['param_ratio']:.2f}", f"{e['seconds'][0]:.0f}", str(e["seeds"])]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Mean (± std when there are several seeds) over seeds on the test split (model selected on validation). Δm: REFERENCE §6 on each "
              "task's primary metric vs the single-task networks of the same backbone; × single: parameters / sum "
              "of those single-task networks' parameters; seconds: training wall time per run (single-task: all "
              "its networks). Best per column in bold."]
    if on_val:
        lines += ["", f"{', '.join(sorted(on_val))}: no labels in the test split; marked (val), these columns are the "
                  f"selected checkpoint on the validation split, and Δm (on test) leaves them out."]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], summary: dict[str, Any], out_dir: Path,
         class_counts: dict[str, list[int]] | None = None) -> list[Path]:
    """metric_vs_params.png and per_class_gain_<task>.png (classification tasks)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    info, table = summary["tasks"], summary["table"]
    written = []
    fig, axes = plt.subplots(1, len(info), figsize=(5 * len(info), 4), squeeze=False)
    for ax, (task, meta) in zip(axes[0], info.items()):
        primary = meta["primary"]
        for i, (label, e) in enumerate(table.items()):
            mean, std = e["metrics"].get((task, primary), (math.nan, math.nan))
            if not math.isnan(mean):  # colours repeat after 10: vary the marker too
                ax.errorbar(e["params"] / 1e6, mean, yerr=std, fmt="osD^vP*X"[i // 10 % 8], capsize=3,
                            color=f"C{i % 10}", label=label)
        ax.set_xlabel("parameters (millions)")
        ax.set_ylabel(f"{task} {primary} ({'higher' if meta['higher_is_better'][primary] else 'lower'} is better)")
        ax.set_title(f"{task}: {primary} vs parameters")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    path = out_dir / "metric_vs_params.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    written.append(path)

    for task, meta in info.items():
        counts = (class_counts or {}).get(task)
        base_rows = [r for r in rows if r["label"] == SINGLE and r["task"] == task
                     and isinstance(r.get(f"{task}/per_class_accuracy"), list)]  # the base backbone's
        if meta["kind"] != "classification" or not counts or not base_rows:
            continue
        base = [statistics.fmean(v) for v in zip(*[r[f"{task}/per_class_accuracy"] for r in base_rows])]
        fig, ax = plt.subplots(figsize=(6, 4))
        for label in table:
            runs = [r for r in rows if r["label"] == label and r["baseline"] == SINGLE and label != SINGLE
                    and isinstance(r.get(f"{task}/per_class_accuracy"), list)]
            if not runs:
                continue
            acc = [statistics.fmean(v) for v in zip(*[r[f"{task}/per_class_accuracy"] for r in runs])]
            order = sorted(range(len(counts)), key=lambda c: counts[c])
            ax.plot([counts[c] for c in order], [100 * (acc[c] - base[c]) for c in order], "o-", label=label, ms=3)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xlabel("training samples of the class")
        ax.set_ylabel("per-class accuracy gain over single-task (points)")
        ax.set_title(f"{task}: gain vs class frequency (data-starved view)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out_dir / f"per_class_gain_{task}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def class_counts(config: dict[str, Any]) -> dict[str, list[int]]:
    """Training-set class frequencies of the classification tasks of a config's dataset."""
    import torch
    from torch.utils.data import DataLoader

    from taskloom.config import from_dict
    from taskloom.data import build_data

    data = build_data(from_dict(config).data)
    names = [t.name for t in data.tasks if t.kind == "classification"]
    counts = {t.name: torch.zeros(t.num_classes, dtype=torch.long) for t in data.tasks if t.name in names}
    for _, y in DataLoader(data.train, batch_size=1024):
        for name in names:
            target = y[name]
            valid = target >= 0
            counts[name] += torch.bincount(target[valid], minlength=len(counts[name]))
    return {k: v.tolist() for k, v in counts.items()}


def report(run_root: Path, rows: list[dict[str, Any]] | None = None, counts: dict | None = None,
           title: str = "Comparison") -> Path:
    """(Re)write results.md and plots from results.csv (or from ``rows``, written to it first)."""
    csv_path = run_root / "results.csv"
    if rows is not None:
        write_csv(rows, csv_path)
    counts_path = run_root / "class_counts.json"
    if counts is not None:
        counts_path.write_text(json.dumps(counts) + "\n", encoding="utf-8")
    elif counts_path.is_file():
        counts = json.loads(counts_path.read_text())
    rows = read_csv(csv_path)
    summary = summarize(rows)
    md = run_root / "results.md"
    md.write_text(render_markdown(summary, title), encoding="utf-8")
    try:
        plot(rows, summary, run_root, counts)
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib)", file=sys.stderr)
    return md


# --------------------------------------------------------------------------- CLI


def register_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare", help="train a grid of architectures x seeds and tabulate them (results.csv, results.md, plots)",
        description=__doc__.split("\n\n")[0] + " With no GRID: the default MultiMNIST grid (under 15 minutes "
                    "on 2 CPU cores).",
    )
    p.add_argument("grid", nargs="?", help="grid YAML (default: the built-in MultiMNIST grid)")
    p.add_argument("--seeds", type=int, help="seeds per architecture (overrides the grid's 'seeds')")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (default 1; threads are split among them)")
    p.add_argument("--run-root", help="output folder (default: runs/compare-<grid name>)")
    p.add_argument("--resume", action="store_true", help="skip finished runs, continue interrupted ones")
    p.add_argument("--report-only", action="store_true", help="only regenerate results.md and plots from results.csv")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    grid_path = Path(args.grid) if args.grid else DEFAULT_GRID
    run_root = Path(args.run_root or f"runs/compare-{grid_path.stem}")
    if args.report_only:
        if not (run_root / "results.csv").is_file():
            raise TaskloomError(f"{run_root / 'results.csv'} not found: run the comparison first")
        print(f"wrote {report(run_root, title=f'Comparison: {grid_path.stem}')}")
        return 0
    if args.jobs < 1 or (args.seeds is not None and args.seeds < 1):
        raise ConfigError("--jobs and --seeds must be at least 1")
    grid = load_grid(grid_path)
    started = time.perf_counter()
    jobs = expand(grid, args.seeds or grid.seeds, run_root)
    run_root.mkdir(parents=True, exist_ok=True)
    failed = run_jobs(jobs, args.jobs, args.resume)
    rows = collect(jobs)
    counts = class_counts({**jobs[-1].config, "data": {**jobs[-1].config["data"], "tasks": None}}) if rows else {}
    md = report(run_root, rows, counts, title=f"Comparison: {grid_path.stem}")
    print(md.read_text())
    print(f"{len(rows)} runs in {run_root} ({time.perf_counter() - started:.0f} s); table: {md}")
    if failed:
        print(f"{len(failed)} run(s) failed: " + ", ".join(str(j.run_dir) for j in failed), file=sys.stderr)
        return 1
    return 0
