"""``taskloom data check NAME``: read a dataset the way training would and report on it.

Prints the data folder, image counts per file and per split, class counts per attribute and
split, entries kept despite a quirk, malformed entries (by name, with file and line where there
is one) and the number of errors. Exit status 0 when there are no errors, 1 otherwise (2 when the
data cannot be found at all, like every other taskloom error).

A dataset module may define ``check(options) -> dict`` (keys ``root``, ``files``, ``splits``,
``class_counts``, ``kept``, ``skipped``, ``errors``); otherwise the dataset is built and its
splits counted (with class counts where a split has a ``class_counts()`` method).
"""
from __future__ import annotations

import argparse
import importlib
import json
import time


def register_cli(sub) -> None:
    data = sub.add_parser("data", help="dataset utilities (check)", description="Dataset utilities.")
    data_sub = data.add_subparsers(dest="data_command", metavar="ACTION")
    data_sub.required = True
    check = data_sub.add_parser(
        "check", help="read a dataset and report counts, class counts, malformed entries and errors",
        description="Read a dataset exactly as training does (same options and splits) and report image counts, "
                    "class counts per attribute and split, malformed entries by name and the number of errors. "
                    "Exit status 1 if there are errors.",
        epilog="examples:\n  taskloom data check mtfl --data-root ../shared/data/mtfl\n"
               "  taskloom data check utkface --data-root ../shared/data/utkface64 -o skip_malformed=false\n"
               "  taskloom data check pets --data-root ../shared/data/pets-sample",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    check.add_argument("name", help="dataset name (mtfl, utkface, pets, nyuv2, cifar100, multimnist)")
    check.add_argument("-o", "--option", dest="options", action="append", default=[], metavar="KEY=VALUE",
                       help="a dataset option (repeatable), e.g. -o skip_malformed=false")
    check.add_argument("--data-root", help="folder of the dataset's files (data.root)")
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    check.set_defaults(func=_check)


def build_options(name: str, data_root: str | None, overrides: list[str]):
    """The dataset's options (validated like ``data:`` in a config file)."""
    from taskloom import config as cfg

    raw: dict = {"data": {"name": name}}
    for item in overrides:
        cfg.apply_override(raw, "data." + item)
    if data_root is not None:
        raw["data"]["root"] = data_root
    return cfg.from_dict(raw, source="taskloom data check").data


def run_check(options) -> dict:
    """The report of one dataset (see the module docstring)."""
    from taskloom.data import build_data

    module = importlib.import_module(_module_of(options))
    if hasattr(module, "check"):
        return module.check(options)
    started = time.perf_counter()
    bundle = build_data(options)
    splits = {k: bundle.split(k) for k in ("train", "val", "test")}
    return {
        "root": options.root or "",
        "files": {},
        "splits": {k: len(v) for k, v in splits.items()},
        "class_counts": {k: v.class_counts() for k, v in splits.items() if hasattr(v, "class_counts")},
        "kept": [], "skipped": [], "errors": [],
        "seconds": time.perf_counter() - started,
    }


def _module_of(options) -> str:
    from taskloom.data import DATASETS

    return DATASETS[options.name].builder.__module__


def format_report(name: str, report: dict) -> str:
    lines = [f"{name}: {report['root']}  (read in {report.get('seconds', 0):.1f} s)"]
    for label, count in report.get("files", {}).items():
        lines.append(f"  {label}: {count:,} images")
    lines.append("split sizes: " + ", ".join(f"{k} {v:,}" for k, v in report["splits"].items())
                 + f"  (total {sum(report['splits'].values()):,})")
    counts = report.get("class_counts") or {}
    if counts:
        splits = list(counts)
        attributes = list(next(iter(counts.values())))
        rows = [["attribute", "class", *splits]]
        for attr in attributes:
            classes = list(counts[splits[0]][attr])
            for cls in classes:
                rows.append([attr, cls, *(f"{counts[s][attr].get(cls, 0):,}" for s in splits)])
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines.append("class counts:")
        for r in rows:
            lines.append("  " + "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    for key, title in (("kept", "kept despite a quirk"), ("skipped", "malformed, skipped"), ("errors", "errors")):
        items = report.get(key) or []
        if key != "errors" and not items:
            continue
        lines.append(f"{title}: {len(items)}")
        lines.extend(f"  {item}" for item in items)
    return "\n".join(lines)


def _check(args: argparse.Namespace) -> int:
    options = build_options(args.name, args.data_root, args.options)
    report = run_check(options)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_report(args.name, report))
    return 1 if report.get("errors") else 0
