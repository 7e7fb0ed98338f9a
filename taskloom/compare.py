"""``taskloom compare``: train a grid of architectures with the same budget and tabulate them.

The command line of the comparison harness; the pieces live in :mod:`taskloom.grid` (grid
files, expansion into jobs, run fingerprints), :mod:`taskloom.runs` (running jobs on a backend,
retries, resume), :mod:`taskloom.summary` (rows, summary, delta_m, relative changes),
:mod:`taskloom.tables` and :mod:`taskloom.plots`.

Every run lives in ``RUN_ROOT/<label>/s<seed>-<fingerprint>``; the fingerprint hashes the run's
resolved config minus its default values, so a changed setting is a new run while a new config
option at its default leaves finished runs as they are. ``--resume`` skips finished runs and
continues interrupted ones; a job that dies is retried (``--retries``: locally once by default),
resuming from its last checkpoint; a run that still fails is reported with its error and the others go on.
A run whose stored config (``job.yaml``) differs from the newly resolved one (a default changed
since it was started) stops the command with the list of such runs and keys, unless
``--changed keep`` (use them as they are) or ``--changed rerun`` (move them aside, run again).

Runs go to local processes (default, ``--jobs N`` at a time) or, with ``--backend dask``, to a
Dask cluster: a local one on 127.0.0.1 (``--jobs N`` workers) or an existing one
(``--address``), each run a task with the resources of ``--run-resources`` (:mod:`taskloom.cluster`).
Either way the runs write to the same run directories, so the outputs below come from the same
code and ``--resume`` works across backends.

Outputs in RUN_ROOT: ``results.csv`` (one row per run), ``results.md`` (per architecture: mean
± std over seeds of every task metric, delta_m vs single-task, parameters and their ratio to the
sum of the single-task networks, training time; best per column in bold; regenerated from the
CSV alone), and plots: ``relative_change.png`` (methods x tasks heatmap of the change against
single-task, Δm last), ``metric_vs_params.png`` and, for classification tasks,
``per_class_gain_<task>.png`` (per-class accuracy gain against the class's training frequency).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from taskloom.errors import ConfigError, TaskloomError
from taskloom.grid import DEFAULT_GRID, expand, load_grid
from taskloom.runs import CHANGED_POLICIES, LocalBackend, reconcile_stored_configs, run_jobs
from taskloom.summary import collect, read_csv, relative_changes, summarize, training_class_counts, write_csv

BACKENDS = ("local", "dask")


def register_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare", help="train a grid of architectures x seeds and tabulate them (results.csv, results.md, plots)",
        description=_plain(__doc__.split("\n\n")[0]) + " With no GRID: the default MultiMNIST grid (under 15 minutes "
                    "on 2 CPU cores).",
    )
    p.add_argument("grid", nargs="?", help="grid YAML (default: the built-in MultiMNIST grid)")
    p.add_argument("--seeds", type=int, help="seeds per architecture (overrides the grid's 'seeds')")
    p.add_argument("--jobs", type=int, help="runs in parallel on this machine (default 1; threads are split among "
                                             "them); with --backend dask: workers of the local cluster")
    p.add_argument("--run-root", help="output folder (default: runs/compare-<grid name>)")
    p.add_argument("--resume", action="store_true", help="skip finished runs, continue interrupted ones")
    p.add_argument("--changed", choices=CHANGED_POLICIES, default="stop",
                   help="with --resume, runs started with a config that differs from the newly resolved one "
                        "(a changed default): stop and list them (default), keep them as they are, or rerun them")
    p.add_argument("--report-only", action="store_true", help="only regenerate results.md and plots from results.csv")
    p.add_argument("--backend", choices=BACKENDS, default="local",
                   help="where runs train: local processes (default) or Dask tasks (needs the 'cluster' extra: "
                        "pip install 'taskloom[cluster]'); see docs/scaling.md")
    p.add_argument("--address", help="with --backend dask: the scheduler (tcp://HOST:8786, or a scheduler file "
                                     ".json) of an existing cluster; default: a local cluster on 127.0.0.1 only")
    p.add_argument("--run-resources", metavar="NAME=N,...",
                   help="with --backend dask: Dask resources each run asks for, e.g. cpus=1,gpus=0.5 (workers must "
                        "offer them); cpus also sets the run's torch threads")
    p.add_argument("--retries", type=int,
                   help="times a failed run is started again, from its last checkpoint (default 1); with --backend "
                        "dask: deaths of a worker holding a run that the run survives (the scheduler's "
                        "allowed-failures, default 3); a run that raises on a worker is reported, not retried")
    p.set_defaults(func=_main)


def _plain(text: str) -> str:
    """reST markup out of a docstring for --help: ``code`` -> code, :mod:`x` -> x."""
    import re

    return re.sub(r":\w+:`~?([^`]+)`", r"\1", text).replace("``", "")


def _main(args: argparse.Namespace) -> int:
    grid_path = Path(args.grid) if args.grid else DEFAULT_GRID
    run_root = Path(args.run_root or f"runs/compare-{grid_path.stem}")
    title = f"Comparison: {grid_path.stem}"
    if args.report_only:
        if not (run_root / "results.csv").is_file():
            raise TaskloomError(f"{run_root / 'results.csv'} not found: run the comparison first")
        print(f"wrote {write_results(run_root, title=title)}")
        return 0
    backend = _backend(args)  # before the grid: a missing extra or bad flag fails at once
    grid = load_grid(grid_path)
    started = time.perf_counter()
    jobs = expand(grid, args.seeds or grid.seeds, run_root)
    run_root.mkdir(parents=True, exist_ok=True)
    if args.resume:
        reconcile_stored_configs(jobs, args.changed)
    failed = run_jobs(jobs, args.jobs or 1, args.resume, backend=backend)
    rows = collect(jobs)
    last = jobs[-1].config
    counts = training_class_counts({**last, "data": {**last["data"], "tasks": None}}) if rows else {}
    md = write_results(run_root, rows, counts, title=title)
    print(md.read_text())
    print(f"{len(rows)} runs in {run_root} ({time.perf_counter() - started:.0f} s); table: {md}")
    if failed:
        print(f"{len(failed)} run(s) failed:\n" + "\n".join(
            f"  {f.job.label} seed {f.job.seed} ({f.job.run_dir}): {f.error}" for f in failed), file=sys.stderr)
        return 1
    return 0


def _backend(args: argparse.Namespace):
    """A function making the backend the flags ask for (called only when runs are left)."""
    if (args.jobs is not None and args.jobs < 1) or (args.seeds is not None and args.seeds < 1):
        raise ConfigError("--jobs and --seeds must be at least 1")
    if args.retries is not None and args.retries < 0:
        raise ConfigError("--retries must be 0 or more")
    if args.backend == "local":
        given = [flag for flag, value in (("--address", args.address), ("--run-resources", args.run_resources))
                 if value is not None]
        if given:
            raise ConfigError(f"{' and '.join(given)} need --backend dask")
        return lambda: LocalBackend(args.jobs or 1, retries=1 if args.retries is None else args.retries)
    from taskloom import cluster

    cluster.require_dask()
    resources = cluster.parse_resources(args.run_resources)
    if args.address and args.jobs is not None:
        raise ConfigError("--jobs sets the workers of a local cluster; with --address the cluster has its own")
    return lambda: cluster.DaskBackend(args.address, workers=args.jobs or 1, resources=resources,
                                       retries=args.retries)


def write_results(run_root: Path, rows: list[dict[str, Any]] | None = None, counts: dict | None = None,
                  title: str = "Comparison") -> Path:
    """(Re)write ``results.md`` and the plots of a run root from its ``results.csv`` (or from
    ``rows``, written to it first); ``counts``: training class counts (kept in
    ``class_counts.json``) for the per-class gain plots. Returns the path of ``results.md``."""
    from taskloom import plots
    from taskloom.tables import results_markdown

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
    written = plots.write_plots(rows, summary, relative_changes(rows), run_root, counts)
    md = run_root / "results.md"
    md.write_text(results_markdown(summary, title, images=[p.name for p in written]), encoding="utf-8")
    return md
