"""Plots of a comparison (matplotlib, written as PNG files next to ``results.csv``).

* ``relative_change.png``: methods x tasks heatmap of the signed relative change of each task's
  primary metric against single-task (positive = better), mean ± std over seeds in every cell,
  Δm as the last column, rows sorted by Δm (numbers: :func:`taskloom.summary.relative_changes`);
* ``metric_vs_params.png``: each task's primary metric against the parameter count, one colour
  per architecture family (:func:`family`), one marker per member, the legend outside the axes;
* ``per_class_gain_<task>.png`` (classification tasks, with training class counts): per-class
  accuracy gain over single-task against the class's training frequency (the data-starved view
  of the cross-stitch paper).
"""
from __future__ import annotations

import math
import re
import statistics
from pathlib import Path
from typing import Any

from taskloom.grid import SINGLE
from taskloom.summary import RelativeChanges

MARKERS = "osD^vP*X<>hpd8H"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# Short names of the shipped grids' labels: ablation sweeps (cs-init, cs-lr) and X-ResNet variants.
FAMILY_ALIASES = {"single": SINGLE, "cs": "cross_stitch", "X": "xresnet", "X0": "xresnet", "XI": "xresnet",
                  "Xs": "xresnet"}


def family(label: str) -> str:
    """The architecture family of a label: the part before the first ``/``, ``@``, ``[``, ``+``,
    ``(``, ``-`` or space (``cross_stitch/dwa`` -> ``cross_stitch``, ``split@2`` -> ``split``,
    ``hard[+pose]`` -> ``hard``), through :data:`FAMILY_ALIASES` (``single-task (resnet_small)``
    -> ``single-task``, ``cs-lr[lr_mult=10]`` -> ``cross_stitch``, ``X-conv1x1`` -> ``xresnet``)."""
    head = re.split(r"[/@\[+( -]", label, maxsplit=1)[0] or label
    return FAMILY_ALIASES.get(head, head)


def styles(labels: list[str]) -> dict[str, tuple[str, str]]:
    """label -> (colour, marker): one colour per family, distinct markers within a family."""
    families = list(dict.fromkeys(family(label) for label in labels))
    seen: dict[str, int] = {}
    out = {}
    for label in labels:
        fam = family(label)
        index = seen[fam] = seen.get(fam, -1) + 1
        out[label] = (f"C{families.index(fam) % 10}", MARKERS[index % len(MARKERS)])
    return out


def write_plots(rows: list[dict[str, Any]], summary: dict[str, Any], changes: RelativeChanges, out_dir: Path,
                class_counts: dict[str, list[int]] | None = None) -> list[Path]:
    """Every plot of a comparison into ``out_dir``; returns the files written."""
    written = []
    if changes.labels:
        written.append(plot_relative_change(changes, out_dir / "relative_change.png"))
    written.append(plot_metric_vs_params(summary, out_dir / "metric_vs_params.png"))
    written += plot_per_class_gain(rows, summary, class_counts or {}, out_dir)
    return written


def plot_relative_change(changes: RelativeChanges, path: Path, title: str | None = None) -> Path:
    """The methods x tasks heatmap of :class:`~taskloom.summary.RelativeChanges`."""
    import numpy as np

    plt = _pyplot()
    mean, std = np.array(changes.mean, dtype=float), np.array(changes.std, dtype=float)
    n_rows, n_cols = mean.shape
    finite = np.abs(mean[np.isfinite(mean)])
    limit = float(np.percentile(finite, 95)) if finite.size else 1.0
    limit = max(limit, 0.1)
    cmap = plt.get_cmap("RdBu").with_extremes(bad="#e6e6e6")
    fig, ax = plt.subplots(figsize=(1.25 * n_cols + 3.4, 0.42 * n_rows + 1.9))
    image = ax.imshow(np.ma.masked_invalid(mean), cmap=cmap, vmin=-limit, vmax=limit, aspect="auto")
    for i in range(n_rows):
        for j in range(n_cols):
            m, s = mean[i, j], std[i, j]
            text = "–" if math.isnan(m) else _number(m, signed=True) + (
                f"\n± {_number(s)}" if changes.seeds[i] > 1 else "")
            dark = not math.isnan(m) and abs(m) > 0.6 * limit
            ax.text(j, i, text, ha="center", va="center", fontsize=7, linespacing=0.95,
                    color="white" if dark else "black", fontweight="bold" if j == n_cols - 1 else "normal")
    ax.axvline(n_cols - 1.5, color="black", lw=1.5)
    ax.set_xticks(range(n_cols), labels=changes.columns, rotation=25, ha="left", fontsize=8)
    ax.xaxis.tick_top()
    ax.set_yticks(range(n_rows), labels=changes.labels, fontsize=8)
    ax.tick_params(length=0)
    bar = fig.colorbar(image, ax=ax, fraction=0.05, pad=0.02, extend="both" if finite.size and finite.max() > limit else "neither")
    bar.set_label("change vs single-task, % (positive = better)", fontsize=8)
    bar.ax.tick_params(labelsize=7)
    seeds = sorted(set(changes.seeds))
    spread = " ± std over seeds" if max(seeds, default=1) > 1 else ""
    ax.set_xlabel(f"cells: mean{spread} of the relative change of the task's primary metric (%); "
                  "rows sorted by Δm", fontsize=8)
    if title:
        ax.set_title(title, fontsize=10, pad=12)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _number(value: float, signed: bool = False) -> str:
    digits = 1 if abs(value) >= 10 else 2
    return f"{value:{'+' if signed else ''}.{digits}f}"


def plot_metric_vs_params(summary: dict[str, Any], path: Path) -> Path:
    """One panel per task: primary metric (mean ± std over seeds) against parameters."""
    plt = _pyplot()
    info, table = summary["tasks"], summary["table"]
    style = styles(list(table))
    cols = min(len(info), 3)
    n_rows = math.ceil(len(info) / cols)
    fig, axes = plt.subplots(n_rows, cols, figsize=(4.6 * cols, 3.6 * n_rows), squeeze=False)
    handles: dict[str, Any] = {}
    for ax, (task, meta) in zip(axes.flat, info.items()):
        primary = meta["primary"]
        for label, e in table.items():
            mean, std = e["metrics"].get((task, primary), (math.nan, math.nan))
            if not math.isnan(mean):
                colour, marker = style[label]
                handles[label] = ax.errorbar(e["params"] / 1e6, mean, yerr=std, fmt=marker, color=colour,
                                             capsize=3, ms=6, mec="black", mew=0.4, alpha=0.9)
        ax.set_xlabel("parameters (millions)")
        ax.set_ylabel(f"{primary} ({'higher' if meta['higher_is_better'][primary] else 'lower'} is better)")
        ax.set_title(f"{task}: {primary} vs parameters", fontsize=10)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(info):]:
        ax.axis("off")
    labels = [label for label in table if label in handles]
    fig.legend([handles[label] for label in labels], labels, loc="upper left", bbox_to_anchor=(1.0, 1.0),
               fontsize=8, title="run (colour: family)", title_fontsize=8, ncols=1 if len(labels) <= 24 else 2)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_per_class_gain(rows: list[dict[str, Any]], summary: dict[str, Any], class_counts: dict[str, list[int]],
                        out_dir: Path) -> list[Path]:
    """``per_class_gain_<task>.png`` for each classification task with class counts."""
    plt = _pyplot()
    written = []
    style = styles(list(summary["table"]))
    for task, meta in summary["tasks"].items():
        counts = class_counts.get(task)
        key = f"{task}/per_class_accuracy"
        base_rows = [r for r in rows if r["label"] == SINGLE and r["task"] == task and isinstance(r.get(key), list)]
        if meta["kind"] != "classification" or not counts or not base_rows:
            continue
        base = [statistics.fmean(v) for v in zip(*[r[key] for r in base_rows])]
        order = sorted(range(len(counts)), key=lambda c: counts[c])
        fig, ax = plt.subplots(figsize=(7.5, 4))
        for label in summary["table"]:
            runs = [r for r in rows if r["label"] == label and r["baseline"] == SINGLE and label != SINGLE
                    and isinstance(r.get(key), list)]
            if runs:
                acc = [statistics.fmean(v) for v in zip(*[r[key] for r in runs])]
                colour, marker = style[label]
                ax.plot([counts[c] for c in order], [100 * (acc[c] - base[c]) for c in order], "-", marker=marker,
                        color=colour, label=label, ms=4, lw=1)
        ax.axhline(0, color="grey", lw=0.8)
        if max(counts) > 20 * max(1, min(counts)):
            ax.set_xscale("log")
        ax.set_xlabel("training samples of the class")
        ax.set_ylabel("per-class accuracy gain\nover single-task (points)")
        ax.set_title(f"{task}: gain vs class frequency (data-starved view)", fontsize=10)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out_dir / f"per_class_gain_{task}.png"
        fig.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written
