"""Checkpoints written by earlier code still load and evaluate to the same numbers.

The fixtures in ``tests/data/compat`` (``NAME.yaml`` config, ``NAME.pt`` checkpoint, ``NAME.json``
record) were produced by ``python scripts/make_compat_fixtures.py`` on the code before the
module-layout refactor; see that script. Each checkpoint is evaluated through the path
``taskloom eval`` takes (the CLI in-process: ``load_run`` then ``evaluate``), and compared with
the recorded metrics, ``state_dict`` keys and outputs on a few test images.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from taskloom import checkpoint, cli
from taskloom.experiment import load_run
from taskloom.weighting import build_weighting

FIXTURES = Path(__file__).resolve().parent / "data" / "compat"
NAMES = sorted(p.stem for p in FIXTURES.glob("*.json"))


def _record(name: str) -> dict:
    return json.loads((FIXTURES / f"{name}.json").read_text(encoding="utf-8"))


def _assert_close(got, want, where: str) -> None:
    if isinstance(want, dict):
        assert set(got) == set(want), where
        for key in want:
            _assert_close(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, list):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            _assert_close(g, w, f"{where}[{i}]")
    elif isinstance(want, float):
        assert got == pytest.approx(want, rel=1e-6, abs=1e-6), where
    else:
        assert got == want, where


def test_every_fixture_has_its_config_and_checkpoint():
    assert NAMES, "no fixtures in tests/data/compat"
    for name in NAMES:
        assert (FIXTURES / f"{name}.yaml").is_file() and (FIXTURES / f"{name}.pt").is_file(), name


@pytest.mark.parametrize("name", NAMES)
def test_eval_reproduces_the_recorded_metrics(name, tmp_path, capsys):
    record = _record(name)
    out = tmp_path / "eval.json"
    status = cli.main(["eval", str(FIXTURES / f"{name}.pt"), "--split", record["split"], "--device", "cpu",
                       "--output", str(out)])
    assert status == 0, capsys.readouterr().err
    evaluated = json.loads(out.read_text(encoding="utf-8"))
    assert evaluated["params"] == record["params"]
    _assert_close(evaluated["tasks"], record["metrics"], name)


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_keys_and_outputs_are_unchanged(name):
    record = _record(name)
    model, config, payload, data = load_run(FIXTURES / f"{name}.pt")
    assert list(model.state_dict()) == record["model_keys"]
    weighting = build_weighting(config.train.weighting, [t.name for t in data.tasks], config.train.loss_weights)
    assert list(weighting.state_dict()) == record["weighting_keys"]
    weighting.load_state_dict(payload["weighting"])  # strict: the saved weighting state still fits
    x = torch.stack([data.test[i][0] for i in range(len(next(iter(record["outputs"].values()))))])
    with torch.no_grad():
        outputs = {task: out.tolist() for task, out in model(x).items()}
    _assert_close(outputs, record["outputs"], f"{name} outputs")


def test_fixtures_are_plain_checkpoints():
    for name in NAMES:
        payload = checkpoint.load(FIXTURES / f"{name}.pt")  # weights_only: no pickled code
        assert payload["config"]["model"]["architecture"]["name"] in name or name == "sluice_beta"
