"""Plain-text tables of results."""
from __future__ import annotations

from typing import Any


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
