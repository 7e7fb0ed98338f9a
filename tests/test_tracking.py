"""TensorBoard logging (train.tensorboard: true)."""
from __future__ import annotations

import builtins

import pytest

from taskloom.architectures import CrossStitchOptions, build_model
from taskloom.backbones import LeNetOptions
from taskloom.config import TrainConfig
from taskloom.data import build_data
from taskloom.errors import ConfigError
from taskloom.train import fit
from tests.test_partial_labels import toy_manifest


def test_event_files_hold_scalars_lrs_and_mixer_histograms(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install 'taskloom[tracking]')")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = build_data(toy_manifest(tmp_path / "data"))
    model = build_model(CrossStitchOptions(), LeNetOptions(), data.tasks, data.input_shape)
    fit(model, data, TrainConfig(epochs=2, threads=1, progress=False, tensorboard=True), tmp_path,
        batch_size=16, log=lambda *a: None)
    files = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert files
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"histograms": 0, "scalars": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"lr/backbone", "lr/fusion", "lr/head", "train_loss/left", "val_loss/level",
            "val/left/accuracy", "val/level/count"} <= scalars
    assert [e.step for e in events.Scalars("train_loss/left")] == [1, 2]
    assert any(tag.startswith("mixers/") for tag in events.Tags()["histograms"])


def test_missing_tensorboard_is_a_clear_error(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard") or name.startswith("tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    from taskloom.tracking import open_writer

    with pytest.raises(ConfigError, match=r"train.tensorboard.*pip install tensorboard"):
        open_writer(tmp_path)
