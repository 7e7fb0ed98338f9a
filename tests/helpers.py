"""Small real-data bundles for fast trainer tests."""
from __future__ import annotations

import os
import signal

import torch

from taskloom.data import build_data
from taskloom.data.multimnist import MultiMNISTOptions


def tiny_multimnist(train=256, val=128, test=128, **kw):
    return build_data(MultiMNISTOptions(train_pairs=train, val_pairs=val, test_pairs=test, **kw))


class InterruptAt(torch.utils.data.Dataset):
    """Wraps a dataset and sends SIGINT to this process when item number ``at`` is read
    (simulates Ctrl-C at a chosen point of training)."""

    def __init__(self, base, at):
        self.base, self.at, self.reads = base, at, 0

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        self.reads += 1
        if self.reads == self.at:
            os.kill(os.getpid(), signal.SIGINT)
        return self.base[i]
