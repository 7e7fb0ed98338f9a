"""Comparison grids: the grid file, its expansion into jobs, and the runs' fingerprints.

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

:func:`expand` turns a grid into :class:`Job` s: every entry x sweep value x seed, plus the
single-task baselines that delta_m needs (one network per task, trained alone with the same
budget, one set per backbone used in the grid).

**Run identity.** Every run lives in ``RUN_ROOT/<label>/s<seed>-<fingerprint>``. The fingerprint
(:func:`fingerprint`) hashes the run's resolved config *minus its default values*: only the keys
whose values differ from the config dataclasses' defaults, plus the ``name`` of each registry
component (dataset, backbone, architecture, ...) other than the default one. A changed setting
is therefore a new run, never mixed with the old one, while adding a config option whose default
keeps the old behaviour leaves every fingerprint, and so every finished run, as it was. A
*changed default* does not change the fingerprint of runs that relied on it; ``taskloom compare
--resume`` detects it by comparing each run's stored ``job.yaml`` with the newly resolved config
(:func:`taskloom.runs.reconcile_stored_configs`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from taskloom.errors import ConfigError

SINGLE = "single-task"
DEFAULT_GRID = Path(__file__).resolve().parent / "grids" / "multimnist.yaml"


@dataclass
class Job:
    """One run of a grid: its label, seed, resolved config and run directory."""

    label: str
    seed: int
    config: dict[str, Any]
    run_dir: Path
    task: str | None = None  # set for single-task baseline jobs
    baseline: str = SINGLE  # label of the single-task runs this run is compared with

    @property
    def final(self) -> Path:
        return self.run_dir / "final.json"

    @property
    def stored_config(self) -> Path:
        """The resolved config the run was (or is being) trained with."""
        return self.run_dir / "job.yaml"


@dataclass
class Grid:
    base: Path | None
    overrides: list[str] = field(default_factory=list)
    seeds: int = 3
    entries: list[dict[str, Any]] = field(default_factory=list)


# --------------------------------------------------------------------------- grid files


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
    seeds = data.get("seeds", 3)
    if not isinstance(seeds, int) or seeds < 1:
        raise ConfigError(f"{path}: seeds must be a positive integer")
    overrides = data.get("overrides") or []
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise ConfigError(f"{path}: overrides must be a list of KEY=VALUE strings")
    return Grid(base_path, overrides, seeds, [_entry(path, i, e) for i, e in enumerate(entries)])


def _entry(path: Path, i: int, entry: Any) -> dict[str, Any]:
    """One ``architectures`` item as ``{label, architecture, overrides, sweep}``."""
    if isinstance(entry, str):
        entry = {"label": entry, "architecture": entry}
    if not isinstance(entry, dict) or "architecture" not in entry:
        raise ConfigError(f"{path}: architectures[{i}] must be a name or a mapping with 'architecture'")
    extra = sorted(set(entry) - {"label", "architecture", "overrides", "sweep"})
    if extra:
        raise ConfigError(f"{path}: architectures[{i}]: unknown keys {extra}")
    arch = entry["architecture"]
    label = entry.get("label") or (arch if isinstance(arch, str) else arch.get("name", f"arch{i}"))
    return {"label": str(label), "architecture": arch,
            "overrides": list(entry.get("overrides") or []), "sweep": entry.get("sweep") or {}}


# --------------------------------------------------------------------------- expansion


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
    variants = [v for entry in grid.entries for v in _variants(entry, num_stages)]

    # Single-task baselines: one set per backbone used in the grid (delta_m and the parameter
    # ratio compare each run with single-task networks on its own backbone).
    base_backbone = _resolve(grid.base, grid.overrides)["model"]["backbone"]
    baselines = {json.dumps(base_backbone, sort_keys=True): (SINGLE, base_backbone)}
    resolved: list[tuple[str, list[str], str | None, str]] = []
    for label, overrides in variants:
        backbone = _resolve(grid.base, [*grid.overrides, *overrides])["model"]["backbone"]
        key = json.dumps(backbone, sort_keys=True)
        if key not in baselines:
            name = f"{SINGLE} ({backbone['name']})"
            if any(n == name for n, _ in baselines.values()):
                name = f"{name} #{len(baselines)}"
            baselines[key] = (name, backbone)
        resolved.append((label, overrides, None, baselines[key][0]))
    singles = [(name, ["model.architecture=single", f"data.tasks=[{task}]", f"model.backbone={json.dumps(backbone)}"],
                task, name) for name, backbone in baselines.values() for task in task_names]

    jobs = []
    for label, overrides, task, baseline in [*singles, *resolved]:
        for seed in range(seeds):
            config = _restrict_to_tasks(_resolve(grid.base, [*grid.overrides, *overrides, f"seed={seed}"]))
            jobs.append(Job(label, seed, config, _run_dir(run_root, label, seed, config), task, baseline))
    return jobs


def _variants(entry: dict[str, Any], num_stages: int) -> list[tuple[str, list[str]]]:
    """(label, overrides) of every run of one grid entry (``split@all``: every split point)."""
    arch = entry["architecture"]
    if arch == "split@all":
        return [(f"split@{k}", [f"model.architecture=split@{k}", *entry["overrides"]]) for k in range(num_stages + 1)]
    sweeps: list[tuple[str, list[str]]] = [("", [])]
    for key, values in entry["sweep"].items():
        short = key.rsplit(".", 1)[-1]
        sweeps = [(f"{tag},{short}={v}" if tag else f"{short}={v}", [*ovr, f"{key}={json.dumps(v)}"])
                  for tag, ovr in sweeps for v in values]
    arch_override = f"model.architecture={json.dumps(arch)}"
    return [(f"{entry['label']}[{tag}]" if tag else entry["label"], [arch_override, *entry["overrides"], *sweep])
            for tag, sweep in sweeps]


def _restrict_to_tasks(config: dict[str, Any]) -> dict[str, Any]:
    """Fit a resolved config to a run on a subset of the tasks (single-task baselines, pairs):
    drop what names an absent task (its loss weight, its head, its tower initialisation, its
    uncertainty form) and, when model selection names an absent task, select on the mean over the
    run's own tasks instead."""
    tasks = config["data"].get("tasks")
    if not tasks:
        return config
    train = config["train"]
    train["loss_weights"] = {k: v for k, v in (train.get("loss_weights") or {}).items() if k in tasks}
    for section, key in ((config.get("model"), "heads"), (config.get("init"), "towers"), (train.get("weighting"), "forms")):
        if isinstance(section, dict) and isinstance(section.get(key), dict):
            section[key] = {k: v for k, v in section[key].items() if k in tasks}
    select = train.get("select", "mean")
    if select not in ("mean", "loss") and select.partition("/")[0] not in tasks:
        train["select"] = "mean"
    return config


def label_folder(label: str) -> str:
    """The folder name of a grid row's runs under the run root (``RUN_ROOT/<this>/s<seed>-...``)."""
    return "".join(c if c.isalnum() or c in "@-_.=,[]" else "_" for c in label)


def _run_dir(run_root: Path, label: str, seed: int, config: dict[str, Any]) -> Path:
    """``RUN_ROOT/<label>/s<seed>-<fingerprint>``; a run directory named by the older
    whole-config hash is used when it exists and the new one does not (run roots written
    before fingerprints ignored default values keep resuming)."""
    folder = run_root / label_folder(label)
    run_dir = folder / f"s{seed}-{fingerprint(config)}"
    legacy = folder / f"s{seed}-{legacy_fingerprint(config)}"
    return legacy if legacy.is_dir() and not run_dir.exists() else run_dir


# --------------------------------------------------------------------------- fingerprints


_SAME = object()


def config_delta(value: Any, default: Any = _SAME) -> Any:
    """``value`` minus ``default`` as plain data: for dataclasses, only the fields that differ
    from the default instance's (recursively); returns ``_SAME`` when nothing differs.

    A dataclass value whose class differs from the default's (another dataset, backbone or
    architecture; a set optional section) is compared with its own class's defaults, and its
    ``name`` is kept so that two components at their defaults still differ.
    """
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        same = type(default) is type(value)
        reference = default if same else _defaults_of(type(value))
        out: dict[str, Any] = {}
        for f in dataclasses.fields(value):
            if not f.init:
                continue
            ref = getattr(reference, f.name) if reference is not None else _MISSING
            sub = config_delta(getattr(value, f.name), ref)
            if sub is not _SAME:
                out[f.name] = sub
        if not same and hasattr(value, "name"):
            out["name"] = value.name
        return out if out or not same else _SAME
    if default is not _MISSING and default is not _SAME and value == default and type(value) is type(default):
        return _SAME
    return _plain(value)


def _plain(value: Any) -> Any:
    """``value`` as data YAML can write: dataclasses inside mappings and lists (``model.heads``
    maps a task to its head's options) become their delta from their own class's defaults, with
    their ``name``; plain data is returned as it is, so the fingerprints of configs without such
    entries are unchanged."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        delta = config_delta(value, _MISSING)
        return {} if delta is _SAME else delta
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    return value


_MISSING = object()


def _defaults_of(cls: type) -> Any:
    try:
        return cls()
    except TypeError:  # a required field: compare with nothing (every field counts)
        return None


def fingerprint(config: dict[str, Any] | Any) -> str:
    """10 hex digits identifying a run: a hash of its resolved config minus default values
    (:func:`config_delta`). ``config`` is a plain resolved mapping or a :class:`~taskloom.config.Config`."""
    if isinstance(config, dict):
        from taskloom.config import from_dict

        config = from_dict(config)
    delta = config_delta(config, type(config)())
    delta = {} if delta is _SAME else delta
    return hashlib.sha256(yaml.safe_dump(delta, sort_keys=True).encode()).hexdigest()[:10]


def legacy_fingerprint(config: dict[str, Any]) -> str:
    """The fingerprint of taskloom <= 0.1: a hash of the whole resolved config."""
    return hashlib.sha256(yaml.safe_dump(config, sort_keys=True).encode()).hexdigest()[:10]
