"""The trainer shared by the CLI and the Python API.

:func:`fit` trains a multi-task model: per-kind parameter groups (backbone / fusion / head) with
their own learning-rate multiplier and weight decay, an epoch-wise schedule that scales every
group by the same factor (so multipliers survive), per-task loss weights, model selection on the
validation split, an atomic checkpoint every epoch and exact resume (same final weights on CPU
as an uninterrupted run, also after an interrupt in the middle of an epoch).
"""
from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from taskloom import checkpoint, distributed
from taskloom.config import Config, ScheduleOptions, TrainConfig, diff, dump, to_dict
from taskloom.data import DataBundle
from taskloom.errors import ConfigError, TaskloomError
from taskloom.models import parameter_kinds
from taskloom.tasks import Task, primary_score
from taskloom.weighting import build_weighting

# Keys that may differ between a run and its resumption without changing the result.
RESUME_SAFE_KEYS = {"train.device", "train.progress", "train.threads", "train.tensorboard", "data.num_workers", "data.root",
                    "data.eval_batch_size"}


class TrainingError(TaskloomError):
    """Training cannot go on (for example a non-finite loss)."""


class Interrupted(TaskloomError):
    """SIGINT/SIGTERM received; the state was saved and the run can be resumed."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: 'cuda' requested but no CUDA device is available (use auto or cpu)")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("train.device: 'mps' requested but MPS is not available (use auto or cpu)")
    return torch.device(name)


# --------------------------------------------------------------------------- optimisation


def build_optimizer(model: nn.Module, cfg: TrainConfig, *extra: nn.Module) -> torch.optim.Optimizer:
    """One parameter group per kind, ``lr = cfg.lr * lr_mult`` and its own weight decay.

    ``extra`` modules (the loss weighting) contribute their parameters by kind as well.
    """
    groups = []
    kinds = parameter_kinds(model)
    for module in extra:
        for kind, params in parameter_kinds(module).items():
            kinds.setdefault(kind, []).extend(params)
    for kind, params in kinds.items():
        options = getattr(cfg.groups, kind, None)
        if options is None:
            raise ConfigError(f"train.groups: no settings for parameter kind {kind!r}")
        decay = cfg.weight_decay if options.weight_decay is None else options.weight_decay
        groups.append({"params": params, "name": kind, "lr": cfg.lr * options.lr_mult,
                       "lr_mult": options.lr_mult, "weight_decay": decay})
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    return torch.optim.Adam(groups, lr=cfg.lr)


def schedule_factor(options: ScheduleOptions, epoch: int, epochs: int) -> float:
    """Multiplier of every group's base learning rate at (0-based) ``epoch``."""
    if options.name == "step":
        return options.gamma ** (epoch // options.step_size)
    if options.name == "poly":
        return max(0.0, 1.0 - epoch / epochs) ** options.power
    if options.name == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
    return 1.0


def build_scheduler(optimizer: torch.optim.Optimizer, options: ScheduleOptions, epochs: int):
    """An epoch-wise scheduler that multiplies every group's rate by one common factor.

    ``LambdaLR`` scales each group's own initial rate, and ``ReduceLROnPlateau`` multiplies
    each group's current rate, so the ratio between groups (the fusion multiplier) is kept.
    """
    if options.name == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max", factor=options.gamma, patience=options.patience
        )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: schedule_factor(options, e, epochs))


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


class Precision:
    """``train.precision``: 32 (float32), ``bf16`` (bfloat16 autocast) or ``16-mixed`` (float16
    autocast with dynamic loss scaling). Parameters, mixers' included, stay float32: autocast
    only changes the dtype ops compute in."""

    def __init__(self, mode: Any, device: torch.device):
        self.mode, self.device = mode, device
        self.dtype = {"bf16": torch.bfloat16, "16-mixed": torch.float16}.get(mode)
        self.scaler = torch.amp.GradScaler(device.type, enabled=mode == "16-mixed")

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def backward(self, weighting: Any, losses: dict, penalties: dict, model: nn.Module) -> dict[str, float]:
        if self.scaler.is_enabled():  # scale() (re)initialises the scaler's state for this step
            weighting.loss_scale = self.scaler.scale(torch.ones((), device=self.device))
        else:
            weighting.loss_scale = 1.0
        return weighting.backward(losses, penalties, model)

    def step(self, optimizer: torch.optim.Optimizer, model: nn.Module, grad_clip: float | None) -> None:
        if grad_clip is not None:
            self.scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        self.scaler.step(optimizer)
        self.scaler.update()


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


# --------------------------------------------------------------------------- training


@contextmanager
def _stop_requests() -> Iterator[list[int]]:
    """Turn SIGINT/SIGTERM into a flag checked after every step (main thread only)."""
    received: list[int] = []
    if not hasattr(signal, "SIGTERM") or __import__("threading").current_thread() is not __import__("threading").main_thread():
        yield received
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum: int, frame: Any) -> None:
        if received:  # a second signal: stop now
            signal.signal(signum, previous[signum])
            raise KeyboardInterrupt
        received.append(signum)

    for s in previous:
        signal.signal(s, handler)
    try:
        yield received
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The shuffled batches of one epoch: a function of (seed, epoch) only, so resumable."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def fit(
    model: nn.Module,
    data: DataBundle,
    train: TrainConfig,
    run_dir: str | Path,
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
    try:
        final = _fit(model, data, train, run_dir, ctx, device, config=config, seed=seed, batch_size=batch_size,
                     eval_batch_size=eval_batch_size, num_workers=num_workers, resume=resume, force=force, log=log)
        ctx.barrier()  # every rank leaves together, after rank 0 has written final.json
        return final
    finally:
        # Destroy the process group before the interpreter exits: left to interpreter shutdown,
        # gloo's threads can abort the process ("terminate called without an active exception").
        distributed.teardown(ctx)


def _fit(model: nn.Module, data: DataBundle, train: TrainConfig, run_dir: str | Path,
         ctx: distributed.Context, device: torch.device, *, config, seed, batch_size, eval_batch_size,
         num_workers, resume, force, log) -> dict[str, Any]:
    run_dir = Path(run_dir)
    ckpt_dir = run_dir / "checkpoints"
    last = ckpt_dir / "last.pt"
    if ctx.enabled and device.type == "cuda":
        device = torch.device("cuda", ctx.local_rank)
    if not ctx.is_main:
        log = lambda *a: None  # noqa: E731
    if ctx.enabled and train.weighting.name in ("gradnorm", "pcgrad"):
        # Both take per-task gradients with torch.autograd.grad, which bypasses DDP's
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
    precision = Precision(train.precision, device)
    config_dict = to_dict(config) if config is not None else None

    state = {"epoch": 0, "step": 0, "best_score": -math.inf, "best_epoch": -1, "seconds": 0.0,
             "partial": _empty_partial()}
    if resume and last.is_file():
        payload = checkpoint.load(last)
        if config_dict is not None and payload.get("config") is not None and not force:
            changed = [k for k in diff(payload["config"], config_dict) if k not in RESUME_SAFE_KEYS]
            if changed:
                raise ConfigError(
                    f"{last}: cannot resume with a different config; changed keys: {', '.join(changed)}. "
                    f"Resume with the run's own config ({run_dir / 'config.yaml'}) or pass --force"
                )
        try:
            model.load_state_dict(payload["model"])
            weighting.load_state_dict(payload["weighting"])
            optimizer.load_state_dict(payload["optimizer"])
            scheduler.load_state_dict(payload["scheduler"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise checkpoint.CheckpointError(f"{last}: does not match this model ({exc})") from None
        state.update(payload["state"])
        torch.set_rng_state(payload["rng"]["torch"])
        log(f"resuming {run_dir} at epoch {state['epoch'] + 1}, step {state['step']}")
    elif resume:
        log(f"no checkpoint at {last}; starting from scratch")
    elif last.is_file():
        raise ConfigError(
            f"{run_dir} already holds a run ({last}); pass --resume to continue it or choose another --run-dir"
        )
    metrics_path = run_dir / "metrics.jsonl"
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if config is not None:
            dump(config, run_dir / "config.yaml")
        _truncate_log(metrics_path, state["epoch"])
    net = model
    if ctx.enabled:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def save_state(path: Path, with_optimizer: bool = True) -> None:
        if not ctx.is_main:
            return
        payload = {"config": config_dict, "model": model.state_dict(), "weighting": weighting.state_dict(),
                   "state": dict(state), "rng": {"torch": torch.get_rng_state()},
                   "params": count_parameters(model), "tasks": [t.name for t in tasks]}
        if with_optimizer:
            payload["optimizer"] = optimizer.state_dict()
            payload["scheduler"] = scheduler.state_dict()
        checkpoint.save(payload, path)

    def evaluate_split(dataset: Dataset) -> tuple[dict, dict]:
        return evaluate(model, dataset, tasks, batch_size=eval_batch_size, num_workers=num_workers,
                        device=device, precision=precision, ctx=ctx)

    writer = None
    if getattr(train, "tensorboard", False) and ctx.is_main:
        from taskloom.tracking import open_writer
        writer = open_writer(run_dir)

    from tqdm import tqdm

    show = train.progress and sys.stderr.isatty() and ctx.is_main
    # closing(): the TensorBoard files are flushed and closed on an interrupt or error too
    with _stop_requests() as stop, (contextlib.closing(writer) if writer is not None else contextlib.nullcontext()):
        while state["epoch"] < train.epochs:
            epoch = state["epoch"]
            started = time.perf_counter()
            net.train()
            batches = [ctx.shard(b) for b in _epoch_batches(len(data.train), batch_size, seed, epoch)]
            loader = DataLoader(data.train, batch_sampler=batches[state["step"]:], num_workers=num_workers,
                                pin_memory=device.type == "cuda")
            partial = state["partial"]
            bar = tqdm(loader, total=len(batches), initial=state["step"], disable=not show,
                       desc=f"epoch {epoch + 1}/{train.epochs}", leave=False, dynamic_ncols=True)
            for x, y in bar:
                x, y = _to(x, device), _to(y, device)
                with precision.autocast():
                    losses = model.loss_terms(net(x), y)
                    penalties = model.penalty() if hasattr(model, "penalty") else {}
                bad = [name for name, loss in losses.items() if not torch.isfinite(loss)]
                if ctx.any(bool(bad)):
                    good = f"last good checkpoint: {last}" if last.is_file() else "no checkpoint was written yet"
                    name = bad[0] if bad else "?"
                    value = losses[name].item() if bad else float("nan")
                    raise TrainingError(
                        f"loss of task {name!r} is {value} at epoch {epoch + 1}, step {state['step'] + 1}; "
                        f"stopping ({good}). Lower the learning rate or check the inputs"
                    )
                optimizer.zero_grad(set_to_none=True)
                used = precision.backward(weighting, losses, penalties, model)
                precision.step(optimizer, model, train.grad_clip)
                state["step"] += 1
                for t in tasks:
                    # A task's loss is a mean over its labelled samples: weight it by their count.
                    n = int(t.labelled(y[t.name]).sum())
                    partial["loss_sum"][t.name] = partial["loss_sum"].get(t.name, 0.0) + losses[t.name].item() * n
                    labelled = partial.setdefault("labelled", {})
                    labelled[t.name] = labelled.get(t.name, 0) + n
                for name, value in penalties.items():
                    partial["penalty_sum"][name] = partial["penalty_sum"].get(name, 0.0) + value.item() * len(x)
                for name, value in used.items():
                    partial["weight_sum"][name] = partial["weight_sum"].get(name, 0.0) + float(value) * len(x)
                partial["count"] += len(x)
                if show:
                    bar.set_postfix({n: f"{l.item():.3f}" for n, l in losses.items()})
                if ctx.any(bool(stop)):
                    state["seconds"] += time.perf_counter() - started
                    save_state(last)
                    ctx.barrier()
                    raise Interrupted(
                        f"interrupted at epoch {epoch + 1}, step {state['step']}; state saved to {last}. "
                        f"Resume with: taskloom train {run_dir / 'config.yaml'} --run-dir {run_dir} --resume"
                    )
            bar.close()
            val, val_loss = evaluate_split(data.val)
            score = selection_score(train.select, tasks, val, val_loss, weights)
            lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                scheduler.step(score)
            else:
                scheduler.step()
            train_loss = _mean_over_ranks(ctx, partial["loss_sum"], partial.get("labelled", partial["count"]))
            weighting.epoch_end(train_loss)
            state["seconds"] += time.perf_counter() - started
            improved = score > state["best_score"]
            state.update(epoch=epoch + 1, step=0, partial=_empty_partial())
            if improved:
                state.update(best_score=score, best_epoch=epoch + 1)
            record = {"epoch": epoch + 1, "lr": lrs, "train_loss": train_loss,
                      "task_weights": _mean_over_ranks(ctx, partial["weight_sum"], partial["count"]),
                      "penalty": _mean_over_ranks(ctx, partial["penalty_sum"], partial["count"]),
                      "val_loss": val_loss, "val": val, "score": score, "seconds": round(state["seconds"], 3)}
            if ctx.is_main:
                with open(metrics_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(record) + "\n")
                if writer is not None:
                    from taskloom.tracking import log_epoch
                    log_epoch(writer, record, model)
            if improved:
                save_state(ckpt_dir / "best.pt", with_optimizer=False)
            save_state(last)
            ctx.barrier()
            summary = "  ".join(f"{t.name} {t.primary} {val[t.name][t.primary]:.4f}" for t in tasks)
            log(f"epoch {epoch + 1}/{train.epochs}  loss {sum(weights[n] * v for n, v in train_loss.items()):.4f}  "
                f"val: {summary}  ({time.perf_counter() - started:.1f}s)")

    best = checkpoint.load(ckpt_dir / "best.pt")
    model.load_state_dict(best["model"])
    test, _ = evaluate_split(data.test)
    final = {"tasks": test, "params": count_parameters(model), "seconds": round(state["seconds"], 3),
             "config": str(run_dir / "config.yaml") if config is not None else None,
             "split": "test", "best_epoch": state["best_epoch"], "checkpoint": str(ckpt_dir / "best.pt"),
             "task_info": task_info(tasks)}
    if any(test[t.name]["count"] == 0 for t in tasks):
        # Tasks without a single test label (the pets head boxes): the selected checkpoint's
        # validation metrics, kept apart (``scored_on_val``) and left out of delta_m on test.
        val_best, _ = evaluate_split(data.val)
        final["scored_on_val"] = {t.name: val_best[t.name] for t in tasks if test[t.name]["count"] == 0}
    if ctx.is_main:
        (run_dir / "final.json").write_text(json.dumps(final, indent=2) + "\n", encoding="utf-8")
    return final


def task_info(tasks: list[Task]) -> dict[str, dict[str, Any]]:
    """Kind, primary metric and metric directions of each task (for delta_m in reports)."""
    return {t.name: {"kind": t.kind, "primary": t.primary, "higher_is_better": dict(t.higher_is_better)}
            for t in tasks}


def _mean_over_ranks(ctx: distributed.Context, sums: dict[str, float],
                    count: int | dict[str, int]) -> dict[str, float]:
    """Per-key means over all ranks: ``sums[k] / count`` (or ``/ count[k]``, per-key counts)."""
    names = sorted(sums)
    counts = [float(count[n] if isinstance(count, dict) else count) for n in names]
    totals = ctx.sum([sums[n] for n in names] + counts)
    return {n: s / max(c, 1.0) for n, s, c in zip(names, totals[:len(names)], totals[len(names):])}


def _empty_partial() -> dict[str, Any]:
    """Running sums of the epoch in progress (checkpointed for mid-epoch resume)."""
    return {"loss_sum": {}, "labelled": {}, "penalty_sum": {}, "weight_sum": {}, "count": 0}


def _truncate_log(path: Path, epochs_done: int) -> None:
    """Drop log lines of epochs after the checkpoint (written before a crash)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line).get("epoch", 0) <= epochs_done]
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def build_experiment(config: Config, log=lambda *a: None) -> tuple[DataBundle, nn.Module]:
    """The data and model a config describes: dataset, network, tower initialisation
    (``init.towers``) and regulariser. Used by ``train``, ``eval`` and ``inspect`` alike."""
    from taskloom.data import build_data
    from taskloom.models import build_model
    from taskloom.regularizers import attach_regularizer

    data = build_data(config.data)
    from taskloom.heads import apply_heads
    apply_heads(data.tasks, config.model.heads)  # model.heads: each dense task's head (fcn, aspp)
    model = build_model(config.model.architecture, config.model.backbone, data.tasks, data.input_shape)
    if config.init.towers:  # (a resumed run then loads its own checkpoint over these)
        from taskloom.models import init_towers
        init_towers(model, config.init.towers, data.tasks, data.input_shape, log)
    attach_regularizer(model, config.model.regularizer)  # model.penalty() then includes it
    from taskloom.models import configure_towers  # execution of the tower stages (no parameter change)
    configure_towers(model, config.model.batched_towers, config.train.checkpoint_towers)
    return data, model


def load_run(path: str | Path, data_root: str | None = None) -> tuple[nn.Module, Config, dict[str, Any], DataBundle]:
    """Rebuild a checkpoint's data and model from its saved config and load its weights."""
    from taskloom.config import from_dict

    path = Path(path)
    payload = checkpoint.load(path)
    if payload.get("config") is None:
        raise checkpoint.CheckpointError(
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
        raise checkpoint.CheckpointError(f"{path}: weights do not match the saved config's model ({exc})") from None
    return model.eval(), config, payload, data


def run(config: Config, run_dir: str | Path, *, resume: bool = False, force: bool = False,
        log=lambda *a: print(*a, flush=True)) -> dict[str, Any]:
    """Build the data and model a config describes and :func:`fit` them (what ``taskloom train`` does)."""
    torch.manual_seed(config.seed)
    data, model = build_experiment(config, log)
    log(f"{config.model.architecture.name} on {config.data.name}: {len(data.tasks)} tasks "
        f"({', '.join(t.name for t in data.tasks)}), {count_parameters(model):,} parameters, "
        f"{len(data.train):,} / {len(data.val):,} / {len(data.test):,} train / val / test samples")
    return fit(model, data, config.train, run_dir, config=config, seed=config.seed,
               batch_size=config.data.batch_size, eval_batch_size=config.data.eval_batch_size,
               num_workers=config.data.num_workers, resume=resume, force=force, log=log)
