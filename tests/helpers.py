"""Helpers shared by several test files: small real-data bundles, tasks, model surgery,
subprocess environments."""
from __future__ import annotations

import os
import signal

import torch

from taskloom.data import build_data
from taskloom.data.multimnist import MultiMNISTOptions
from taskloom.tasks import ClassificationTask

DEVICE = torch.device(os.environ.get("TASKLOOM_TEST_DEVICE", "cpu"))  # benchmarks/gpu_check.sh: cuda


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


def classification_tasks(k=2, first=3):
    """``k`` classification tasks ``t0, t1, ...`` with ``first``, ``first + 1``, ... classes."""
    return [ClassificationTask(f"t{i}", first + i) for i in range(k)]


def copy_towers(dst, src):
    """Copy the tower stages (the ``TaskParallel`` blocks), the shared trunk and the heads of
    ``src`` into ``dst`` (same layout; mixers are not copied)."""
    from taskloom.models import TaskParallel

    def towers(model):
        return [b for b in model.body if isinstance(b, TaskParallel)]

    for a, b in zip(towers(dst), towers(src), strict=True):
        a.load_state_dict(b.state_dict())
    dst.trunk.load_state_dict(src.trunk.state_dict())
    dst.heads.load_state_dict(src.heads.state_dict())


def assert_same_training_step(reference, other, x, y, tol=1e-5):
    """One forward and backward of the summed task losses through both models (in training
    mode): the same outputs and the same gradient for every parameter."""
    outs = []
    for m in (reference, other):
        m.train()
        out = m(x)
        sum(m.loss_terms(out, y).values()).backward()
        outs.append(out)
    for name in outs[0]:
        torch.testing.assert_close(outs[1][name], outs[0][name], atol=tol, rtol=tol)
    grads = {n: p.grad for n, p in reference.named_parameters()}
    for n, p in other.named_parameters():
        assert (p.grad is None) == (grads[n] is None), n
        if p.grad is not None:
            torch.testing.assert_close(p.grad, grads[n], atol=tol, rtol=tol, msg=n)


def subprocess_env():
    """The environment of a ``python -m taskloom`` subprocess: one thread, unbuffered output, and
    no ``WORLD_SIZE`` inherited from a launcher."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    return env
