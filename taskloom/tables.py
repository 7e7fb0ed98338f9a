"""Tables of results: the markdown comparison table (``results.md``) and the plain-text metrics
table that ``taskloom train`` and ``taskloom eval`` print."""
from __future__ import annotations

import math
from typing import Any

NOTE = ("Mean (± std when there are several seeds) over seeds on the test split (model selected on validation). "
        "Δm: REFERENCE §6 on each task's primary metric vs the single-task networks of the same backbone; "
        "× single: parameters / sum of those single-task networks' parameters; seconds: training wall time "
        "per run (single-task: all its networks). Best per column in bold.")
HEATMAP = "relative_change.png"


def _columns(info: dict[str, Any], table: dict[str, Any]) -> list[tuple[str, str]]:
    """(task, metric) columns: each task's primary metric first, then its other scalar metrics."""
    return [(t, m) for t in info for m in [info[t]["primary"], *[k for k in info[t]["higher_is_better"]
            if k != info[t]["primary"]]] if any((t, m) in e["metrics"] for e in table.values())]


def _best(info: dict[str, Any], table: dict[str, Any], columns: list[tuple[str, str]]) -> dict[Any, str]:
    """The best label per column (and for ``delta_m``, over the non-baseline labels)."""
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
    return best


def _stat(stat: tuple[float, float], seeds: int, fmt: str, std_fmt: str) -> str:
    mean, std = stat
    if math.isnan(mean):
        return "–"
    return f"{mean:{fmt}} ± {std:{std_fmt}}" if seeds > 1 else f"{mean:{fmt}}"


def results_markdown(summary: dict[str, Any], title: str = "Comparison", images: list[str] = ()) -> str:
    """``results.md``: one row per label, mean ± std over seeds of every scalar task metric,
    Δm, parameters and their ratio to single-task, seconds, seeds; best per column in bold.
    ``images``: plot files next to it (the relative-change heatmap is shown, the others linked)."""
    info, table = summary["tasks"], summary["table"]
    columns = _columns(info, table)
    best = _best(info, table, columns)
    on_val = set(summary.get("val_scored") or [])
    header = ["architecture", *[f"{t} {m}{' (val)' if t in on_val else ''} {'↑' if info[t]['higher_is_better'][m] else '↓'}"
                                for t, m in columns],
              "Δm % ↑", "params", "× single", "seconds", "seeds"]
    lines = [f"# {title}", ""]
    if HEATMAP in images:
        lines += [f"![relative change against single-task per task and Δm]({HEATMAP})", "",
                  "Relative change of each task's primary metric against single-task, in % (positive = better; "
                  "mean ± std over seeds), and Δm; rows sorted by Δm.", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, e in table.items():
        cells = [label]
        for col in columns:
            text = _stat(e["metrics"].get(col, (math.nan, math.nan)), e["seeds"], ".4f", ".4f")
            cells.append(f"**{text}**" if best.get(col) == label else text)
        text = _stat(e["delta_m"], e["seeds"], "+.2f", ".2f")
        cells.append(f"**{text}**" if best.get("delta_m") == label else text)
        cells += [f"{e['params']:,.0f}", f"{e['param_ratio']:.2f}", f"{e['seconds'][0]:.0f}", str(e["seeds"])]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", NOTE]
    if on_val:
        lines += ["", f"{', '.join(sorted(on_val))}: no labels in the test split; marked (val), these columns are the "
                  f"selected checkpoint on the validation split, and Δm (on test) leaves them out."]
    others = [name for name in images if name != HEATMAP]
    if others:
        lines += ["", "Plots: " + ", ".join(f"[{name}]({name})" for name in others) + "."]
    return "\n".join(lines) + "\n"


def metrics_table(tasks: dict[str, dict[str, Any]]) -> str:
    """One row per task, one column per scalar metric (lists such as per-class values omitted)."""
    columns: list[str] = []
    for values in tasks.values():
        for key, value in values.items():
            if not isinstance(value, list) and key not in columns:
                columns.append(key)
    header = ["task", *columns]
    rows = [[name, *(_fmt(values.get(c)) for c in columns)] for name, values in tasks.items()]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return str(value)
    return f"{value:.4f}"
