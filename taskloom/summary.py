"""Results of a comparison: ``results.csv`` rows, their summary per label, delta_m and the
relative change of each task against single-task.

A *row* is one finished run (:func:`collect`): its label, seed, task (single-task baselines),
baseline label, parameters, training seconds, ``task_info`` (each task's kind, primary metric
and higher-is-better flags) and every test metric as ``task/metric``. Everything downstream
(:func:`summarize`, :func:`relative_changes`, the tables and plots) is computed from rows alone,
so it can be regenerated from a committed ``results.csv``: :func:`taskloom.compare.write_results`.
"""
from __future__ import annotations

import csv
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from taskloom.grid import Job

# --------------------------------------------------------------------------- rows


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


# --------------------------------------------------------------------------- summary


def mean_std(values: list[float | None]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value) of the values that are numbers."""
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _task_info(rows: list[dict[str, Any]]) -> dict[str, Any]:
    info: dict[str, Any] = {}
    for row in rows:
        info.update(row["task_info"] if isinstance(row["task_info"], dict) else {})
    return info


def _own_tasks(row: dict[str, Any], info: dict[str, Any]) -> dict[str, Any]:
    """The tasks a run was trained on (a pair: two of them; older rows without task_info: all)."""
    own = row.get("task_info")
    return own if isinstance(own, dict) and own else info


def _references(rows: list[dict[str, Any]], info: dict[str, Any]) -> dict[str, dict[str, dict]]:
    """Per single-task baseline label: ``metrics[task][metric]`` (mean over seeds of the scalar
    metrics) and ``params[task]`` (mean parameters of that task's network)."""
    refs: dict[str, dict[str, dict]] = {}
    for base in {row["baseline"] for row in rows if row["label"] == row["baseline"]}:
        refs[base] = {"metrics": {}, "params": {}}
        for task in info:
            runs = [r for r in rows if r["label"] == base and r["task"] == task]
            if runs:
                refs[base]["metrics"][task] = {m: mean_std([r.get(f"{task}/{m}") for r in runs])[0]
                                               for m in info[task]["higher_is_better"]
                                               if not isinstance(runs[0].get(f"{task}/{m}"), list)}
                refs[base]["params"][task] = statistics.fmean(r["params"] for r in runs)
    return refs


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Aggregate rows per label: metric mean/std, delta_m, params and ratio, seconds.

    Returns ``{"tasks": task_info, "table": {label: entry}}``; an entry holds ``metrics``
    (``(task, metric) -> (mean, std)``), ``seeds``, ``baseline``, ``params``, ``param_ratio``,
    ``seconds`` and ``delta_m`` (mean, std over seeds).
    """
    info = _task_info(rows)
    refs = _references(rows, info)
    labels = list(dict.fromkeys(r["label"] for r in rows))
    table = {label: _entry([r for r in rows if r["label"] == label], info, refs) for label in labels}
    val_scored = sorted({t for r in rows for t in str(r.get("val_scored") or "").split(",") if t})
    return {"tasks": info, "table": table, "val_scored": val_scored}


def _entry(runs: list[dict[str, Any]], info: dict[str, Any], refs: dict[str, dict[str, dict]]) -> dict[str, Any]:
    label, base = runs[0]["label"], runs[0]["baseline"]
    is_single = label in refs
    ref = refs.get(base, {"metrics": {}, "params": {}})
    entry: dict[str, Any] = {"metrics": {}, "seeds": len({r["seed"] for r in runs}), "baseline": base}
    for task in info:
        task_runs = [r for r in runs if not is_single or r["task"] == task]
        for metric in info[task]["higher_is_better"]:
            values = [r.get(f"{task}/{metric}") for r in task_runs]
            if values and not any(isinstance(v, list) for v in values):
                entry["metrics"][(task, metric)] = mean_std(values)
    single_params = sum(ref["params"].values())
    if is_single:
        entry["params"] = single_params
        entry["seconds"] = mean_std([sum(r["seconds"] for r in runs if r["seed"] == s)
                                     for s in {r["seed"] for r in runs}])
        entry["delta_m"] = (0.0, 0.0) if ref["metrics"] else (math.nan, math.nan)
        reference = single_params
    else:
        entry["params"] = statistics.fmean(r["params"] for r in runs)
        entry["seconds"] = mean_std([r["seconds"] for r in runs])
        entry["delta_m"] = mean_std([delta_m(r, info, ref["metrics"]) for r in runs])
        # against the single-task networks of the run's own tasks (a pair is compared with two)
        reference = sum(ref["params"].get(t, math.nan) for t in _own_tasks(runs[0], info))
    entry["param_ratio"] = entry["params"] / reference if reference else math.nan
    return entry


def relative_change(value: float, reference: float, higher_is_better: bool) -> float:
    """Signed relative change against a reference, in %: positive is better."""
    sign = 1.0 if higher_is_better else -1.0
    return 100.0 * sign * (value - reference) / reference


def delta_m(row: dict[str, Any], info: dict[str, Any], single: dict[str, dict[str, float]]) -> float:
    """REFERENCE §6: mean over tasks of the signed relative change of the primary metric, in %."""
    terms = []
    on_val = set(str(row.get("val_scored") or "").split(","))  # no test labels: not in delta_m on test
    for task in _own_tasks(row, info):
        if task in on_val:
            continue
        primary = info[task]["primary"]
        if task not in single or row.get(f"{task}/{primary}") is None:
            return math.nan
        terms.append(relative_change(row[f"{task}/{primary}"], single[task][primary],
                                     info[task]["higher_is_better"][primary]))
    return statistics.fmean(terms) if terms else math.nan


# --------------------------------------------------------------------------- relative changes


@dataclass
class RelativeChanges:
    """The numbers of the methods x tasks heatmap: per label (row) and column (each task's
    primary metric, then Δm), the mean and std over seeds of the run's signed relative change
    against the single-task networks of its baseline, in % (positive = better; NaN: the label
    has no such task). Rows are sorted by Δm, best first; ``seeds``: runs per row."""

    labels: list[str]
    columns: list[str]
    mean: list[list[float]]
    std: list[list[float]]
    seeds: list[int]


def relative_changes(rows: list[dict[str, Any]]) -> RelativeChanges:
    """:class:`RelativeChanges` of every label that is not a single-task baseline."""
    info = _task_info(rows)
    refs = _references(rows, info)
    columns = [f"{task} {meta['primary']}" for task, meta in info.items()] + ["Δm"]
    result = []
    for label in dict.fromkeys(r["label"] for r in rows if r["label"] != r["baseline"]):
        runs = [r for r in rows if r["label"] == label]
        single = refs.get(runs[0]["baseline"], {"metrics": {}})["metrics"]
        cells = []
        for task, meta in info.items():
            primary, own = meta["primary"], _own_tasks(runs[0], info)
            values = [relative_change(r[f"{task}/{primary}"], single[task][primary], meta["higher_is_better"][primary])
                      for r in runs if task in own and task in single and r.get(f"{task}/{primary}") is not None]
            cells.append(mean_std(values))
        cells.append(mean_std([delta_m(r, info, single) for r in runs]))
        result.append((label, cells, len({r["seed"] for r in runs})))
    result.sort(key=lambda item: -item[1][-1][0] if not math.isnan(item[1][-1][0]) else math.inf)
    return RelativeChanges([label for label, _, _ in result], columns, [[m for m, _ in cells] for _, cells, _ in result],
                           [[s for _, s in cells] for _, cells, _ in result], [n for _, _, n in result])


# --------------------------------------------------------------------------- outputs


def training_class_counts(config: dict[str, Any]) -> dict[str, list[int]]:
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
