"""The trainer's pieces on their own: train_one_epoch and its hooks, the checkpoint callback and
restore(), the run directory, the progress bar. (fit() end to end is in test_train.py.)"""
import json
from types import SimpleNamespace

import pytest
import torch

from taskloom import checkpoint, distributed
from taskloom.backbones import LeNetOptions
from taskloom.callbacks import Callback, Checkpointer, Loop, ProgressBar, restore
from taskloom.config import TrainConfig
from taskloom.errors import ConfigError
from taskloom.architectures import SingleOptions, build_model
from taskloom.optim import Precision, build_optimizer, build_scheduler
from taskloom.rundir import RunDir
from taskloom.tasks import ClassificationTask
from taskloom.train import count_parameters, train_one_epoch
from taskloom.weighting import build_weighting

SHAPE = (1, 28, 28)
TASKS = [ClassificationTask("a", 3), ClassificationTask("b", 4)]
BATCHES = [list(range(i, i + 8)) for i in range(0, 32, 8)]


class _Random(torch.utils.data.Dataset):
    def __init__(self, n=32):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, *SHAPE, generator=g)
        self.y = {t.name: torch.randint(0, t.num_classes, (n,), generator=g) for t in TASKS}

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], {k: v[i] for k, v in self.y.items()}


def _loop(seed=0) -> Loop:
    torch.manual_seed(seed)
    model = build_model(SingleOptions(), LeNetOptions(channels=[4, 6], hidden=16), TASKS, SHAPE)
    cfg = TrainConfig(lr=1e-2)
    weighting = build_weighting(cfg.weighting, [t.name for t in TASKS], {t.name: 1.0 for t in TASKS})
    optimizer = build_optimizer(model, cfg, weighting)
    return Loop(model=model, net=model, weighting=weighting, optimizer=optimizer,
                scheduler=build_scheduler(optimizer, cfg.schedule, 1), precision=Precision(32, torch.device("cpu")),
                tasks=TASKS, ctx=distributed.Context(), device=torch.device("cpu"))


class _Recorder(Callback):
    def __init__(self):
        self.calls = []

    def on_epoch_start(self, loop, num_batches):
        self.calls.append(("start", loop.state["step"], num_batches))

    def on_batch_end(self, loop, losses):
        self.calls.append(("batch", loop.state["step"], sorted(losses)))


def test_an_epoch_stopped_and_continued_equals_one_pass():
    data = _Random()
    whole = _loop()
    assert train_one_epoch(whole, data, BATCHES) is False
    assert whole.state["step"] == 4 and whole.state["partial"]["count"] == 32

    split, recorder = _loop(), _Recorder()
    stopped = train_one_epoch(split, data, BATCHES, callbacks=[recorder],
                              stop_requested=lambda: split.state["step"] == 2)
    assert stopped is True and split.state["step"] == 2 and split.state["partial"]["count"] == 16
    assert train_one_epoch(split, data, BATCHES, callbacks=[recorder]) is False
    assert recorder.calls == [("start", 0, 4), ("batch", 1, ["a", "b"]), ("batch", 2, ["a", "b"]),
                              ("start", 2, 4), ("batch", 3, ["a", "b"]), ("batch", 4, ["a", "b"])]
    assert split.state["partial"] == whole.state["partial"]
    for (name, a), b in zip(whole.model.state_dict().items(), split.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_checkpointer_writes_what_restore_reads(tmp_path):
    run, config = RunDir(tmp_path), {"train": {"lr": 0.01}}
    loop = _loop()
    train_one_epoch(loop, _Random(), BATCHES, stop_requested=lambda: loop.state["step"] == 3)
    saver = Checkpointer(run, config, count_parameters(loop.model))
    loop.state.update(epoch=1, best_epoch=1, best_score=0.5)
    saver.on_epoch_end(loop, {"epoch": 1})  # an improving epoch: best.pt too, without optimizer state
    best = checkpoint.load(run.best)
    assert "optimizer" not in best and best["params"] == count_parameters(loop.model) and best["tasks"] == ["a", "b"]
    loop.state.update(epoch=2)
    saver.on_epoch_end(loop, {"epoch": 2})  # no improvement: best.pt keeps epoch 1
    assert checkpoint.load(run.best)["state"]["epoch"] == 1

    fresh = _loop(seed=1)
    restore(fresh, run, config)
    assert fresh.state == loop.state
    for (name, a), b in zip(loop.model.state_dict().items(), fresh.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert fresh.optimizer.state_dict()["state"].keys() == loop.optimizer.state_dict()["state"].keys()
    with pytest.raises(ConfigError, match="changed keys: train.lr.*--force"):
        restore(_loop(), run, {"train": {"lr": 0.1}})
    restore(_loop(), run, {"train": {"lr": 0.1}}, force=True)


def test_run_dir_opening_and_log_truncation(tmp_path):
    run, logs = RunDir(tmp_path / "run"), []
    assert run.should_resume(False, logs.append) is False and not logs
    assert run.should_resume(True, logs.append) is False and "starting from scratch" in logs[0]
    run.prepare(None, 0)
    assert run.path.is_dir() and not run.config.exists() and not run.metrics.exists()
    for epoch in (1, 2, 3):
        run.append_metrics({"epoch": epoch, "loss": 0.1})
    run.truncate_metrics(2)  # a checkpoint of epoch 2, a log written up to epoch 3 before a kill
    assert [json.loads(line)["epoch"] for line in run.metrics.read_text().splitlines()] == [1, 2]
    checkpoint.save({"state": {}}, run.last)
    assert run.should_resume(True, logs.append) is True
    with pytest.raises(ConfigError, match="already holds a run.*--resume"):
        run.should_resume(False, logs.append)


def test_progress_bar_starts_at_the_resumed_step_and_closes_after_the_last(capsys):
    bar = ProgressBar(epochs=3)
    loop = SimpleNamespace(state={"epoch": 1, "step": 2, "partial": {"loss_sum": {"a": 0.5, "b": 0.0},
                                                                   "labelled": {"a": 2, "b": 0}}})
    bar.on_epoch_start(loop, 4)
    shown = bar.bar
    for _ in range(2):  # the bar shows the epoch's means so far (host numbers); no labels of b yet
        bar.on_batch_end(loop, {"a": torch.tensor(float("nan")), "b": torch.tensor(1.0)})
    assert shown.n == 4 and bar.bar is None  # closed before validation starts
    err = capsys.readouterr().err
    assert "epoch 2/3" in err and "2/4" in err and "a=0.250" in err and "b=" not in err
