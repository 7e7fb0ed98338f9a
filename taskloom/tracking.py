"""Optional TensorBoard logging (``train.tensorboard: true``), alongside ``metrics.jsonl``.

Per epoch: every task's train / val loss and validation metrics (scalars), the learning rate of
every parameter group, the task loss weights, and a histogram of each mixer's weights
(``Mixer.blocks()``, the ``(K, K, C, C)`` linear map). Only rank 0 writes; event files go to
``RUN_DIR/tensorboard``. Needs the ``tensorboard`` package: ``pip install 'taskloom[tracking]'``.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from torch import nn

from taskloom.callbacks import Callback, Loop
from taskloom.errors import ConfigError


class TensorBoard(Callback):
    """Writes every epoch's ``metrics.jsonl`` record (and the mixers' weights) as TensorBoard
    events; the files are flushed and closed when training ends, also by an interrupt or error."""

    def __init__(self, run_dir: str | Path):
        self.writer = open_writer(run_dir)

    def on_epoch_end(self, loop: Loop, record: dict[str, Any]) -> None:
        log_epoch(self.writer, record, loop.model)

    def close(self) -> None:
        self.writer.close()


def open_writer(run_dir: str | Path):
    """A ``SummaryWriter`` logging to ``run_dir/tensorboard``; a clear error if tensorboard is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise ConfigError(
            f"train.tensorboard: true needs the 'tensorboard' package ({exc}); install it with "
            f"pip install tensorboard (or pip install 'taskloom[tracking]'), or set train.tensorboard=false"
        ) from None
    return SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))


def _scalar(writer, tag: str, value: Any, step: int) -> None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value)):
        writer.add_scalar(tag, float(value), step)


def log_epoch(writer, record: dict[str, Any], model: nn.Module) -> None:
    """Write one epoch's ``metrics.jsonl`` record (and the mixers' weights) to ``writer``."""
    step = int(record["epoch"])
    for group, lr in record.get("lr", {}).items():
        _scalar(writer, f"lr/{group}", lr, step)
    for split in ("train_loss", "val_loss", "task_weights", "penalty"):
        for name, value in (record.get(split) or {}).items():
            _scalar(writer, f"{split}/{name}", value, step)
    for task, metrics in (record.get("val") or {}).items():
        for metric, value in metrics.items():
            _scalar(writer, f"val/{task}/{metric}", value, step)
    _scalar(writer, "score", record.get("score"), step)
    from taskloom.mixers import Mixer

    for name, module in model.named_modules():
        if isinstance(module, Mixer):
            try:
                blocks = module.blocks()
            except NotImplementedError:
                continue
            writer.add_histogram(f"mixers/{name}", blocks.detach().float().cpu(), step)
    writer.flush()
