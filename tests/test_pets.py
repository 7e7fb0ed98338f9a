"""The Oxford-IIIT Pet sample (../shared/data/pets-sample) as a dataset, the box task, and
pretrained dense networks of every architecture on it."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import require_pretrained, shared_path

from taskloom import config as cfg
from taskloom.boxes import BoxTask, box_iou
from taskloom.data import build_data
from taskloom.data.pets import PetsOptions, flip_sample, validation_names
from taskloom.errors import DataError

ROOT = ("pets-sample",)


def _options(**kw) -> PetsOptions:
    return PetsOptions(root=str(shared_path(*ROOT)), **kw)


@pytest.fixture(scope="module")
def bundle():
    return build_data(PetsOptions(root=str(shared_path(*ROOT)), size=64))


def test_splits_are_the_upstream_lists_with_a_fixed_validation_fold(bundle):
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (250, 50, 298)
    assert not set(bundle.train.names) & set(bundle.val.names)
    root = shared_path(*ROOT)
    trainval = [line.split()[0] for line in (root / "trainval.txt").read_text().splitlines()]
    assert set(bundle.train.names) | set(bundle.val.names) == set(trainval)
    assert set(bundle.val.names) == validation_names(list(reversed(trainval)), 50)  # order-independent
    assert [t.name for t in bundle.tasks] == ["segmentation", "breed", "species", "head_box"]
    assert bundle.input_shape == (3, 64, 64)


def test_labels(bundle):
    x, y = bundle.test[0]
    assert x.shape == (3, 64, 64) and y["segmentation"].shape == (64, 64)
    assert set(y["segmentation"].unique().tolist()) <= {-1, 0, 1}
    breeds = {bundle.test.names[i]: int(bundle.test[i][1]["breed"]) for i in range(len(bundle.test))}
    assert {n.rsplit("_", 1)[0]: b for n, b in breeds.items()} == {"Abyssinian": 0, "american_bulldog": 1, "Bengal": 2}
    species = [int(bundle.test[i][1]["species"]) for i in range(len(bundle.test))]
    assert sum(species) == 100  # the 100 bulldogs are dogs (1)
    counts = bundle.train.class_counts()
    assert counts["head_box"] == {"labelled": 246, "missing": 4}
    assert bundle.val.class_counts()["head_box"] == {"labelled": 50, "missing": 0}
    assert bundle.test.class_counts()["head_box"] == {"labelled": 0, "missing": 298}


def test_trimap_modes_and_the_ignored_border():
    root = shared_path(*ROOT)
    from PIL import Image

    binary = build_data(_options(size=64, segmentation="binary")).val
    three = build_data(_options(size=64, segmentation="trimap")).val
    i = 0
    b, t = binary[i][1]["segmentation"], three[i][1]["segmentation"]
    assert torch.equal(b == -1, t == 2) and torch.equal(b == 1, t == 0) and torch.equal(b == 0, t == 1)
    trimap = Image.open(root / "trimaps" / f"{binary.names[i]}.png")
    expected = torch.from_numpy(__import__("numpy").asarray(trimap.resize((64, 64), Image.Resampling.NEAREST))).long() - 1
    assert torch.equal(t, expected)  # nearest, so no class outside the trimap's values


def test_boxes_are_normalised_and_move_with_a_flip(bundle):
    root = shared_path(*ROOT)
    rows = {r.split(",")[0]: r.split(",") for r in (root / "heads.csv").read_text().splitlines()[1:]}
    name = bundle.val.names[0]
    _, y = bundle.val[0]
    xmin, ymin, xmax, ymax, w, h = (float(v) for v in rows[name][1:])
    assert torch.allclose(y["head_box"], torch.tensor([xmin / w, ymin / h, xmax / w, ymax / h]))
    x = torch.arange(2 * 4 * 4, dtype=torch.float32).view(2, 4, 4)[:1].expand(3, 4, 4)
    trimap = torch.tensor([[1, 1, 2, 2]] * 4)
    box = torch.tensor([0.1, 0.2, 0.3, 0.9])
    fx, ft, fb = flip_sample(x, trimap, box)
    assert torch.equal(fx[..., 0], x[..., -1]) and torch.equal(ft[0], torch.tensor([2, 2, 1, 1]))
    assert torch.allclose(fb, torch.tensor([0.7, 0.2, 0.9, 0.9]))
    # a flipped training sample keeps box and pixels together: the box's columns of the trimap
    train = build_data(_options(size=64)).train
    torch.manual_seed(1)
    flips = [train[0][1]["head_box"] for _ in range(12)]
    assert len({round(float(b[0]), 5) for b in flips}) == 2  # both orientations occur


def test_missing_files_and_lists_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="images"):
        build_data(PetsOptions(root=str(tmp_path)))
    root = shared_path(*ROOT)
    (tmp_path / "images").symlink_to(root / "images")
    (tmp_path / "trimaps").symlink_to(root / "trimaps")
    (tmp_path / "trainval.txt").write_text("Abyssinian_100 1 1 1\nAbyssinian_101 x 1 1\n")
    (tmp_path / "test.txt").write_text("Abyssinian_201 1 1 1\n")
    (tmp_path / "heads.csv").write_text("image,xmin,ymin,xmax,ymax,width,height\n")
    with pytest.raises(DataError, match="trainval.txt, line 2"):
        build_data(PetsOptions(root=str(tmp_path)))


def test_data_check_reports_counts_unlisted_images_and_missing_boxes(capsys):
    from taskloom.cli import main

    assert main(["data", "check", "pets", "--data-root", str(shared_path(*ROOT)), "-o", "size=32", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["files"] == {"images/*.jpg": 600, "trimaps/*.png": 600, "list.txt": 598, "trainval.txt": 300,
                               "test.txt": 298, "heads.csv": 296}
    assert report["splits"] == {"train": 250, "val": 50, "test": 298}
    kept = "\n".join(report["kept"])
    assert "no list (not used): Abyssinian_34" in kept and "Abyssinian_82" in kept
    for name in ("Abyssinian_104", "Bengal_111", "Bengal_175", "american_bulldog_202"):
        assert f"no head box (train): {name}" in kept
    assert "298 test images" in kept and not report["errors"]


# --------------------------------------------------------------------------- the box task


def test_box_iou_loss_and_metrics():
    a = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.2, 0.2, 0.4, 0.4], [0.1, 0.1, 0.2, 0.2]])
    b = torch.tensor([[0.0, 0.0, 0.5, 1.0], [0.4, 0.4, 0.2, 0.2], [0.5, 0.5, 0.6, 0.6]])
    assert torch.allclose(box_iou(a, b), torch.tensor([0.5, 1.0, 0.0]))  # swapped corners are sorted
    task = BoxTask("box")
    target = torch.cat([b[:2], torch.full((1, 4), float("nan"))])
    assert task.labelled(target).tolist() == [True, True, False]
    assert torch.allclose(task.loss(a, target), (a[:2] - b[:2]).abs().mean())
    assert task.loss(a, torch.full((3, 4), float("nan"))) == 0
    metrics = task.metrics()
    metrics.update(a[:2], b[:2])
    values = task.summarize(metrics.compute())
    assert values["miou"] == pytest.approx(0.75) and values["iou50"] == pytest.approx(1.0)
    giou = BoxTask("box", loss="l1_giou")
    assert giou.loss(a[:2], b[:2]) > task.loss(a[:2], b[:2])
    head = task.build_head((8, 2, 2))
    out = head(torch.randn(5, 8, 2, 2))
    assert out.shape == (5, 4) and (out[:, 2:] > out[:, :2]).all()  # corners from a centre and a positive size
    torch.nn.init.zeros_(head.linear.fc.weight)
    torch.nn.init.zeros_(head.linear.fc.bias)
    assert torch.allclose(head(torch.randn(2, 8, 2, 2)), torch.tensor([[0.25, 0.25, 0.75, 0.75]] * 2))


# --------------------------------------------------------------------------- pretrained + dense, every architecture

ARCHITECTURES = ["single", "split@2", "split@4", "cross_stitch", "nddr", "sluice",
                 {"name": "nddr_shortcut"}, {"name": "cross_stitch", "split_at": 1}]


@pytest.mark.parametrize("arch", ARCHITECTURES, ids=lambda a: a if isinstance(a, str) else json.dumps(a))
def test_pretrained_lite0_every_architecture_on_pets(arch):
    """Pretrained EfficientNet-Lite0 towers at output stride 16 with an ASPP segmentation head on
    48 px pets: outputs at label size, finite losses of every task, gradients everywhere."""
    require_pretrained()
    from taskloom.experiment import build_experiment

    config = cfg.from_dict({
        "data": {"name": "pets", "root": str(shared_path(*ROOT)), "size": 48, "tasks": ["segmentation", "breed", "head_box"]},
        "model": {"backbone": {"name": "timm", "model": "tf_efficientnet_lite0", "weights": "efficientnet_lite0_imagenet",
                               "output_stride": 16},
                  "architecture": arch, "heads": {"segmentation": {"name": "aspp", "width": 16}}},
    })
    data, model = build_experiment(config)
    x = torch.stack([data.train[i][0] for i in range(3)])
    y = {k: torch.stack([data.train[i][1][k] for i in range(3)]) for k in ("segmentation", "breed", "head_box")}
    out = model(x)
    assert out["segmentation"].shape == (3, 2, 48, 48) and out["breed"].shape == (3, 3) and out["head_box"].shape == (3, 4)
    losses = model.loss_terms(out, y)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "heads" not in n or "breed" in n)


def test_xresnet_on_a_timm_resnet_with_a_dilated_dense_head():
    require_pretrained("timm")
    from taskloom.experiment import build_experiment

    config = cfg.from_dict({
        "data": {"name": "pets", "root": str(shared_path(*ROOT)), "size": 64, "tasks": ["segmentation", "species"]},
        "model": {"backbone": {"name": "timm", "model": "resnet18", "output_stride": 8},
                  "architecture": "xresnet", "heads": {"segmentation": {"name": "aspp", "width": 16}}},
    })
    data, model = build_experiment(config)
    x = torch.stack([data.train[i][0] for i in range(2)])
    out = model(x)
    assert out["segmentation"].shape == (2, 2, 64, 64) and out["species"].shape == (2,)


@pytest.mark.slow
def test_train_reports_every_task_and_scores_head_box_on_validation(tmp_path, capsys):
    """The shipped cross-stitch config, one epoch on 16 images at 48 px: test metrics for the
    tasks with test labels, validation metrics for head_box (no test labels)."""
    require_pretrained()
    from taskloom.cli import main

    code = main(["train", "configs/pets/cross_stitch.yaml", "--data-root", str(shared_path(*ROOT)), "--epochs", "1",
                 "--run-dir", str(tmp_path / "run"), "data.size=48", "data.train_size=16", "train.progress=false",
                 "data.eval_batch_size=100"])
    assert code == 0
    printed = capsys.readouterr().out
    final = json.loads((tmp_path / "run" / "final.json").read_text())
    assert final["tasks"]["head_box"]["count"] == 0 and final["tasks"]["segmentation"]["count"] == 298
    assert final["scored_on_val"]["head_box"]["count"] == 50 and 0 <= final["scored_on_val"]["head_box"]["miou"] <= 1
    assert "split: val (head_box: no labels in the test split)" in printed


def test_delta_m_leaves_out_tasks_scored_on_validation():
    from taskloom.summary import delta_m, summarize
    from taskloom.tables import results_markdown as render_markdown

    info = {"seg": {"kind": "segmentation", "primary": "miou", "higher_is_better": {"miou": True}},
            "box": {"kind": "box", "primary": "miou", "higher_is_better": {"miou": True}}}
    row = {"task_info": info, "seg/miou": 0.6, "box/miou": 0.1, "val_scored": "box"}
    single = {"seg": {"miou": 0.5}, "box": {"miou": 0.5}}
    assert delta_m(row, info, single) == pytest.approx(20.0)
    assert delta_m({**row, "val_scored": None}, info, single) == pytest.approx(-30.0)
    rows = [{"label": "single-task", "baseline": "single-task", "task": t, "seed": 0, "params": 1, "seconds": 1,
             "task_info": {t: info[t]}, f"{t}/miou": 0.5, "val_scored": "box" if t == "box" else None}
            for t in info] + [{"label": "cs", "baseline": "single-task", "task": "", "seed": 0, "params": 2,
                               "seconds": 1, **row}]
    text = render_markdown(summarize(rows))
    assert "box miou (val) ↑" in text and "Δm (on test) leaves them out" in text and "+20.00" in text
