"""Mixing datasets that label different tasks (data.name: mix)."""
from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import pytest
import torch

from taskloom.data import build_data
from taskloom.data.manifest import ManifestOptions, TargetSpec
from taskloom.data.mix import MixOptions
from taskloom.errors import DataError


def _member(root, n, mode, tasks, size=10, channels=3):
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    rows = ["path," + ",".join(tasks) + ",split"]
    for i in range(n):
        Image.new(mode, (size, size), (i * 9 % 255,) * 3 if mode == "RGB" else i * 9 % 255).save(root / f"{i}.png")
        split = "train" if i < n - 4 else ("val" if i < n - 2 else "test")
        rows.append(f"{i}.png," + ",".join(str(i % 2) if t != "value" else str(i / n) for t in tasks) + f",{split}")
    (root / "m.csv").write_text("\n".join(rows) + "\n")
    targets = {t: TargetSpec(kind="regression") if t == "value" else TargetSpec(kind="classification", num_classes=2)
               for t in tasks}
    return ManifestOptions(root=str(root), manifest="m.csv", targets=targets, size=size, channels=channels)


@pytest.fixture
def members(tmp_path):
    a = _member(tmp_path / "a", 24, "L", ["shape", "colour"], channels=1)       # grey 10x10
    b = _member(tmp_path / "b", 14, "RGB", ["value", "colour"], size=16)         # RGB 16x16
    return a, b


def test_union_of_tasks_with_missing_targets(members):
    data = build_data(MixOptions(members=list(members), channels=1, size=10))
    assert [t.name for t in data.tasks] == ["shape", "colour", "value"]
    assert data.input_shape == (1, 10, 10)
    assert (len(data.train), len(data.val), len(data.test)) == (20 + 10, 4, 4)
    x, y = data.train[0]                     # from member a: no value
    assert x.shape == (1, 10, 10) and math.isnan(y["value"].item()) and y["shape"].item() >= 0
    x, y = data.train[25]                    # from member b: no shape
    assert x.shape == (1, 10, 10) and y["shape"].item() == -1 and not math.isnan(y["value"].item())
    assert y["colour"].item() >= 0           # colour is labelled by both
    batch = torch.utils.data.default_collate([data.train[i] for i in (0, 25)])
    assert batch[1]["value"].shape == (2,)


def test_shape_mismatch_is_a_clear_error(members):
    with pytest.raises(DataError, match=r"different shapes .*manifest: \(1, 10, 10\).*manifest: \(3, 16, 16\).*data.channels"):
        build_data(MixOptions(members=list(members)))
    data = build_data(MixOptions(members=list(members), channels=3, size=12))
    assert data.input_shape == (3, 12, 12) and data.train[0][0].shape == (3, 12, 12)


def test_per_task_sampling_ratio(members):
    # shape is only in a, value only in b, colour in both: shares a = 3 + 1/2, b = 1 + 1/2.
    data = build_data(MixOptions(members=list(members), channels=1, size=10, epoch_size=100,
                                 ratios={"shape": 3, "value": 1, "colour": 1}))
    counts = Counter(m for m, _ in data.train.index)
    assert len(data.train) == 100 and counts == {0: 70, 1: 30}
    # b has 10 training samples: 30 draws cover each of them 3 times.
    assert Counter(j for m, j in data.train.index if m == 1) == {j: 3 for j in range(10)}
    with pytest.raises(DataError, match="unknown task"):
        build_data(MixOptions(members=list(members), channels=1, size=10, ratios={"age": 1}))


def test_same_name_different_kind_is_an_error(tmp_path):
    a = _member(tmp_path / "a", 12, "L", ["value"], channels=1)
    b = _member(tmp_path / "b", 12, "L", ["shape"], channels=1)
    b.targets = {"value": TargetSpec(kind="classification", num_classes=2)}  # a class here, a number in a
    (tmp_path / "b" / "m.csv").write_text((tmp_path / "b" / "m.csv").read_text().replace("path,shape", "path,value"))
    with pytest.raises(DataError, match="task 'value' is"):
        build_data(MixOptions(members=[a, b]))


def test_mix_trains_end_to_end(members, tmp_path):
    from taskloom.architectures import SplitOptions, build_model
    from taskloom.backbones import LeNetOptions
    from taskloom.config import TrainConfig
    from taskloom.train import fit

    data = build_data(MixOptions(members=list(members), channels=1, size=28, batch_size=8))  # LeNet needs >= 28
    model = build_model(SplitOptions(at=2), LeNetOptions(), data.tasks, data.input_shape)
    final = fit(model, data, TrainConfig(epochs=1, threads=1, progress=False), tmp_path / "run", batch_size=8,
                log=lambda *a: None)
    assert final["tasks"]["shape"]["count"] == 2 and final["tasks"]["value"]["count"] == 2
    assert final["tasks"]["colour"]["count"] == 4


def test_mix_from_yaml(tmp_path, members):
    from taskloom.config import load

    a, b = members
    path = tmp_path / "mix.yaml"
    path.write_text(f"""data:
  name: mix
  channels: 1
  size: 10
  members:
    - {{name: manifest, root: {a.root}, manifest: m.csv, channels: 1, size: 10,
       targets: {{shape: {{kind: classification, num_classes: 2}}}}}}
    - {{name: manifest, root: {b.root}, manifest: m.csv, size: 16,
       targets: {{value: {{kind: regression}}}}}}
""")
    config = load(path)
    data = build_data(config.data)
    assert [t.name for t in data.tasks] == ["shape", "value"]


def test_mtfl_and_utkface():
    from tests.conftest import shared_path
    from taskloom.data.mtfl import MTFLOptions
    from taskloom.data.utkface import UTKFaceOptions

    mtfl, utk = shared_path("mtfl"), shared_path("utkface64")
    data = build_data(MixOptions(
        members=[MTFLOptions(root=str(mtfl), limit=150, val_size=30, tasks=["landmarks", "gender"]),
                 UTKFaceOptions(root=str(utk), limit=150, size=40, tasks=["age", "gender"])],
        channels=1, size=40))
    assert [t.name for t in data.tasks] == ["landmarks", "gender", "age"]
    x, y = data.train[len(data.train) - 1]     # a UTKFace face
    assert x.shape == (1, 40, 40) and torch.isnan(y["landmarks"]).all() and y["gender"].item() in (0, 1)


def test_evaluate_members_example(members, tmp_path, capsys):
    """examples/evaluate_members.py on a short mixed run: one line per member and labelled task."""
    import runpy

    from taskloom.config import from_dict, to_dict
    from taskloom.experiment import run

    a, b = members
    mix = {"name": "mix", "channels": 1, "size": 28, "batch_size": 8,
           "members": [to_dict(a), to_dict(b)]}
    config = from_dict({"data": mix, "model": {"architecture": "split@2"},
                        "train": {"epochs": 1, "threads": 1, "progress": False}})
    run(config, tmp_path / "run", log=lambda *a: None)
    module = runpy.run_path(str(Path(__file__).resolve().parents[1] / "examples" / "evaluate_members.py"))
    module["main"](str(tmp_path / "run"))
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in lines] == [["manifest", "shape"], ["manifest", "colour"],
                                                    ["manifest", "colour"], ["manifest", "value"]]
    assert all(line.endswith("(n=2)") for line in lines)
