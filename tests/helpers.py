"""Small real-data bundles for fast trainer tests."""
from __future__ import annotations

from taskloom.data import build_data
from taskloom.data.multimnist import MultiMNISTOptions


def tiny_multimnist(train=256, val=128, test=128, **kw):
    return build_data(MultiMNISTOptions(train_pairs=train, val_pairs=val, test_pairs=test, **kw))
