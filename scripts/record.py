"""Results of record: train the grids under ``configs/record/`` and write ``docs/results/``.

    python scripts/record.py run [--jobs 2] [--runs runs/record] [STUDY ...]
    python scripts/record.py report [--runs runs/record]
    python scripts/record.py rerun STUDY LABEL [LABEL ...] [--jobs 2] [--runs runs/rerun]
    python scripts/record.py weights [--jobs 2] [--runs runs/weights]

``run`` calls ``taskloom compare configs/record/<study>.yaml --resume`` for each study (default:
all of ``mtfl``, ``utkface``, ``ablations``, ``pets``; a killed run is picked up where it stopped) and
writes each study's wall time to ``RUNS/<study>/wall_seconds.txt``. ``report`` copies each run
root's ``results.csv`` (and class counts, wall time) into ``docs/results/<study>/``, then, for
every study folder under ``docs/results/`` that holds a ``results.csv`` (``multimnist_default``
included), regenerates its ``results.md`` and plots (``relative_change.png`` heatmap,
``metric_vs_params.png``, per-class gains where class counts are known) and the tables of
``docs/results/README.md`` (between its ``record:`` markers) from those committed CSV files
alone, so every number there is traceable to a row of a committed ``results.csv``.

``rerun`` trains only the runs of the given labels of one study again (every seed, nothing else:
not the single-task baselines) and puts their rows in place of the committed ones in
``docs/results/<study>/results.csv`` (a label the file does not have yet is appended); ``report``
then regenerates the pages. It is how rows are re-measured after a fix that changes only them, and
how rows added to a grid later are measured against the committed baselines; it prints the wall
time of the rerun.

``weights`` trains seed 0 of the MTFL rows with adaptive task weights (uncertainty, DWA, GradNorm)
and redraws ``docs/results/mtfl/task_weights.png`` from their ``metrics.jsonl`` (``report`` does the
same from a full run root).

Data: the grids leave ``data.root`` unset, so set ``TASKLOOM_DATA`` to the folder that holds
``mtfl/``, ``utkface64/`` and ``pets-sample/`` (here: ``TASKLOOM_DATA=../shared/data``).
"""
from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from taskloom.grid import SINGLE  # noqa: E402
from taskloom.compare import write_results  # noqa: E402
from taskloom.summary import read_csv, summarize, write_csv  # noqa: E402

STUDIES = ("mtfl", "utkface", "ablations", "pets")
DOCS = REPO / "docs" / "results"
ATTRIBUTES = ("gender", "smile", "glasses", "pose")
GATED = ("mtan", "mmoe", "ple", "adatt")  # the gated and attention designs' rows (issue 15)
AGGREGATORS = ("upgrad", "mgda", "aligned_mtl", "nash_mtl", "imtl_g")  # TorchJD's, in the weighting study


def run(args) -> None:
    for study in args.studies:
        root = Path(args.runs) / study
        started = time.perf_counter()
        cmd = [sys.executable, "-m", "taskloom", "compare", str(REPO / "configs" / "record" / f"{study}.yaml"),
               "--jobs", str(args.jobs), "--run-root", str(root), "--resume"]
        print("$", " ".join(cmd), flush=True)
        code = subprocess.run(cmd).returncode
        if code != 0:
            sys.exit(f"{study}: taskloom compare exited with {code}")
        root.mkdir(parents=True, exist_ok=True)
        # resumed passes add up: the file holds the wall time of every pass over this run root
        wall = root / "wall_seconds.txt"
        before = float(wall.read_text()) if wall.is_file() else 0.0
        wall.write_text(f"{before + time.perf_counter() - started:.0f}\n")


# --------------------------------------------------------------------------- tables


def _cell(stat: tuple[float, float] | None, scale: float = 1.0, digits: int = 2) -> str:
    if stat is None or math.isnan(stat[0]):
        return "–"
    mean, std = stat
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def _list_stat(rows: list[dict], key: str, index: int) -> tuple[float, float] | None:
    values = [r[key][index] for r in rows if isinstance(r.get(key), list)]
    if not values:
        return None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _table(rows: list[dict], labels: list[str], columns: list[tuple[str, str, callable]]) -> str:
    summary = summarize(rows)["table"]
    lines = ["| " + " | ".join(["run", *[c[0] for c in columns]]) + " |", "|" + "---|" * (len(columns) + 1)]
    for label in labels:
        if label not in summary:
            continue
        entry, own = summary[label], [r for r in rows if r["label"] == label]
        cells = [fn(entry, own) for _, _, fn in columns]
        if len({r.get("seed") for r in own}) < 2:  # one seed: a spread of 0 would say nothing
            cells = [re.sub(r" ± [0-9.]+", "", c) for c in cells]
        lines.append("| " + " | ".join([label, *cells]) + " |")
    return "\n".join(lines)


def metric(task: str, name: str, scale: float = 100.0, digits: int = 2):
    return lambda entry, own: _cell(entry["metrics"].get((task, name)), scale, digits)


def attribute(task: str):
    """Accuracy with the macro (class-balanced) accuracy in brackets, in %."""
    def cell(entry, own):
        acc, macro = entry["metrics"].get((task, "accuracy")), entry["metrics"].get((task, "macro_accuracy"))
        if acc is None or math.isnan(acc[0]):
            return "–"
        return f"{acc[0] * 100:.1f} ± {acc[1] * 100:.1f} ({macro[0] * 100:.1f})"
    return cell


def left_eye_box(entry, own) -> str:
    return _cell(_list_stat([r for r in own if r.get("task") in (None, "", "landmarks")], "landmarks/failure_box_per_landmark", 0), 100, 1)


def delta(entry, own) -> str:
    return "0 (reference)" if entry["baseline"] == own[0]["label"] else _cell(entry["delta_m"], 1.0, 2)


def params(entry, own) -> str:
    ratio = entry["param_ratio"]
    return f"{entry['params'] / 1000:.0f}k ({ratio:.2f}x)" if not math.isnan(ratio) else f"{entry['params'] / 1000:.0f}k"


def seconds(entry, own) -> str:
    return f"{entry['seconds'][0]:.0f}"


def n_seeds(entry, own) -> str:
    return str(entry["seeds"])


LANDMARK_COLUMNS = [
    ("err/IOD % ↓", "", metric("landmarks", "mean_error_iod")),
    ("fail >10% IOD % ↓", "", metric("landmarks", "failure_iod", digits=1)),
    ("err/box % ↓", "", metric("landmarks", "mean_error_box")),
    ("fail >5% box % ↓", "", metric("landmarks", "failure_box", digits=1)),
    ("left-eye fail (box) % ↓", "", left_eye_box),
]
ATTRIBUTE_COLUMNS = [(f"{a} acc % (macro) ↑", "", attribute(a)) for a in ATTRIBUTES]
COMMON = [("Δm % ↑", "", delta), ("params (× single)", "", params), ("train s", "", seconds), ("seeds", "", n_seeds)]
PETS_COLUMNS = [
    ("seg mIoU % ↑", "", metric("segmentation", "miou", digits=1)),
    ("seg pixel acc % ↑", "", metric("segmentation", "pixel_accuracy", digits=1)),
    ("breed acc % ↑", "", metric("breed", "accuracy", digits=1)),
    ("head box IoU % (val) ↑", "", metric("head_box", "miou", digits=1)),
]
UTK_COLUMNS = [
    ("age MAE ↓", "", metric("age", "mae", 1.0)),
    ("age median AE ↓", "", metric("age", "median_ae", 1.0)),
    ("gender acc % ↑", "", metric("gender", "accuracy", digits=1)),
    ("race acc % ↑", "", metric("race", "accuracy", digits=1)),
    ("race macro % ↑", "", metric("race", "macro_accuracy", digits=1)),
]


def tables() -> dict[str, str]:
    """The summary tables of every study whose ``results.csv`` is committed."""
    out = {}
    if (DOCS / "mtfl" / "results.csv").is_file():
        mtfl = read_csv(DOCS / "mtfl" / "results.csv")
        pairs = [f"hard[+{a}]" for a in ATTRIBUTES]
        out["mtfl"] = _table(mtfl, [SINGLE, *pairs, "hard", "cross_stitch", "cross_stitch+l2", "cross_stitch+exp",
                                    "cross_stitch+affine_exp", "nddr", *GATED],
                             [*LANDMARK_COLUMNS, *ATTRIBUTE_COLUMNS, *COMMON])
        weighting = [f"{arch}{suffix}" for arch in ("hard", "cross_stitch")
                     for suffix in ("", "/fixed1", "/uncertainty", "/uncertainty-lr100", "/dwa", "/gradnorm", "/pcgrad",
                                    *(f"/{name}" for name in AGGREGATORS))]
        out["weighting"] = _table(mtfl, [SINGLE, *weighting], [*LANDMARK_COLUMNS[:2], *ATTRIBUTE_COLUMNS, *COMMON])
    if (DOCS / "utkface" / "results.csv").is_file():
        utk = read_csv(DOCS / "utkface" / "results.csv")
        out["utkface"] = _table(utk, [SINGLE, "split@4", "cross_stitch", "sluice(S=2)", "nddr", "nddr_shortcut", *GATED],
                                [*UTK_COLUMNS, *COMMON])
    if (DOCS / "ablations" / "results.csv").is_file():
        abl = read_csv(DOCS / "ablations" / "results.csv")
        out["ablations"] = _table(abl, list(dict.fromkeys(r["label"] for r in abl)), [*UTK_COLUMNS, *COMMON])
    if (DOCS / "pets" / "results.csv").is_file():
        pets = read_csv(DOCS / "pets" / "results.csv")
        out["pets"] = _table(pets, list(dict.fromkeys(r["label"] for r in pets)), [*PETS_COLUMNS, *COMMON])
    return out


def report(args) -> None:
    for study in STUDIES:
        root, dest = Path(args.runs) / study, DOCS / study
        if not (root / "results.csv").is_file():
            print(f"{study}: no results.csv under {root}; keeping docs/results/{study} as it is")
            continue
        dest.mkdir(parents=True, exist_ok=True)
        for name in ("results.csv", "class_counts.json", "wall_seconds.txt"):
            if (root / name).is_file():
                shutil.copy2(root / name, dest / name)
    for dest in sorted(p.parent for p in DOCS.glob("*/results.csv")):
        md = dest / "results.md"
        title = md.read_text(encoding="utf-8").partition("\n")[0].lstrip("# ") if md.is_file() else ""
        print("wrote", write_results(dest, title=title or f"Comparison: {dest.name}"))
    adaptive = _weight_runs(Path(args.runs) / "mtfl")
    if adaptive:
        print("wrote", plot_weights(adaptive, DOCS / "mtfl" / "task_weights.png"))
    generated = tables()
    for page, names in {"README.md": ("mtfl", "utkface", "ablations", "pets"), "weighting_mtfl.md": ("weighting",)}.items():
        path = DOCS / page
        if not path.is_file():  # (the GPU record's pages: the weighting one only when it has such rows)
            continue
        text = path.read_text(encoding="utf-8")
        for name in [n for n in names if n in generated]:
            pattern = re.compile(rf"(<!-- record:{name} -->\n)(?:.*?\n)?(<!-- /record:{name} -->)", re.S)
            if not pattern.search(text):
                sys.exit(f"{path}: missing the markers <!-- record:{name} --> ... <!-- /record:{name} -->")
            text = pattern.sub(lambda m: m.group(1) + generated[name] + "\n" + m.group(2), text)
        path.write_text(text, encoding="utf-8")
        print(f"wrote {path}")


def _train_rows(study: str, labels: list[str], seeds: int | None, runs: Path, workers: int) -> list:
    """Train (or finish: runs resume) the jobs of a study's rows ``labels``, the grid's seeds or
    the first ``seeds``, under ``runs/<study>``; return the jobs. Exits on an unknown label or a
    failed run."""
    from taskloom.grid import expand, load_grid
    from taskloom.runs import run_jobs

    grid = load_grid(REPO / "configs" / "record" / f"{study}.yaml")
    jobs = [j for j in expand(grid, seeds or grid.seeds, runs / study) if j.label in labels]
    missing = sorted(set(labels) - {j.label for j in jobs})
    if missing:
        sys.exit(f"{study}: no rows labelled {missing} in configs/record/{study}.yaml")
    started = time.perf_counter()
    failed = run_jobs(jobs, workers, resume=True)
    if failed:
        sys.exit(f"{len(failed)} runs failed: " + ", ".join(f"{j.label} seed {j.seed}" for j in failed))
    print(f"{len(jobs)} runs in {time.perf_counter() - started:.0f} s")
    return jobs


def rerun(args) -> None:
    from taskloom.summary import collect

    jobs = _train_rows(args.study, args.labels, None, Path(args.runs), args.jobs)
    fresh: dict[str, list[dict]] = {}
    for row in collect(jobs):
        fresh.setdefault(row["label"], []).append(row)
    path = DOCS / args.study / "results.csv"
    write_csv(merge_rows(read_csv(path), fresh), path)
    print(f"wrote {path}")


def merge_rows(old: list[dict], fresh: dict[str, list[dict]]) -> list[dict]:
    """``old`` (a results.csv's rows) with the rows of every label in ``fresh`` in place of that
    label's old rows; labels new to ``old`` go at the end, in ``fresh``'s order."""
    fresh = {label: list(rows) for label, rows in fresh.items()}
    rows: list[dict] = []
    for row in old:
        if row["label"] not in fresh:
            rows.append(row)
        elif fresh[row["label"]]:
            rows += fresh[row["label"]]
            fresh[row["label"]] = []
    for new_rows in fresh.values():
        rows += new_rows
    # (read_csv parses JSON cells: write lists and dicts back as JSON)
    return [{k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in row.items()} for row in rows]


# The MTFL rows whose task weights change during training (task_weights.png, seed 0 of each).
ADAPTIVE = [f"{arch}/{method}" for method in ("uncertainty", "uncertainty-lr100", "dwa", "gradnorm")
            for arch in ("hard", "cross_stitch")]


def _weight_runs(mtfl_runs: Path) -> list[Path]:
    """Seed 0's run folder of every adaptive row found under an MTFL run root."""
    from taskloom.grid import label_folder

    return [d for label in ADAPTIVE for d in sorted((mtfl_runs / label_folder(label)).glob("s0-*"))]


def weights(args) -> None:
    """Train seed 0 of the adaptive MTFL rows (nothing else; results.csv is left alone) and plot
    their per-epoch task weights into ``docs/results/mtfl/task_weights.png``."""
    jobs = _train_rows("mtfl", ADAPTIVE, 1, Path(args.runs), args.jobs)
    jobs.sort(key=lambda j: ADAPTIVE.index(j.label))
    print("wrote", plot_weights([j.run_dir for j in jobs], DOCS / "mtfl" / "task_weights.png"))


def plot_weights(run_dirs: list[Path], out: Path) -> Path:
    """One panel per run: the per-epoch task weights that ``metrics.jsonl`` logs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(len(run_dirs), 3)
    rows = math.ceil(len(run_dirs) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, run_dir in zip(axes.flat, run_dirs):
        lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]
        for task in (lines[0]["task_weights"] if lines else {}):
            ax.plot([l["epoch"] for l in lines], [l["task_weights"][task] for l in lines], marker="o", label=task)
        ax.set_title(f"{run_dir.parent.name}, {run_dir.name.split('-')[0]}", fontsize=9)
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run")
    p.add_argument("studies", nargs="*", default=list(STUDIES))
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--runs", default="runs/record")
    p.set_defaults(fn=run)
    p = sub.add_parser("rerun")
    p.add_argument("study", choices=STUDIES)
    p.add_argument("labels", nargs="+")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--runs", default="runs/rerun")
    p.set_defaults(fn=rerun)
    p = sub.add_parser("weights")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--runs", default="runs/weights")
    p.set_defaults(fn=weights)
    p = sub.add_parser("report")
    p.add_argument("--runs", default="runs/record")
    p.set_defaults(fn=report)
    args = parser.parse_args(argv)
    if args.command == "run":
        unknown = [s for s in args.studies if s not in STUDIES]
        if unknown:
            parser.error(f"unknown studies {unknown}; choose from {list(STUDIES)}")
    args.fn(args)


if __name__ == "__main__":
    main()
