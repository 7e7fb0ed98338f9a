import json
import subprocess
import sys

import pytest

from taskloom.cli import main

TINY = ["data.train_pairs=256", "data.val_pairs=64", "data.test_pairs=64", "model.backbone.channels=[4,8]",
        "model.backbone.hidden=16", "--epochs", "1"]


def test_train_then_eval(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--run-dir", str(run), "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert "left" in out and "accuracy" in out
    final = json.loads((run / "final.json").read_text())
    assert final["config"] == str(run / "config.yaml") and final["params"] > 0
    assert "seed: 3" in (run / "config.yaml").read_text()
    assert main(["eval", str(run / "checkpoints" / "best.pt")]) == 0
    evaluated = json.loads((run / "eval_test.json").read_text())
    assert evaluated["tasks"] == final["tasks"]
    assert main(["eval", str(run / "checkpoints" / "best.pt"), "--split", "val"]) == 0


@pytest.mark.parametrize("args, message", [
    (["train", "train.epochz=1"], "train.epochz: unknown key; did you mean 'epochs'?"),
    (["train", "train.lr=abc"], "train.lr: expected a number, got 'abc'"),
    (["train", "data.source=idx", "--data-root", "/nonexistent/mnist"], "/nonexistent/mnist does not exist"),
    (["train", "no_such_config.yaml"], "no_such_config.yaml: config file not found"),
    (["eval", "/nonexistent/best.pt"], "checkpoint not found"),
])
def test_bad_input_is_one_clear_message_and_exit_2(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert err.count("\n") == 1


def test_truncated_idx_from_the_command_line(tmp_path):
    # A real subprocess: exit status and stderr as a user sees them.
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(bytes([0, 0, 8, 3]) + (10).to_bytes(4, "big") + b"\x00" * 20)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(bytes([0, 0, 8, 1]) + (10).to_bytes(4, "big") + b"\x00" * 10)
    proc = subprocess.run([sys.executable, "-m", "taskloom", "train", "data.source=idx", "--data-root", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "t10k-images-idx3-ubyte: truncated IDX header" in proc.stderr or "IDX file is truncated" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_help_explains_every_option(capsys):
    for argv in (["--help"], ["train", "--help"], ["eval", "--help"]):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--epochs", "--seed", "--data-root", "--run-dir", "--device", "--resume", "--split"):
        assert flag in out


def test_overrides_may_follow_flags(tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--epochs", "1", *TINY[:-2], "--run-dir", str(run), "train.lr=0.002"]) == 0
    assert "lr: 0.002" in (run / "config.yaml").read_text()
    with pytest.raises(SystemExit):
        main(["train", "--run-dir", str(run), "--bogus-flag"])


def test_eval_rebuilds_a_model_with_a_learned_regulariser(tmp_path):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--run-dir", str(run), "model.regularizer={kind: affine_exp, weight: 0.1}"]) == 0
    assert main(["eval", str(run / "checkpoints" / "best.pt")]) == 0
    assert json.loads((run / "eval_test.json").read_text())["tasks"] == json.loads((run / "final.json").read_text())["tasks"]
