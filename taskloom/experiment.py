"""An experiment from a config: its data, its model, and the run that trains it.

:func:`build_experiment` is what ``taskloom train``, ``eval`` and ``inspect`` share: the dataset,
the network (:func:`~taskloom.architectures.build_model`), towers initialised from trained
networks (``init.towers``, :func:`init_towers`), the tower-weight regulariser and the tower
execution mode. :func:`run` trains it (:func:`~taskloom.train.fit`); :func:`load_run` rebuilds a
checkpoint's experiment from the config saved in it.

This module sits above :mod:`taskloom.config`: the modules below it (models, architectures,
regularisers, weightings) never import the config.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from taskloom import checkpoint
from taskloom.architectures import build_model
from taskloom.config import Config, from_dict
from taskloom.data import DataBundle, build_data
from taskloom.distributed import is_main_process
from taskloom.errors import CheckpointError, ConfigError
from taskloom.heads import apply_heads
from taskloom.models import MultiTaskNet, configure_towers
from taskloom.regularizers import attach_regularizer
from taskloom.rundir import RunDir
from taskloom.tasks import Task
from taskloom.train import count_parameters, fit


def build_experiment(config: Config, log=lambda *a: None) -> tuple[DataBundle, nn.Module]:
    """The data and model a config describes: dataset, network, tower initialisation
    (``init.towers``) and regulariser. Used by ``train``, ``eval`` and ``inspect`` alike."""
    data = build_data(config.data)
    apply_heads(data.tasks, config.model.heads)  # model.heads: each dense task's head (fcn, aspp)
    model = build_model(config.model.architecture, config.model.backbone, data.tasks, data.input_shape)
    if config.init.towers:  # (a resumed run then loads its own checkpoint over these)
        init_towers(model, config.init.towers, data.tasks, data.input_shape, log)
    attach_regularizer(model, config.model.regularizer)  # model.penalty() then includes it
    # How the tower stages execute (loop, vmap, checkpointing): no parameter changes.
    configure_towers(model, config.model.batched_towers, config.train.checkpoint_towers)
    return data, model


def load_run(path: str | Path, data_root: str | None = None) -> tuple[nn.Module, Config, dict[str, Any], DataBundle]:
    """Rebuild a checkpoint's data and model from its saved config and load its weights."""
    path = Path(path)
    payload = checkpoint.load(path)
    if payload.get("config") is None:
        raise CheckpointError(
            f"{path}: saved without a config (Python API); load its 'model' state dict into your model yourself")
    raw = payload["config"]
    if data_root:
        raw["data"]["root"] = data_root
    config = from_dict(raw, source=f"{path} (saved config)")
    config.init.towers = {}  # the checkpoint holds the trained weights
    data, model = build_experiment(config)
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not match the saved config's model ({exc})") from None
    return model.eval(), config, payload, data


def run(config: Config, run_dir: str | Path, *, resume: bool = False, force: bool = False,
        log=lambda *a: print(*a, flush=True)) -> dict[str, Any]:
    """Build the data and model a config describes and :func:`~taskloom.train.fit` them (what
    ``taskloom train`` does).

    A run directory that another process is writing, or that holds a run when ``resume`` is not
    given, is refused before the data and model are built (that can take a minute)."""
    run = RunDir(run_dir)
    with run.lock() if is_main_process() else contextlib.nullcontext():  # under torchrun rank 0 writes alone
        run.should_resume(resume, log=lambda *a: None)  # the refusal only; fit says what it does
        torch.manual_seed(config.seed)
        data, model = build_experiment(config, log)
        log(f"{config.model.architecture.name} on {config.data.name}: {len(data.tasks)} tasks "
            f"({', '.join(t.name for t in data.tasks)}), {count_parameters(model):,} parameters, "
            f"{len(data.train):,} / {len(data.val):,} / {len(data.test):,} train / val / test samples")
        return fit(model, data, config.train, run, config=config, seed=config.seed,
                   batch_size=config.data.batch_size, eval_batch_size=config.data.eval_batch_size,
                   num_workers=config.data.num_workers, resume=resume, force=force, log=log)


# --------------------------------------------------------------------------- towers from single-task checkpoints


def init_towers(model: nn.Module, towers: dict[str, str], tasks: list[Task], input_shape: tuple[int, ...],
                log=lambda *a: None) -> None:
    """Initialise task towers from trained networks (the papers' best practice): for every
    ``task: path`` in ``towers`` (``init.towers``), the checkpoint at ``path`` (any taskloom
    checkpoint with a config, typically a ``single`` run) is rebuilt and its tower of the same
    task (or its only tower) is copied, stage by stage, into this model's tower, with the head
    when it has the same shape. Shared trunk stages take the weights of the first listed task.
    """
    if not towers:
        return
    if not isinstance(model, MultiTaskNet):
        raise ConfigError(f"init.towers: not supported for {type(model).__name__} models")
    names = [t.name for t in tasks]
    for task_name in towers:
        if task_name not in names:
            raise ConfigError(f"init.towers.{task_name}: unknown task; tasks are {', '.join(names)}")
    trunk_done = False
    for task_name, path in towers.items():
        source, source_tower, source_head = _source_network(task_name, path, tasks, input_shape)
        targets = model.tower_stages(names.index(task_name))
        start = len(model.trunk) if trunk_done else 0  # the trunk comes from the first listed task
        _copy_stages(source.tower_stages(source_tower), targets, start, f"init.towers.{task_name}", path)
        trunk_done = True
        head = model.heads[task_name]
        same = [p.shape for p in head.state_dict().values()] == [p.shape for p in source_head.state_dict().values()]
        if same:
            head.load_state_dict(source_head.state_dict())
        log(f"init.towers.{task_name}: stages {start + 1}..{len(targets)}" + (" and head" if same else "")
            + f" from {path}")


def _source_network(task_name: str, path: str, tasks: list[Task],
                    input_shape: tuple[int, ...]) -> tuple[MultiTaskNet, int, nn.Module]:
    """The trained network saved at ``path``, rebuilt from its own config, with the index of its
    tower for ``task_name`` (the tower of that name, else its only one) and that tower's head.

    Towers are indexed in the checkpoint's own task order (``payload["tasks"]``), the order its
    tower weights were saved in."""
    where = f"init.towers.{task_name}"
    payload = checkpoint.load(path)
    if payload.get("config") is None:
        raise CheckpointError(f"{where}: {path} was saved without a config")
    source_config = from_dict(payload["config"], source=f"{path} (saved config)")
    saved = payload.get("tasks") or []
    source_tasks = [t for t in tasks if t.name in saved]
    if len(source_tasks) != len(saved):
        raise CheckpointError(f"{where}: {path} has tasks {saved}, not all of which are "
                              f"tasks of this run ({', '.join(t.name for t in tasks)})")
    source = build_model(source_config.model.architecture, source_config.model.backbone, source_tasks, input_shape)
    if not isinstance(source, MultiTaskNet):
        raise CheckpointError(f"{where}: {path} is not a tower network")
    try:
        source.load_state_dict(payload["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"{where}: {path} does not match its own config ({exc})") from None
    if task_name not in saved and len(saved) != 1:
        raise CheckpointError(f"{where}: {path} has no tower for {task_name!r} (tasks {saved})")
    tower = saved.index(task_name) if task_name in saved else 0
    return source, tower, source.heads[saved[tower]]


def _copy_stages(sources: list[nn.Module], targets: list[nn.Module], start: int, where: str, path: str) -> None:
    """Load ``sources[i]``'s weights into ``targets[i]`` for ``i >= start``, checking that they fit."""
    if len(sources) != len(targets):
        raise CheckpointError(f"{where}: {path} has {len(sources)} stages, this model {len(targets)}")
    for i in range(start, len(targets)):
        source, target = sources[i].state_dict(), targets[i].state_dict()
        problem = next((f"{k}: checkpoint shape {tuple(source[k].shape)}, model shape {tuple(v.shape)}"
                        for k, v in target.items() if k in source and source[k].shape != v.shape), None)
        if problem is None and set(source) != set(target):
            problem = f"different layers ({sorted(set(source) ^ set(target))[:3]} ...)"
        if problem:
            raise CheckpointError(f"{where}: stage {i + 1} of {path} does not fit this model's stage {i + 1}: {problem}")
        targets[i].load_state_dict(source)
