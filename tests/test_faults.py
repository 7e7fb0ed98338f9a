"""Faults: kills at any moment, stop signals, and fuzzed inputs never lose or corrupt a run."""
import random
import signal
import subprocess
import sys
import time

import numpy as np
import torch
import yaml

from taskloom import checkpoint
from taskloom import config as cfg
from taskloom.data.multimnist import read_idx
from taskloom.errors import CheckpointError, ConfigError, DataError

from helpers import subprocess_env

REPO_CONFIG = cfg.to_dict(cfg.load())
# The default LeNet (1.9M parameters: ~22 MB checkpoints with Adam state, fsynced) on a tiny
# split, so a large share of the wall time is spent writing checkpoints.
KILL_ARGS = ["data.train_pairs=128", "data.val_pairs=32", "data.test_pairs=32", "train.epochs=60",
             "train.progress=false"]


def test_sigkill_at_random_moments_never_corrupts_the_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    last = run_dir / "checkpoints" / "last.pt"
    rng = random.Random(0)
    epochs_seen = []
    for attempt in range(3):
        cmd = [sys.executable, "-m", "taskloom", "train", *KILL_ARGS, "--run-dir", str(run_dir)]
        if attempt:
            cmd.append("--resume")
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=subprocess_env())
        for line in proc.stdout:  # wait until training runs, then kill at a random moment
            if line.startswith("epoch "):
                break
        time.sleep(rng.uniform(0.2, 1.5))
        proc.kill()
        proc.wait(timeout=60)
        payload = checkpoint.load(last)  # must always load: the old or the new file, never a torn one
        epochs_seen.append(payload["state"]["epoch"])
        leftovers = [p.name for p in last.parent.iterdir() if p.name not in ("last.pt", "best.pt")]
        assert all(name.startswith(".last.pt.tmp") or name.startswith(".best.pt.tmp") for name in leftovers)
    assert epochs_seen == sorted(epochs_seen) and epochs_seen[-1] > epochs_seen[0]


def test_sigterm_saves_and_says_how_to_resume(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "taskloom", "train", *KILL_ARGS, "--run-dir", str(run_dir)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env())
    for line in proc.stdout:
        if line.startswith("epoch 2/"):
            proc.send_signal(signal.SIGTERM)
            break
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert "interrupted at epoch" in err and f"--run-dir {run_dir} --resume" in err and "Traceback" not in err
    assert checkpoint.load(run_dir / "checkpoints" / "last.pt")["state"]["epoch"] >= 2


def _mutate(text: str, rng: random.Random) -> str:
    choice = rng.randrange(5)
    if choice == 0:  # truncate
        return text[: rng.randrange(len(text))]
    if choice == 1:  # delete a span
        i = rng.randrange(len(text))
        return text[:i] + text[i + rng.randrange(1, 20):]
    if choice == 2:  # insert junk
        i = rng.randrange(len(text))
        return text[:i] + rng.choice([":", "- ", "{", "]", "\t", "'", "&a", "*a", "!!python/object:os.system ", "\x00", "é"]) + text[i:]
    if choice == 3:  # replace a value by something of another type
        data = yaml.safe_load(text)
        section = rng.choice(["train", "data", "model"])
        key = rng.choice(list(data[section]))
        data[section][key] = rng.choice([None, -1, 1.5, "x", [], {}, True, [1, "a"], {"name": "nope"}])
        return yaml.safe_dump(data)
    lines = text.splitlines()  # shuffle indentation
    i = rng.randrange(len(lines))
    lines[i] = " " * rng.randrange(6) + lines[i].lstrip()
    return "\n".join(lines)


def test_fuzzed_configs_give_config_errors_only(tmp_path):
    text = yaml.safe_dump(REPO_CONFIG)
    rng = random.Random(1)
    outcomes = {"ok": 0, "error": 0}
    for i in range(300):
        path = tmp_path / f"c{i}.yaml"
        path.write_text(_mutate(text, rng), encoding="utf-8", errors="surrogateescape")
        try:
            cfg.load(path)
            outcomes["ok"] += 1
        except ConfigError as exc:
            assert str(path) in str(exc)
            outcomes["error"] += 1
    assert outcomes["error"] > 100 and outcomes["ok"] > 10


def test_fuzzed_configs_through_the_cli(tmp_path):
    text = yaml.safe_dump(REPO_CONFIG)
    rng = random.Random(2)
    for i in range(2):
        path = tmp_path / f"c{i}.yaml"
        path.write_text(text[: rng.randrange(20, len(text) // 2)])
        proc = subprocess.run([sys.executable, "-m", "taskloom", "train", str(path), "--epochs", "1",
                               "data.train_pairs=64", "data.val_pairs=16", "data.test_pairs=16",
                               "--run-dir", str(tmp_path / f"r{i}")], capture_output=True, text=True,
                              timeout=120, env=subprocess_env())
        assert "Traceback" not in proc.stderr, proc.stderr
        assert proc.returncode in (0, 2)
        if proc.returncode == 2:
            assert proc.stderr.startswith("taskloom: error: ")


def test_fuzzed_idx_files(tmp_path):
    rng = np.random.default_rng(3)
    good = bytes([0, 0, 8, 3]) + b"".join(int(v).to_bytes(4, "big") for v in (4, 28, 28)) + bytes(4 * 784)
    for i in range(200):
        raw = bytearray(good[: rng.integers(0, len(good) + 1)])
        for _ in range(rng.integers(0, 4)):
            if raw:
                raw[rng.integers(0, len(raw))] = int(rng.integers(0, 256))
        path = tmp_path / f"f{i}-images-idx3-ubyte"
        path.write_bytes(bytes(raw))
        try:
            array = read_idx(path)
        except DataError as exc:
            assert str(path) in str(exc)
        else:
            assert array.size == len(raw) - 4 - 4 * raw[3]


def test_fuzzed_checkpoints(tmp_path):
    path = tmp_path / "c.pt"
    checkpoint.save({"model": {"w": torch.randn(64)}, "state": {"epoch": 1}}, path)
    good = path.read_bytes()
    rng = np.random.default_rng(4)
    for i in range(60):
        raw = bytearray(good[: rng.integers(0, len(good) + 1)] if i % 2 else good)
        for _ in range(rng.integers(1, 6)):
            raw[rng.integers(0, len(raw))] ^= 0xFF
        bad = tmp_path / f"b{i}.pt"
        bad.write_bytes(bytes(raw))
        try:
            checkpoint.load(bad)
        except CheckpointError as exc:
            assert str(bad) in str(exc)


def test_fuzzed_mtfl_annotations_and_images(tmp_path):
    """Random damage to real MTFL annotation lines and JPEGs: a DataError naming the file (and
    line), a counted skip, or a clean load -- never another exception."""
    import warnings

    from taskloom.data import build_data
    from taskloom.data.mtfl import MTFLOptions

    from test_mtfl import _fixture

    root, chosen = _fixture(tmp_path, train_lines=4, test_lines=2)
    pristine = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    rng = np.random.default_rng(5)
    files = sorted(pristine)
    outcomes = {"error": 0, "ok": 0}
    for i in range(40):
        for p, raw in pristine.items():
            p.write_bytes(raw)
        target = files[rng.integers(len(files))]
        raw = bytearray(pristine[target])
        if rng.random() < 0.5:
            raw = raw[: rng.integers(0, len(raw) + 1)]
        for _ in range(rng.integers(1, 8)):
            if raw:
                raw[rng.integers(0, len(raw))] = int(rng.integers(0, 256))
        target.write_bytes(bytes(raw))
        for skip in (False, True):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    build_data(MTFLOptions(root=str(root), val_size=1, skip_malformed=skip))
                outcomes["ok"] += 1
            except DataError as exc:
                assert target.name in str(exc) or "training.txt" in str(exc) or "testing.txt" in str(exc), str(exc)
                outcomes["error"] += 1
    assert outcomes["error"] > 0 and outcomes["ok"] > 0


# --------------------------------------------------------------------------- fuzzed command lines (issue 14)

_KEYS = ["seed", "data.root", "data.name", "data.train_pairs", "model.architecture", "model.architecture.name",
         "model.backbone", "model.backbone.channels", "model.backbone.weights", "train.lr", "train.epochs",
         "train.schedule", "train.groups.fusion.lr_mult", "train.loss_weights.left", "init.towers.left", "x", ""]
_VALUES = ["{name: nddr", "[4,", "'a", '"b', "*.jpg", "@w.pt", "%x", "{}", "[]", "null", "~", "-1", "0", "1e309",
           "nan", "split@2", "split@x", "nddr", "{name: split, at: 9}", "!!python/object:os.system", "&a", "a: b",
           "2001-02-30", "0x1F", "yes", "- 1", "\t", " ", "=", "é", "\x00"]


def _fuzzed_argv(rng: random.Random) -> list[str]:
    def override() -> str:
        if rng.random() < 0.2:
            return "".join(rng.choice("{}[]'\"*&!%@:=., #\tab1") for _ in range(rng.randrange(1, 12)))
        return f"{rng.choice(_KEYS)}={rng.choice(_VALUES)}"

    command = rng.choice(["train", "train", "train", "eval", "inspect", "data", "compare", "bogus", ""])
    flags = {"train": ["--epochs", "--seed", "--run-dir", "--device", "--resume", "--force", "--bogus"],
             "eval": ["--split", "--output", "--device", "--data-root"],
             "inspect": ["--plot", "--data-root"], "data": ["check"], "compare": ["--jobs", "--seeds"],
             }.get(command, ["--version-x", "-x"])
    argv = [command] if command else []
    if command in ("eval", "inspect"):
        argv.append(rng.choice(["missing.pt", "missing.yaml", "", "{"]))
    for _ in range(rng.randrange(0, 5)):
        if rng.random() < 0.5:
            argv.append(override())
        else:
            argv.append(rng.choice(flags))
            if rng.random() < 0.7:
                argv.append(rng.choice(["1", "-3", "x", "cpu", "val", "mtfl", "", *_VALUES[:6]]))
    if command == "compare":
        argv.append("--report-only")  # never trains a grid
    return argv


def test_fuzzed_command_lines_give_one_line_errors(tmp_path, monkeypatch, capsys):
    """No traceback for any command line: a failure is exactly one ``taskloom: error:`` line."""
    from taskloom.cli import main

    class Reached(Exception):
        pass

    def no_training(*args, **kwargs):
        raise Reached

    monkeypatch.setattr("taskloom.experiment.run", no_training)
    monkeypatch.chdir(tmp_path)
    rng = random.Random(14)
    outcomes = {"ok": 0, "error": 0}
    for _ in range(300):
        argv = _fuzzed_argv(rng)
        try:
            status = main(argv)
        except Reached:
            outcomes["ok"] += 1
            capsys.readouterr()
            continue
        except SystemExit as exc:  # argparse: usage errors, --help, --version
            status = exc.code
        err = capsys.readouterr().err
        assert "Traceback" not in err, (argv, err)
        if status not in (0, None):
            errors = [line for line in err.splitlines() if line.startswith("taskloom: error:")]
            others = [line for line in err.splitlines()
                      if line.strip() and not line.startswith(("taskloom: error:", "taskloom: warning:", "  ", "see:"))]
            assert len(errors) == 1 and not others, (argv, err)
            outcomes["error"] += 1
    assert outcomes["error"] > 100 and outcomes["ok"] > 5, outcomes
