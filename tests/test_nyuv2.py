"""NYUv2 (preprocessed layout) on small generated fixtures in exactly that layout."""
import shutil

import numpy as np
import pytest
import torch

from taskloom.architectures import ARCHITECTURES, build_model
from taskloom.backbones import BACKBONES
from taskloom.config import TrainConfig
from taskloom.data import build_data
from taskloom.data.nyuv2 import NYUv2Options
from taskloom.errors import DataError
from taskloom.architectures import ARCHITECTURES, build_model
from taskloom.dense import DepthTask, NormalsTask, SegmentationTask

H, W = 24, 32


def make_nyuv2(root, train=6, val=3, h=H, w=W, seed=0):
    """Random samples in train|val/{image,label,depth,normal}/{i}.npy (the MTAN layout)."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", train), ("val", val)):
        for part in ("image", "label", "depth", "normal"):
            (root / split / part).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            label = rng.integers(-1, 13, size=(h, w)).astype(np.float32)
            depth = rng.uniform(0.5, 10, size=(h, w, 1)).astype(np.float32)
            depth[0, 0] = 0  # missing depth
            normal = rng.normal(size=(h, w, 3)).astype(np.float32)
            normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
            normal[0, 1] = 0  # missing normal
            np.save(root / split / "image" / f"{i}.npy", rng.uniform(0, 1, size=(h, w, 3)).astype(np.float32))
            np.save(root / split / "label" / f"{i}.npy", label)
            np.save(root / split / "depth" / f"{i}.npy", depth)
            np.save(root / split / "normal" / f"{i}.npy", normal)
    return root


def test_fixture_splits_samples_and_tasks(tmp_path):
    root = make_nyuv2(tmp_path / "nyuv2")
    data = build_data(NYUv2Options(root=str(root), val_size=2))
    assert (len(data.train), len(data.val), len(data.test)) == (4, 2, 3)
    assert not set(data.train.indices) & set(data.val.indices)
    assert data.input_shape == (3, H, W)
    seg, normals, depth = data.tasks
    assert isinstance(seg, SegmentationTask) and seg.num_classes == 13 and seg.ignore_index == -1
    assert isinstance(normals, NormalsTask) and isinstance(depth, DepthTask)
    assert seg.output_size == normals.output_size == depth.output_size == (H, W)
    x, y = data.test[1]
    assert x.shape == (3, H, W) and x.dtype == torch.float32
    assert y["segmentation"].shape == (H, W) and y["segmentation"].dtype == torch.int64
    assert y["segmentation"].min() >= -1 and y["segmentation"].max() <= 12
    assert y["normals"].shape == (3, H, W) and y["depth"].shape == (1, H, W)
    expected = np.load(root / "val" / "label" / "1.npy")
    assert torch.equal(y["segmentation"], torch.from_numpy(expected).long())


def test_resize_and_flip(tmp_path):
    root = make_nyuv2(tmp_path / "nyuv2")
    data = build_data(NYUv2Options(root=str(root), val_size=2, size=[12, 16], flip=True))
    assert data.input_shape == (3, 12, 16) and data.tasks[0].output_size == (12, 16)
    plain = build_data(NYUv2Options(root=str(root), val_size=2, size=[12, 16]))
    torch.manual_seed(0)
    for _ in range(20):
        x, y = data.train[0]
        px, py = plain.train[0]
        if not torch.equal(x, px):
            assert torch.equal(x, px.flip(-1)) and torch.equal(y["segmentation"], py["segmentation"].flip(-1))
            assert torch.equal(y["normals"][0], -py["normals"][0].flip(-1))  # x component mirrored
            assert torch.equal(y["normals"][1:], py["normals"][1:].flip(-1))
            break
    else:
        pytest.fail("no flip in 20 draws")


def test_dense_heads_train_on_a_staged_backbone(tmp_path):
    from taskloom.train import fit

    root = make_nyuv2(tmp_path / "nyuv2")
    data = build_data(NYUv2Options(root=str(root), val_size=2, batch_size=2))
    backbone = BACKBONES["resnet_small"].options(channels=[8, 16], blocks=[1, 1], stem_channels=8)
    model = build_model(ARCHITECTURES["cross_stitch"].options(), backbone, data.tasks, data.input_shape)
    out = model(torch.zeros(2, 3, H, W))
    assert out["segmentation"].shape == (2, 13, H, W) and out["normals"].shape == (2, 3, H, W)
    final = fit(model, data, TrainConfig(epochs=1, progress=False, select="normals/mean_angle"), tmp_path / "run",
                batch_size=2, eval_batch_size=2, log=lambda *a: None)
    tasks = final["tasks"]
    assert set(tasks["segmentation"]) >= {"miou", "pixel_accuracy", "fwiou"}
    assert set(tasks["normals"]) >= {"mean_angle", "median_angle", "within_11.25", "within_22.5", "within_30"}
    assert set(tasks["depth"]) >= {"abs_error", "rel_error"}
    assert 0 <= tasks["segmentation"]["miou"] <= 1 and 0 <= tasks["normals"]["mean_angle"] <= 180


def test_incomplete_layout_is_a_clear_error(tmp_path, monkeypatch):
    root = make_nyuv2(tmp_path / "nyuv2")
    (root / "train" / "depth" / "3.npy").unlink()
    with pytest.raises(DataError, match=r"train/depth/3.npy not found"):
        build_data(NYUv2Options(root=str(root), val_size=2))
    root = make_nyuv2(tmp_path / "other")
    shutil.rmtree(root / "val" / "normal")
    with pytest.raises(DataError, match=r"val/normal not found.*MTAN"):
        build_data(NYUv2Options(root=str(root), val_size=2))
    monkeypatch.delenv("TASKLOOM_DATA", raising=False)
    with pytest.raises(DataError, match="no data folder given.*NYU"):
        build_data(NYUv2Options())


def test_bad_sample_names_the_file(tmp_path):
    root = make_nyuv2(tmp_path / "nyuv2")
    np.save(root / "val" / "label" / "0.npy", np.zeros((H, W + 1), np.float32))
    data = build_data(NYUv2Options(root=str(root), val_size=2))
    with pytest.raises(DataError, match="sample 0 of .*val.*do not match"):
        data.test[0]
    np.save(root / "val" / "label" / "1.npy", np.full((H, W), 13, np.float32))
    with pytest.raises(DataError, match=r"val/label/1.npy has labels outside -1..12"):
        data.test[1]
    (root / "val" / "image" / "2.npy").write_bytes(b"not numpy")
    with pytest.raises(DataError, match=r"cannot read .*val/image/2.npy"):
        data.test[2]
