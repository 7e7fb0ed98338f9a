"""CIFAR-100 fine + coarse, on a generated fixture in torchvision's on-disk format."""
import pickle

import numpy as np
import pytest
import torch

from taskloom.data import build_data
from taskloom.data.cifar100 import CIFAR100Options
from taskloom.errors import DataError


def make_cifar100(root, train=40, test=12, seed=0):
    """cifar-100-python/{train,test,meta} pickles with bytes keys, as torchvision unpacks them."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for name, n in (("train", train), ("test", test)):
        fine = rng.integers(0, 100, n)
        with open(folder / name, "wb") as f:
            pickle.dump({b"filenames": [f"{i}.png".encode() for i in range(n)], b"batch_label": name.encode(),
                         b"fine_labels": fine.tolist(), b"coarse_labels": (fine // 5).tolist(),
                         b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8)}, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [f"f{i}".encode() for i in range(100)],
                     b"coarse_label_names": [f"c{i}".encode() for i in range(20)]}, f)
    return root


def test_fixture_splits_tasks_and_pixels(tmp_path):
    root = make_cifar100(tmp_path / "cifar100")
    data = build_data(CIFAR100Options(root=str(root), val_size=8))
    assert (len(data.train), len(data.val), len(data.test)) == (32, 8, 12)
    assert [(t.name, t.num_classes) for t in data.tasks] == [("fine", 100), ("coarse", 20)]
    assert data.input_shape == (3, 32, 32)
    with open(root / "cifar-100-python" / "test", "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    x, y = data.test[3]
    assert torch.equal(x, torch.from_numpy(raw[b"data"][3].reshape(3, 32, 32)).float() / 255)
    assert (int(y["fine"]), int(y["coarse"])) == (raw[b"fine_labels"][3], raw[b"coarse_labels"][3])
    again = build_data(CIFAR100Options(root=str(root), val_size=8))
    assert torch.equal(again.val.images, data.val.images)  # deterministic split
    other = build_data(CIFAR100Options(root=str(root), val_size=8, seed=1))
    assert not torch.equal(other.val.fine, data.val.fine)
    xa, _ = data.train[0]
    assert xa.shape == (3, 32, 32)  # augmented: padded random crop + flip, same shape


def test_missing_or_bad_files(tmp_path, monkeypatch):
    with pytest.raises(DataError, match=r"cifar-100-python.*CIFAR-10 and CIFAR-100 datasets.*download=true"):
        (tmp_path / "empty").mkdir()
        build_data(CIFAR100Options(root=str(tmp_path / "empty")))
    root = make_cifar100(tmp_path / "c")
    (root / "cifar-100-python" / "test").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"cifar-100-python/test is not a readable CIFAR pickle"):
        build_data(CIFAR100Options(root=str(root), val_size=8))
    monkeypatch.delenv("TASKLOOM_DATA", raising=False)
    with pytest.raises(DataError, match="no data folder given"):
        build_data(CIFAR100Options())
