"""The trainer's running sums stay on the device between reads (taskloom.epoch_sums).

A training step must not read a number back from the device: that makes the host wait for
every queued kernel. On the CPU such a wait cannot be seen, so the test watches the Python calls
that read a tensor (``item``, ``float``, ``bool``, ...) made by taskloom's own code; on CUDA
(``TASKLOOM_TEST_DEVICE=cuda``, scripts/gpu_record.py) PyTorch's sync debug mode also catches
those inside PyTorch. The sums must equal those of reading every step, bit for bit.
"""
import math
import sys
from pathlib import Path

import pytest
import torch
from helpers import DEVICE

from taskloom import distributed
from taskloom.architectures import CrossStitchOptions, SingleOptions, build_model
from taskloom.backbones import LeNetOptions
from taskloom.config import TrainConfig
from taskloom.epoch_sums import DeviceSums
from taskloom.tasks import BinaryTask, ClassificationTask, LandmarkTask, OrdinalExpectationTask, RegressionTask
from taskloom.train import TrainingError, build_loop, train_one_epoch
from taskloom.weighting import UncertaintyOptions

import taskloom

SHAPE = (1, 28, 28)
TASKS = [ClassificationTask("digit", 3), LandmarkTask("points", 2, eyes=(0, 1)), RegressionTask("age", loss="mse"),
         BinaryTask("attrs", 2), OrdinalExpectationTask("level", 0, 5)]
BATCHES = [list(range(i, i + 8)) for i in range(0, 40, 8)]
READS = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__")
PACKAGE = str(Path(taskloom.__file__).parent)


class _Partial(torch.utils.data.Dataset):
    """Generated samples of every per-sample kind, with some targets missing (partial labels)."""

    def __init__(self, n=40):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, *SHAPE, generator=g)
        digit = torch.randint(0, 3, (n,), generator=g)
        digit[::3] = -1
        points = torch.rand(n, 2, 2, generator=g)
        points[1::4] = float("nan")
        age = torch.rand(n, generator=g) * 5
        age[2::5] = float("nan")
        attrs = torch.randint(0, 2, (n, 2), generator=g)
        attrs[::2, 1] = -1
        self.y = {"digit": digit, "points": points, "age": age, "attrs": attrs, "level": age.clone()}

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], {k: v[i] for k, v in self.y.items()}


def _loop(architecture, weighting=None, sync_every=100):
    torch.manual_seed(0)
    model = build_model(architecture, LeNetOptions(channels=[4, 6], hidden=16), TASKS, SHAPE)
    cfg = TrainConfig(lr=1e-2, sync_every=sync_every, **({"weighting": weighting} if weighting else {}))
    loop, _ = build_loop(model, cfg, distributed.Context(), DEVICE)
    return loop


@pytest.fixture
def host_reads(monkeypatch):
    """Records each read of a tensor by taskloom's code outside DeviceSums.read."""
    reads, reading = [], [False]
    for name in READS:
        original = getattr(torch.Tensor, name)

        def watched(self, *args, _original=original, _name=name, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if not reading[0] and caller.startswith(PACKAGE):
                reads.append(f"{_name} in {caller}:{sys._getframe(1).f_lineno}")
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, watched)
    read = DeviceSums.read

    def allowed(self):
        reading[0] = True
        mode = torch.cuda.get_sync_debug_mode() if DEVICE.type == "cuda" else 0
        if mode:
            torch.cuda.set_sync_debug_mode(0)  # the read is where the trainer waits, on purpose
        try:
            return read(self)
        finally:
            reading[0] = False
            if mode:
                torch.cuda.set_sync_debug_mode(mode)

    monkeypatch.setattr(DeviceSums, "read", allowed)
    return reads


class _Steps:
    """Counts the steps."""

    def on_epoch_start(self, loop, num_batches):
        self.steps = 0

    def on_batch_end(self, loop, losses):
        self.steps += 1


@pytest.mark.parametrize("architecture,weighting", [(CrossStitchOptions(), None),
                                                    (SingleOptions(), UncertaintyOptions())],
                         ids=["cross_stitch", "single+uncertainty"])
def test_training_steps_read_nothing_back_and_sum_as_reading_every_step(host_reads, architecture, weighting):
    data = _Partial()
    lazy, eager = _loop(architecture, weighting), _loop(architecture, weighting, sync_every=1)
    steps = _Steps()
    if DEVICE.type == "cuda":  # any wait inside a step raises (host_reads lifts it for the reads)
        torch.cuda.set_sync_debug_mode("error")
        try:
            train_one_epoch(lazy, data, BATCHES, callbacks=[steps])
        finally:
            torch.cuda.set_sync_debug_mode("default")
    else:
        train_one_epoch(lazy, data, BATCHES, callbacks=[steps])
    assert steps.steps == 5 and host_reads == []
    train_one_epoch(eager, data, BATCHES)
    assert lazy.state["partial"] == eager.state["partial"]  # exactly: the same float64 operations
    partial = lazy.state["partial"]
    assert partial["count"] == 40 and partial["labelled"]["digit"] == 26 and partial["labelled"]["points"] == 30
    assert all(math.isfinite(v) and v > 0 for v in partial["loss_sum"].values())
    for (name, a), b in zip(lazy.model.state_dict().items(), eager.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_the_sums_equal_python_floats_added_step_by_step():
    torch.manual_seed(1)
    partial = {"loss_sum": {"a": 0.1}, "labelled": {"a": 3}, "penalty_sum": {}, "weight_sum": {}, "count": 3}
    expected = {"loss_sum": {"a": 0.1}, "labelled": {"a": 3}, "penalty_sum": {"p": 0.0}, "weight_sum": {"a": 0.0},
                "count": 3}
    sums = DeviceSums(partial, DEVICE)
    for step in range(1, 8):
        loss, k, penalty, weight = torch.rand(()), int(torch.randint(0, 9, ())), torch.rand(()), torch.rand(())
        sums.add(step, {"a": loss.to(DEVICE)}, {"a": torch.tensor(k, device=DEVICE)}, {"p": penalty.to(DEVICE)},
                 {"a": weight.to(DEVICE)}, 8)
        expected["loss_sum"]["a"] += loss.item() * k
        expected["labelled"]["a"] += k
        expected["penalty_sum"]["p"] += penalty.item() * 8
        expected["weight_sum"]["a"] += float(weight) * 8
        expected["count"] += 8
        if step in (2, 7):
            assert sums.read() is None
    assert partial == expected
    assert sums.read() is None  # nothing since the last read


def test_a_non_finite_loss_names_its_first_step_at_the_next_read(tmp_path):
    loop = _loop(CrossStitchOptions(), sync_every=4)
    with torch.no_grad():
        loop.model.heads["age"][0].fc.bias.fill_(float("inf"))  # age is labelled from step 1: inf there
    with pytest.raises(TrainingError, match=r"task 'age' is (inf|nan) at epoch 1, step 1; stopping "
                                            r"\(no checkpoint was written yet\)"):
        train_one_epoch(loop, _Partial(), BATCHES, last_checkpoint=tmp_path / "last.pt")
    assert loop.state["step"] == 4  # read after 4 steps, not at the end of the epoch (5)


def test_sync_every_is_validated():
    with pytest.raises(ValueError, match="sync_every must be a whole number of steps >= 1, got 0"):
        TrainConfig(sync_every=0)
