"""Partially labelled samples: missing targets are skipped by losses, metrics and counts."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from taskloom.data import DropLabelsOptions, PartialLabels, build_data
from taskloom.tasks import (BinaryTask, ClassificationTask, LandmarkTask, OrdinalExpectationTask, RegressionTask)
from taskloom.train import evaluate

NAN = float("nan")


def _finite_with_graph(loss, output):
    assert torch.isfinite(loss)
    loss.backward()
    assert output.grad is not None and torch.isfinite(output.grad).all()


def test_classification_ignores_minus_one():
    task = ClassificationTask("c", 3)
    out = torch.randn(4, 3, requires_grad=True)
    target = torch.tensor([0, -1, 2, -1])
    expected = nn.functional.cross_entropy(out[[0, 2]], target[[0, 2]])
    loss = task.loss(out, target)
    assert torch.allclose(loss, expected)
    _finite_with_graph(loss, out)
    assert out.grad[[1, 3]].abs().sum() == 0  # no gradient from unlabelled samples
    assert task.labelled(target).tolist() == [True, False, True, False]


@pytest.mark.parametrize("task,out_shape,target", [
    (ClassificationTask("c", 3), (3, 3), torch.tensor([-1, -1, -1])),
    (BinaryTask("b"), (3,), torch.tensor([-1.0, -1.0, -1.0])),
    (BinaryTask("m", 2), (3, 2), torch.full((3, 2), -1.0)),
    (RegressionTask("r"), (3,), torch.tensor([NAN, NAN, NAN])),
    (OrdinalExpectationTask("o", 0, 10), (3, 11), torch.tensor([NAN, NAN, NAN])),
    (LandmarkTask("l", 5), (3, 5, 2), torch.full((3, 5, 2), NAN)),
])
def test_batch_without_labels_is_zero_with_graph(task, out_shape, target):
    out = torch.randn(*out_shape, requires_grad=True)
    loss = task.loss(out, target)
    assert loss.item() == 0.0 and loss.requires_grad
    _finite_with_graph(loss, out)
    assert not task.labelled(target).any()


def test_regression_ordinal_landmarks_mean_over_labelled():
    out = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    assert RegressionTask("r").loss(out, torch.tensor([2.0, NAN, 5.0])).item() == pytest.approx(1.5)
    ordinal = OrdinalExpectationTask("o", 0, 4)
    logits = torch.randn(3, 5)
    expected = nn.functional.cross_entropy(logits[[0, 2]], torch.tensor([1, 3]))
    assert torch.allclose(ordinal.loss(logits, torch.tensor([1.0, NAN, 3.0])), expected)
    lm = LandmarkTask("l", 5)
    pred = torch.zeros(2, 5, 2)
    target = torch.ones(2, 5, 2)
    target[1, 3, 0] = NAN  # one NaN coordinate: the whole sample is missing
    assert lm.loss(pred, target).item() == pytest.approx(10.0)
    assert lm.labelled(target).tolist() == [True, False]


def test_binary_elementwise_missing():
    task = BinaryTask("m", 2)
    out = torch.zeros(2, 2, requires_grad=True)
    target = torch.tensor([[1.0, -1.0], [-1.0, 0.0]])
    assert task.loss(out, target).item() == pytest.approx(math.log(2))
    assert task.labelled(target).tolist() == [True, True]


def test_missing_like_markers():
    assert ClassificationTask("c", 2).missing_like(torch.tensor(1)).item() == -1
    assert BinaryTask("b").missing_like(torch.tensor(1.0)).item() == -1
    assert math.isnan(RegressionTask("r").missing_like(torch.tensor(3)).item())
    assert torch.isnan(LandmarkTask("l").missing_like(torch.zeros(5, 2))).all()


class _Fixed(nn.Module):
    """A "model" returning stored outputs (for evaluate)."""

    def __init__(self, tasks, outputs):
        super().__init__()
        self.tasks, self.outputs = tasks, outputs

    def forward(self, x):
        idx = x[:, 0].long()
        return {k: v[idx] for k, v in self.outputs.items()}

    def loss_terms(self, out, y):
        return {t.name: t.loss(out[t.name], y[t.name]) for t in self.tasks}


class _Rows(torch.utils.data.Dataset):
    def __init__(self, targets):
        self.targets = targets

    def __len__(self):
        return len(next(iter(self.targets.values())))

    def __getitem__(self, i):
        return torch.tensor([float(i)]), {k: v[i] for k, v in self.targets.items()}


def test_evaluate_counts_and_metrics_use_labelled_samples_only():
    cls, reg = ClassificationTask("c", 2), RegressionTask("r")
    outputs = {"c": torch.tensor([[5.0, 0.0], [0.0, 5.0], [5.0, 0.0], [0.0, 5.0]]),
               "r": torch.tensor([1.0, 2.0, 3.0, 4.0])}
    targets = {"c": torch.tensor([0, -1, 0, 0]),            # 3 labelled: 2 right, 1 wrong
               "r": torch.tensor([1.0, NAN, NAN, NAN])}     # 1 labelled, exact
    model = _Fixed([cls, reg], outputs)
    metrics, losses = evaluate(model, _Rows(targets), [cls, reg], batch_size=2)
    assert metrics["c"]["count"] == 3 and metrics["r"]["count"] == 1
    assert metrics["c"]["accuracy"] == pytest.approx(2 / 3)
    assert metrics["r"]["mae"] == pytest.approx(0.0)
    assert all(math.isfinite(v) for v in losses.values())
    # A task with no labelled sample at all: NaN metrics, count 0, no crash.
    targets["r"] = torch.full((4,), NAN)
    metrics, losses = evaluate(model, _Rows(targets), [cls, reg], batch_size=4)
    assert metrics["r"]["count"] == 0 and math.isnan(metrics["r"]["mae"]) and losses["r"] == 0.0


def test_partial_labels_wrapper_is_seeded_and_exact():
    cls = ClassificationTask("c", 2)
    base = _Rows({"c": torch.zeros(100, dtype=torch.long), "r": torch.zeros(100)})
    a = PartialLabels(base, [cls], 0.7, seed=3)
    b = PartialLabels(base, [cls], 0.7, seed=3)
    assert int(a.dropped.sum()) == 70 and torch.equal(a.dropped, b.dropped)
    missing = [i for i in range(100) if a[i][1]["c"].item() == -1]
    assert missing == a.dropped.nonzero().flatten().tolist()
    assert all(a[i][1]["r"].item() == 0 for i in range(100))  # other tasks untouched


def toy_manifest(root, n=48, size=28, **kw):
    """Options of a generated manifest dataset: tasks ``left`` (2 classes) and ``level`` (a number);
    splits: the last 8 images val, 8 test."""
    from PIL import Image

    from taskloom.data.manifest import ManifestOptions, TargetSpec

    root.mkdir(parents=True, exist_ok=True)
    rows = ["path,left,level,split"]
    for i in range(n):
        Image.new("L", (size, size), i * 5 % 255).save(root / f"{i}.png")
        split = "train" if i < n - 16 else ("val" if i < n - 8 else "test")
        rows.append(f"{i}.png,{i % 2},{i / n},{split}")
    (root / "m.csv").write_text("\n".join(rows) + "\n")
    targets = {"left": TargetSpec(kind="classification", num_classes=2), "level": TargetSpec(kind="regression")}
    return ManifestOptions(root=str(root), manifest="m.csv", targets=targets, size=size, channels=1, **kw)


def test_drop_labels_option_trains(tmp_path):
    from taskloom.architectures import SplitOptions, build_model
    from taskloom.backbones import LeNetOptions
    from taskloom.config import TrainConfig
    from taskloom.train import fit

    options = toy_manifest(tmp_path / "data", batch_size=16,
                           drop_labels=DropLabelsOptions(tasks=["level"], fraction=1.0))
    data = build_data(options)
    assert isinstance(data.train, PartialLabels) and not isinstance(data.val, PartialLabels)
    assert all(math.isnan(data.train[i][1]["level"].item()) for i in range(len(data.train)))
    model = build_model(SplitOptions(at=2), LeNetOptions(), data.tasks, data.input_shape)
    result = fit(model, data, TrainConfig(epochs=1, threads=1, progress=False), tmp_path / "run",
                 batch_size=16, log=lambda *a: None)
    assert result["tasks"]["level"]["count"] == 8  # evaluated on the (complete) test split
    assert math.isfinite(result["tasks"]["left"]["accuracy"])
    log = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert '"level": 0.0' in log[0]  # no training label: a train loss of exactly 0, not NaN


def test_drop_labels_unknown_task_is_an_error(tmp_path):
    from taskloom.errors import DataError

    with pytest.raises(DataError, match="drop_labels.tasks"):
        build_data(toy_manifest(tmp_path, drop_labels=DropLabelsOptions(tasks=["middle"], fraction=0.5)))


def test_drop_labels_from_yaml(tmp_path):
    from taskloom.config import load

    path = tmp_path / "c.yaml"
    path.write_text("data:\n  name: multimnist\n  drop_labels: {tasks: [left], fraction: 1.5}\n")
    from taskloom.errors import ConfigError

    with pytest.raises(ConfigError, match=r"line 3.*fraction"):
        load(path)


def test_mtfl_attribute_labels_dropped():
    from tests.conftest import shared_path
    from taskloom.data.mtfl import MTFLOptions

    root = shared_path("mtfl")
    data = build_data(MTFLOptions(root=str(root), limit=300, val_size=50, flip=False,
                                  drop_labels=DropLabelsOptions(tasks=["gender", "smile", "glasses", "pose"],
                                                                fraction=0.7, seed=0)))
    rows = [data.train[i][1] for i in range(len(data.train))]
    missing = sum(r["gender"].item() == -1 for r in rows)
    assert missing == round(0.7 * len(rows))
    assert all(r["smile"].item() == -1 for r in rows if r["gender"].item() == -1)
    assert not any(torch.isnan(r["landmarks"]).any() for r in rows)


def test_dropped_samples_are_spread_over_the_first_epoch():
    """The choice of samples must not follow the trainer's shuffle: with the same seed, a
    torch.randperm choice put all unlabelled samples in the first 70% of epoch 1's batches."""
    from taskloom.train import _epoch_batches

    base = _Rows({"c": torch.zeros(1000, dtype=torch.long)})
    for seed in (0, 1):
        wrapped = PartialLabels(base, [ClassificationTask("c", 2)], 0.7, seed=seed)
        order = [i for batch in _epoch_batches(1000, 64, seed, 0) for i in batch]
        first = wrapped.dropped[order[:300]].float().mean().item()
        assert 0.6 < first < 0.8, first


def test_mtfl_with_70_percent_attribute_labels_removed_trains(tmp_path):
    """The issue-7 setting at toy scale: MTFL, 70% of the training images without attribute
    labels (seeded); one epoch runs, every loss stays finite, every task reports its count."""
    from tests.conftest import shared_path
    from taskloom.architectures import SplitOptions, build_model
    from taskloom.backbones import TCDCNOptions
    from taskloom.config import TrainConfig
    from taskloom.data.mtfl import MTFLOptions
    from taskloom.train import fit

    root = shared_path("mtfl")
    drop = DropLabelsOptions(tasks=["gender", "smile", "glasses", "pose"], fraction=0.7, seed=0)
    data = build_data(MTFLOptions(root=str(root), limit=300, val_size=50, drop_labels=drop))
    model = build_model(SplitOptions(at=5), TCDCNOptions(), data.tasks, data.input_shape)
    final = fit(model, data, TrainConfig(epochs=1, threads=1, progress=False, select="landmarks/mean_error_iod"),
                tmp_path, batch_size=32, log=lambda *a: None)
    assert {t: m["count"] for t, m in final["tasks"].items()} == {t.name: len(data.test) for t in data.tasks}
    assert all(math.isfinite(m[t.primary]) for t in data.tasks for m in [final["tasks"][t.name]])


def test_train_size_keeps_a_fixed_subset_of_the_training_split(tmp_path):
    from taskloom.data import TrainSubset
    from taskloom.errors import DataError

    full = build_data(toy_manifest(tmp_path / "data"))
    a = build_data(toy_manifest(tmp_path / "data", train_size=5))
    b = build_data(toy_manifest(tmp_path / "data", train_size=5))
    assert isinstance(a.train, TrainSubset) and len(a.train) == 5
    assert torch.equal(a.train.index, b.train.index)  # the same images in every run
    assert len(set(a.train.index.tolist())) == 5 and int(a.train.index.max()) < len(full.train)
    x, y = a.train[2]
    fx, fy = full.train[int(a.train.index[2])]
    assert torch.equal(x, fx) and torch.equal(y["left"], fy["left"])
    assert len(a.val) == len(full.val) and len(a.test) == len(full.test)
    with pytest.raises(DataError, match="train_size: 999 exceeds"):
        build_data(toy_manifest(tmp_path / "data", train_size=999))
    with pytest.raises(ValueError, match="train_size must be positive"):
        toy_manifest(tmp_path / "data", train_size=0)


def test_train_loss_is_the_mean_over_labelled_samples(tmp_path):
    # With a learning rate of 1e-12 the model does not move, so the logged training loss of a
    # partially labelled task must equal its loss over all labelled training samples at once,
    # whatever the batches; weighting batch means by batch size (the old rule) does not.
    import json

    from taskloom.architectures import SplitOptions, build_model
    from taskloom.backbones import LeNetOptions
    from taskloom.config import TrainConfig
    from taskloom.train import _epoch_batches, fit

    options = toy_manifest(tmp_path / "data", batch_size=8,
                           drop_labels=DropLabelsOptions(tasks=["level"], fraction=0.6, seed=1))
    data = build_data(options)
    torch.manual_seed(0)
    model = build_model(SplitOptions(at=2), LeNetOptions(), data.tasks, data.input_shape)
    fit(model, data, TrainConfig(epochs=1, lr=1e-12, threads=1, progress=False), tmp_path / "run",
        batch_size=8, log=lambda *a: None)
    logged = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])["train_loss"]["level"]
    task = next(t for t in data.tasks if t.name == "level")
    model.train()
    with torch.no_grad():
        samples = [data.train[i] for i in range(len(data.train))]
        x = torch.stack([s[0] for s in samples])
        y = torch.stack([s[1]["level"] for s in samples])
        out = model(x)["level"]
        expected = task.loss(out, y).item()
        old = 0.0
        for batch in _epoch_batches(len(samples), 8, 0, 0):
            loss = task.loss(out[batch], y[batch])
            old += (loss.item() if task.labelled(y[batch]).any() else 0.0) * len(batch)
        old /= len(samples)
    assert logged == pytest.approx(expected, rel=1e-4)
    assert old != pytest.approx(expected, rel=1e-2)  # the batches hold uneven shares of labels
