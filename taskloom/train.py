"""The trainer shared by the CLI and the Python API, in the shape of torchvision's reference
scripts: :func:`train_one_epoch` makes one pass over the training batches, :func:`evaluate`
measures a split, and :func:`fit` alternates them for ``train.epochs`` epochs.

The loop's side effects are callbacks (:mod:`taskloom.callbacks`): ``metrics.jsonl``, TensorBoard,
the progress bar, and an atomic checkpoint every epoch for exact resume (the same final weights
on CPU as an uninterrupted run, also after an interrupt in the middle of an epoch). Parameter
groups, schedules and mixed precision are in :mod:`taskloom.optim`.
"""
from __future__ import annotations

import contextlib
import functools
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from taskloom import checkpoint, distributed
from taskloom.callbacks import RESUME_SAFE_KEYS  # noqa: F401  (part of this module's API)
from taskloom.callbacks import Callback, Checkpointer, Loop, MetricsLog, ProgressBar, empty_partial, restore
from taskloom.config import Config, TrainConfig, to_dict
from taskloom.data import DataBundle
from taskloom.distributed import resolve_device
from taskloom.epoch_sums import DeviceSums
from taskloom.errors import ConfigError, TaskloomError
from taskloom.optim import Precision, build_optimizer, build_scheduler, step_scheduler
from taskloom.optim import schedule_factor  # noqa: F401  (part of this module's API)
from taskloom.rundir import RunDir
from taskloom.tasks import Task, primary_score
from taskloom.weighting import build_weighting


class TrainingError(TaskloomError):
    """Training cannot go on (for example a non-finite loss)."""


class Interrupted(TaskloomError):
    """SIGINT/SIGTERM received; the state was saved and the run can be resumed."""


def count_parameters(model: nn.Module) -> int:
    """The number of scalars in ``model``'s parameters."""
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- evaluation


def _to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    return batch.to(device, non_blocking=True)


@torch.no_grad()
def evaluate(
    model: nn.Module, dataset: Dataset, tasks: list[Task], *, batch_size: int = 512,
    num_workers: int = 0, device: torch.device | str = "cpu", precision: Precision | None = None,
    ctx: distributed.Context | None = None,
) -> tuple[dict[str, dict[str, Any]], dict[str, float]]:
    """Metrics ``{task: {metric: value}}`` and mean loss ``{task: loss}`` of ``model`` on ``dataset``.

    Under torchrun each rank evaluates every ``world``-th sample and torchmetrics syncs the
    metric states, so the result is that of the whole split on every rank.
    """
    device = torch.device(device)
    ctx = ctx or distributed.Context()
    precision = precision or Precision(32, device)
    model.eval()
    metrics = {t.name: t.metrics().to(device) for t in tasks}
    loss_sum = {t.name: 0.0 for t in tasks}
    labelled = {t.name: 0 for t in tasks}  # samples with this task's target (partial labels)
    count = 0
    indices = ctx.shard(list(range(len(dataset))))
    batches = [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]
    for x, y in DataLoader(dataset, batch_sampler=batches, num_workers=num_workers):
        x, y = _to(x, device), _to(y, device)
        with precision.autocast():
            out = model(x)
            losses = model.loss_terms(out, y)
        out = {k: v.float() for k, v in out.items()}
        for t in tasks:
            mask = t.labelled(y[t.name])
            n = int(mask.sum())
            loss_sum[t.name] += float(losses[t.name]) * n  # the loss is a mean over labelled samples
            labelled[t.name] += n
            if n == len(mask):
                metrics[t.name].update(out[t.name], y[t.name])
            elif n:
                metrics[t.name].update(out[t.name][mask], y[t.name][mask])
        count += len(x)
    names = [t.name for t in tasks]
    totals = ctx.sum([loss_sum[n] for n in names] + [float(labelled[n]) for n in names] + [float(count)])
    counts = {n: int(c) for n, c in zip(names, totals[len(names):-1])}
    results = {}
    for t in tasks:
        # A task without any labelled sample has no metric values (NaN), not a crash.
        results[t.name] = t.summarize(metrics[t.name].compute()) if counts[t.name] else \
            {m: float("nan") for m in t.higher_is_better}
        results[t.name]["count"] = counts[t.name]
    return results, {n: v / max(counts[n], 1) for n, v in zip(names, totals)}


def selection_score(select: str, tasks: list[Task], metrics: dict, losses: dict, weights: dict) -> float:
    """Higher is better. See :attr:`TrainConfig.select`."""
    if select == "mean":
        return sum(primary_score(t, metrics[t.name]) for t in tasks) / len(tasks)
    if select == "loss":
        return -sum(weights.get(t.name, 1.0) * losses[t.name] for t in tasks)
    task_name, metric = select.split("/", 1)
    task = next(t for t in tasks if t.name == task_name)
    value = float(metrics[task_name][metric])
    return value if task.higher_is_better.get(metric, True) else -value


def check_select(select: str, tasks: list[Task]) -> None:
    if select in ("mean", "loss"):
        return
    task_name, _, metric = select.partition("/")
    task = next((t for t in tasks if t.name == task_name), None)
    if task is None or metric not in task.higher_is_better:
        options = ["mean", "loss"] + [f"{t.name}/{m}" for t in tasks for m in t.higher_is_better]
        raise ConfigError(f"train.select: {select!r} is not one of {', '.join(options)}")


def task_info(tasks: list[Task]) -> dict[str, dict[str, Any]]:
    """Kind, primary metric and metric directions of each task (for delta_m in reports)."""
    return {t.name: {"kind": t.kind, "primary": t.primary, "higher_is_better": dict(t.higher_is_better)}
            for t in tasks}


# --------------------------------------------------------------------------- one epoch


def _epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The shuffled batches of one epoch: a function of (seed, epoch) only, so resumable."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def train_one_epoch(
    loop: Loop, dataset: Dataset, batches: list[list[int]], *, num_workers: int = 0,
    grad_clip: float | None = None, callbacks: Sequence[Callback] = (),
    stop_requested: Callable[[], bool] = lambda: False, last_checkpoint: Path | None = None,
) -> bool:
    """Train on ``batches`` (this rank's indices into ``dataset``), starting after the
    ``loop.state["step"]`` batches an interrupted run already did.

    Each step runs the forward pass under ``loop.precision``'s autocast, the weighting's backward
    and the optimizer step, then adds its task losses (over labelled samples), penalties and
    task weights to the epoch's sums. Those are added on the device and read into
    ``loop.state["partial"]`` every ``loop.sync_every`` steps and before returning
    (:mod:`taskloom.epoch_sums`), so that a step does not wait for the device. A non-finite loss
    raises :class:`TrainingError` at the next read, naming the task, the step where it first
    occurred and ``last_checkpoint`` (the weights in memory have by then taken the steps after it).

    Returns ``True`` if ``stop_requested()`` ended the epoch early (checked after every step,
    so the state is exactly that of a whole number of steps), ``False`` when every batch is done.
    """
    model, state = loop.model, loop.state
    loop.net.train()
    loader = DataLoader(dataset, batch_sampler=batches[state["step"]:], num_workers=num_workers,
                        pin_memory=loop.device.type == "cuda")
    for callback in callbacks:
        callback.on_epoch_start(loop, len(batches))
    sums = DeviceSums(state["partial"], loop.device)
    for x, y in loader:
        x, y = _to(x, loop.device), _to(y, loop.device)
        with loop.precision.autocast():
            losses = model.loss_terms(loop.net(x), y)
            penalties = model.penalty() if hasattr(model, "penalty") else {}
        loop.optimizer.zero_grad(set_to_none=True)
        used = loop.precision.backward(loop.weighting, losses, penalties, model)
        loop.precision.step(loop.optimizer, model, grad_clip)
        labelled = {t.name: t.labelled(y[t.name]).sum() for t in loop.tasks}
        sums.add(state["step"] + 1, losses, labelled, penalties, used, len(x))
        state["step"] += 1
        if state["step"] % loop.sync_every == 0:
            _read_sums(loop, sums, last_checkpoint)
        for callback in callbacks:
            callback.on_batch_end(loop, losses)
        if stop_requested():
            _read_sums(loop, sums, last_checkpoint)
            return True
    _read_sums(loop, sums, last_checkpoint)
    return False


def _read_sums(loop: Loop, sums: DeviceSums, last_checkpoint: Path | None) -> None:
    """Bring the epoch's sums to ``loop.state["partial"]``; raise :class:`TrainingError` if a
    task loss was not finite since the last read (on every rank, if on any)."""
    bad = sums.read()
    if loop.ctx.any(bad is not None):  # every rank stops, also those whose own losses are finite
        saved = last_checkpoint is not None and last_checkpoint.is_file()
        good = f"last good checkpoint: {last_checkpoint}" if saved else "no checkpoint was written yet"
        name, step, value = (bad.task, bad.step, bad.value) if bad else ("?", loop.state["step"], float("nan"))
        raise TrainingError(
            f"loss of task {name!r} is {value} at epoch {loop.state['epoch'] + 1}, step {step}; "
            f"stopping ({good}). Lower the learning rate or check the inputs"
        )


def _partial_over_ranks(partial: dict[str, Any], ctx: distributed.Context) -> dict[str, Any]:
    """The epoch's running sums added over all ranks: what one process would have summed, so that
    a checkpoint written in the middle of an epoch resumes right with any number of processes."""
    if not ctx.enabled:
        return partial
    out: dict[str, Any] = {}
    for key in ("loss_sum", "labelled", "penalty_sum", "weight_sum"):
        names = sorted(partial.get(key, {}))
        out[key] = dict(zip(names, ctx.sum([float(partial[key][n]) for n in names])))
    out["labelled"] = {n: round(v) for n, v in out["labelled"].items()}
    out["count"] = round(ctx.sum([float(partial["count"])])[0])
    return out


def _end_epoch(loop: Loop, val: dict, val_loss: dict, score: float, started: float) -> dict[str, Any]:
    """Step the schedule and the weighting, count the epoch as done and start the sums of the
    next one; returns the epoch's ``metrics.jsonl`` record."""
    state, partial, ctx = loop.state, loop.state["partial"], loop.ctx
    epoch = state["epoch"] + 1
    lrs = {g["name"]: g["lr"] for g in loop.optimizer.param_groups}  # the rates this epoch trained with
    step_scheduler(loop.scheduler, score)
    train_loss = ctx.mean(partial["loss_sum"], partial.get("labelled", partial["count"]))
    loop.weighting.epoch_end(train_loss)
    state["seconds"] += time.perf_counter() - started
    improved = score > state["best_score"]
    state.update(epoch=epoch, step=0, partial=empty_partial())
    if improved:
        state.update(best_score=score, best_epoch=epoch)
    return {"epoch": epoch, "lr": lrs, "train_loss": train_loss,
            "task_weights": ctx.mean(partial["weight_sum"], partial["count"]),
            "penalty": ctx.mean(partial["penalty_sum"], partial["count"]),
            "val_loss": val_loss, "val": val, "score": score, "seconds": round(state["seconds"], 3)}


# --------------------------------------------------------------------------- the run


def fit(
    model: nn.Module,
    data: DataBundle,
    train: TrainConfig,
    run_dir: str | Path | RunDir,
    *,
    config: Config | None = None,
    seed: int = 0,
    batch_size: int = 128,
    eval_batch_size: int = 512,
    num_workers: int = 0,
    resume: bool = False,
    force: bool = False,
    log=lambda *a: print(*a, flush=True),
) -> dict[str, Any]:
    """Train ``model`` on ``data`` and return the ``final.json`` record (test metrics of the
    checkpoint selected on validation).

    Writes into ``run_dir``: ``config.yaml`` (when ``config`` is given), ``metrics.jsonl`` (one
    line per epoch), ``checkpoints/last.pt`` (every epoch and on interrupt), ``checkpoints/best.pt``
    and ``final.json``. Under ``torchrun`` every process trains its slice of each global batch
    through DistributedDataParallel and only rank 0 writes.
    """
    device = resolve_device(train.device)
    ctx = distributed.setup(device.type)
    run = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    try:
        # One writer per run directory: rank 0 (the only writer under torchrun) holds the lock.
        with run.lock() if ctx.is_main else contextlib.nullcontext():
            final = _fit(model, data, train, run, ctx, device, config=config, seed=seed,
                         batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers,
                         resume=resume, force=force, log=log if ctx.is_main else lambda *a: None)
            ctx.barrier()  # every rank leaves together, after rank 0 has written final.json
        return final
    finally:
        # Destroy the process group before the interpreter exits: left to interpreter shutdown,
        # gloo's threads can abort the process ("terminate called without an active exception").
        distributed.teardown(ctx)


def _fit(model: nn.Module, data: DataBundle, train: TrainConfig, run: RunDir, ctx: distributed.Context,
         device: torch.device, *, config, seed, batch_size, eval_batch_size, num_workers, resume, force,
         log) -> dict[str, Any]:
    loop, weights = build_loop(model, train, ctx, device)
    config_dict = to_dict(config) if config is not None else None
    if run.should_resume(resume, log):
        restore(loop, run, config_dict, force=force)
        if not ctx.is_main:  # the checkpoint's sums of the epoch so far are all ranks' together: count them once
            loop.state["partial"] = empty_partial()
        log(f"resuming {run.path} at epoch {loop.state['epoch'] + 1}, step {loop.state['step']}")
    if ctx.is_main:
        run.prepare(config, loop.state["epoch"], log)
    if ctx.enabled:  # wrapped after restore(), so that every rank starts from the checkpoint's weights
        from torch.nn.parallel import DistributedDataParallel

        loop.net = DistributedDataParallel(model, device_ids=[loop.device.index] if loop.device.type == "cuda" else None)
    evaluate_split = functools.partial(evaluate, model, tasks=loop.tasks, batch_size=eval_batch_size,
                                       num_workers=num_workers, device=loop.device, precision=loop.precision, ctx=ctx)
    callbacks = _callbacks(loop, run, train, config_dict)
    with distributed.stop_requests() as stop, contextlib.ExitStack() as closing:
        for callback in callbacks:  # also on an interrupt or error, so that TensorBoard's files are complete
            closing.callback(callback.close)
        while loop.state["epoch"] < train.epochs:
            started = time.perf_counter()
            batches = [ctx.shard(b) for b in _epoch_batches(len(data.train), batch_size, seed, loop.state["epoch"])]
            if train_one_epoch(loop, data.train, batches, num_workers=num_workers, grad_clip=train.grad_clip,
                               callbacks=callbacks, stop_requested=lambda: ctx.any(bool(stop)),
                               last_checkpoint=run.last):
                loop.state["seconds"] += time.perf_counter() - started
                # rank 0 writes the checkpoint: it must hold every rank's sums of the epoch so far
                loop.state["partial"] = _partial_over_ranks(loop.state["partial"], ctx)
                for callback in callbacks:
                    callback.on_interrupt(loop)
                ctx.barrier()
                raise Interrupted(
                    f"interrupted at epoch {loop.state['epoch'] + 1}, step {loop.state['step']}; state saved to "
                    f"{run.last}. Resume with: taskloom train {run.config} --run-dir {run.path} --resume"
                )
            val, val_loss = evaluate_split(data.val)
            score = selection_score(train.select, loop.tasks, val, val_loss, weights)
            record = _end_epoch(loop, val, val_loss, score, started)
            for callback in callbacks:
                callback.on_epoch_end(loop, record)
            ctx.barrier()
            log(_epoch_line(record, loop.tasks, weights, train.epochs, time.perf_counter() - started))
    return _final(loop, run, evaluate_split, data.test, data.val, config)


def build_loop(model: nn.Module, train: TrainConfig, ctx: distributed.Context,
           device: torch.device) -> tuple[Loop, dict[str, float]]:
    """Check ``train`` against the model's tasks and build the loop on ``device`` (what
    :func:`fit` trains with; also for driving :func:`train_one_epoch` directly); also returns
    the static loss weights (``train.loss_weights``, 1 by default)."""
    if ctx.enabled and device.type == "cuda":
        device = torch.device("cuda", ctx.local_rank)
    if ctx.enabled and train.weighting.name in ("gradnorm", "pcgrad", "jd"):
        # All take per-task gradients (torch.autograd.grad, TorchJD's Jacobians), which bypass DDP's
        # gradient all-reduce: ranks would silently diverge.
        raise ConfigError(f"train.weighting: {train.weighting.name!r} is not supported under torchrun yet; "
                          f"use fixed, uncertainty or dwa, or train on one process")
    tasks = list(model.tasks)
    check_select(train.select, tasks)
    unknown = sorted(set(train.loss_weights) - {t.name for t in tasks})
    if unknown:
        raise ConfigError(f"train.loss_weights: unknown tasks {unknown}; tasks are {[t.name for t in tasks]}")
    weights = {t.name: train.loss_weights.get(t.name, 1.0) for t in tasks}
    if train.threads is not None:
        torch.set_num_threads(train.threads)
    if train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False

    model.to(device)
    weighting = build_weighting(train.weighting, [t.name for t in tasks], weights).to(device)
    optimizer = build_optimizer(model, train, weighting)
    scheduler = build_scheduler(optimizer, train.schedule, train.epochs)
    loop = Loop(model=model, net=model, weighting=weighting, optimizer=optimizer, scheduler=scheduler,
                precision=Precision(train.precision, device), tasks=tasks, ctx=ctx, device=device,
                sync_every=train.sync_every)
    return loop, weights


def _callbacks(loop: Loop, run: RunDir, train: TrainConfig, config: dict[str, Any] | None) -> list[Callback]:
    """Rank 0's callbacks, in the order their hooks run: the log line before the checkpoint
    that it describes. The other ranks write nothing and get none."""
    if not loop.ctx.is_main:
        return []
    callbacks: list[Callback] = []
    if train.progress and sys.stderr.isatty():
        callbacks.append(ProgressBar(train.epochs))
    callbacks.append(MetricsLog(run))
    if getattr(train, "tensorboard", False):
        from taskloom.tracking import TensorBoard  # needs the optional tensorboard package

        callbacks.append(TensorBoard(run.path))
    callbacks.append(Checkpointer(run, config, count_parameters(loop.model)))
    return callbacks


def _epoch_line(record: dict[str, Any], tasks: list[Task], weights: dict[str, float], epochs: int,
                seconds: float) -> str:
    """The console line of a finished epoch: weighted training loss and primary val metrics."""
    summary = "  ".join(f"{t.name} {t.primary} {record['val'][t.name][t.primary]:.4f}" for t in tasks)
    loss = sum(weights[n] * v for n, v in record["train_loss"].items())
    return f"epoch {record['epoch']}/{epochs}  loss {loss:.4f}  val: {summary}  ({seconds:.1f}s)"


def _final(loop: Loop, run: RunDir, evaluate_split: Callable[[Dataset], tuple[dict, dict]], test_set: Dataset,
           val_set: Dataset, config: Config | None) -> dict[str, Any]:
    """Test metrics of ``best.pt``: the ``final.json`` record, which rank 0 writes."""
    best = checkpoint.load(run.best)
    loop.model.load_state_dict(best["model"])
    test, _ = evaluate_split(test_set)
    final = {"tasks": test, "params": count_parameters(loop.model), "seconds": round(loop.state["seconds"], 3),
             "config": str(run.config) if config is not None else None,
             "split": "test", "best_epoch": loop.state["best_epoch"], "checkpoint": str(run.best),
             "task_info": task_info(loop.tasks)}
    if any(test[t.name]["count"] == 0 for t in loop.tasks):
        # Tasks without a single test label (the pets head boxes): the selected checkpoint's
        # validation metrics, kept apart (``scored_on_val``) and left out of delta_m on test.
        val_best, _ = evaluate_split(val_set)
        final["scored_on_val"] = {t.name: val_best[t.name] for t in loop.tasks if test[t.name]["count"] == 0}
    if loop.ctx.is_main:
        run.write_final(final)
    return final
