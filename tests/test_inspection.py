"""`taskloom inspect`: counts by kind, per tower and against the single-task networks; mixing
summaries; readable PNGs."""
import re

import pytest

from taskloom.cli import main

TINY = {"train_pairs": 64, "val_pairs": 32, "test_pairs": 32}
LENET = {"name": "lenet", "channels": [4, 6], "hidden": 8}
SMALL = {"name": "resnet_small", "channels": [4, 8], "blocks": [1, 3], "stem_channels": 4}


def _checkpoint(tmp_path, arch, backbone):
    """A checkpoint as the trainer writes it (config + weights), without training."""
    from taskloom import checkpoint, config as cfg
    from taskloom.architectures import build_model
    from taskloom.tasks import ClassificationTask

    config = cfg.from_dict({"data": {"name": "multimnist", **TINY}, "model": {"backbone": backbone, "architecture": arch}})
    tasks = [ClassificationTask("left", 10), ClassificationTask("right", 10)]  # MultiMNIST's tasks, 1x36x36
    model = build_model(config.model.architecture, config.model.backbone, tasks, (1, 36, 36))
    path = tmp_path / "best.pt"
    checkpoint.save({"config": cfg.to_dict(config), "model": model.state_dict(), "tasks": ["left", "right"],
                     "state": {"epoch": 0}}, path)
    return path


def test_train_then_inspect_nddr(tmp_path, capsys):
    run = tmp_path / "nddr"
    overrides = [f"data.{k}={v}" for k, v in TINY.items()] + ["model.backbone.channels=[4,6]", "model.backbone.hidden=8"]
    assert main(["train", *overrides, "model.architecture=nddr", "--epochs", "1", "--run-dir", str(run)]) == 0
    capsys.readouterr()
    plots = tmp_path / "plots"
    assert main(["inspect", str(run / "checkpoints" / "best.pt"), "--plot", str(plots)]) == 0
    out = capsys.readouterr().out
    # NDDR adds sum over stages of K*(K*C)*C conv weights + 2*C*K BN parameters (C = 4, 6, 8)
    fusion = sum(2 * (2 * c) * c + 2 * 2 * c for c in (4, 6, 8))
    assert re.search(rf"mixers \(fusion\)\s+{fusion:,}\s", out)
    assert "against the 2 single-task networks" in out and "more parameters" in out
    assert "to left" in out and "from right" in out  # K x K block norms per unit
    assert sorted(p.name for p in plots.iterdir()) == ["mixer_blocks.png"]


def test_inspect_numbers_and_xresnet_plots(tmp_path, capsys):
    from taskloom.architectures import SingleOptions, build_model
    from taskloom.experiment import load_run
    from taskloom.inspection import counts

    ckpt = _checkpoint(tmp_path, {"name": "xresnet", "cross": "scale"}, SMALL)
    model, config, payload, data = load_run(ckpt)
    numbers = counts(model, data.tasks, data.input_shape, config.model.backbone)
    assert numbers["kinds"]["fusion"] == 2 * 2 * 8  # 2 cross-residual blocks x K(K-1) connections x C
    assert numbers["total"] == sum(p.numel() for p in model.parameters())
    assert (sum(numbers["towers"].values()) + sum(numbers["heads"].values()) + numbers["trunk"]
            + numbers["kinds"]["fusion"]) == numbers["total"]
    single = build_model(SingleOptions(), config.model.backbone, data.tasks, data.input_shape)
    assert sum(numbers["single"].values()) == sum(p.numel() for p in single.parameters())
    assert main(["inspect", str(ckpt), "--plot", str(tmp_path / "p")]) == 0
    out = capsys.readouterr().out
    assert "left->right mean" in out and "fewer parameters" in out
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["cross_residual.png", "mixer_blocks.png"]


@pytest.mark.parametrize("arch, files", [
    ({"name": "cross_stitch"}, ["cross_stitch.png", "mixer_blocks.png"]),
    ({"name": "sluice", "beta": True}, ["mixer_blocks.png", "sluice.png"]),
])
def test_inspect_plots_per_mixer_kind(tmp_path, capsys, arch, files):
    ckpt = _checkpoint(tmp_path, arch, LENET)
    assert main(["inspect", str(ckpt), "--plot", str(tmp_path / "p")]) == 0
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == files
    out = capsys.readouterr().out
    assert "learned mixing weights" in out
    if arch["name"] == "sluice":
        assert "beta layer mixing" in out


def test_inspect_missing_checkpoint_is_one_clear_error(capsys):
    assert main(["inspect", "/nonexistent/best.pt"]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
