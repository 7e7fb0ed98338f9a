#!/usr/bin/env python
"""Write the backward-compatibility fixtures of ``tests/test_compat.py``.

For every config ``tests/data/compat/NAME.yaml`` this trains a tiny model with the code checked
out now and evaluates its selected checkpoint on the test split, both through the CLI::

    taskloom train tests/data/compat/NAME.yaml --run-dir TMP/NAME
    taskloom eval  tests/data/compat/NAME.pt --split test --device cpu --output TMP/NAME.json

and stores next to the config

* ``NAME.pt``: the run's ``checkpoints/best.pt`` (weights, saved config, weighting state);
* ``NAME.json``: the evaluated test metrics, parameter count, the ``state_dict`` keys of the
  model and of the loss weighting, and the model's outputs on the first ``PROBE`` test images
  (a finer check than the metrics of a model this small).

The fixtures were produced on the code *before* the module-layout refactor (``models.py`` split
into ``models`` / ``architectures`` / ``blocks`` / ``experiment``), so the test proves that
checkpoints written before it still load and evaluate to the same numbers. Rerun it only to
replace the fixtures on purpose (a checkpoint format change)::

    python scripts/make_compat_fixtures.py            # every config
    python scripts/make_compat_fixtures.py xresnet    # some of them
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "data" / "compat"
PROBE = 4


def taskloom(*args: str) -> None:
    """Run the CLI in a fresh process, exactly as a user would."""
    subprocess.run([sys.executable, "-m", "taskloom", *args], cwd=REPO, check=True)


def probe_outputs(checkpoint: Path) -> dict[str, list]:
    """Outputs of the checkpoint's model (eval mode) on the first ``PROBE`` test images."""
    from taskloom.experiment import load_run

    model, _, _, data = load_run(checkpoint)
    x = torch.stack([data.test[i][0] for i in range(PROBE)])
    with torch.no_grad():
        return {task: out.tolist() for task, out in model(x).items()}


def make(name: str, tmp: Path) -> None:
    config = FIXTURES / f"{name}.yaml"
    run_dir = tmp / name
    taskloom("train", str(config.relative_to(REPO)), "--run-dir", str(run_dir))
    checkpoint = FIXTURES / f"{name}.pt"
    shutil.copyfile(run_dir / "checkpoints" / "best.pt", checkpoint)
    record = tmp / f"{name}.json"
    taskloom("eval", str(checkpoint.relative_to(REPO)), "--split", "test", "--device", "cpu", "--output", str(record))
    evaluated = json.loads(record.read_text(encoding="utf-8"))
    payload = torch.load(checkpoint, map_location="cpu", weights_only=True)
    fixture = {
        "produced_by": f"python scripts/make_compat_fixtures.py {name}",
        "config": config.name,
        "torch": torch.__version__,
        "split": evaluated["split"],
        "params": evaluated["params"],
        "metrics": evaluated["tasks"],
        "model_keys": list(payload["model"]),
        "weighting_keys": list(payload["weighting"]),
        "outputs": probe_outputs(checkpoint),
    }
    (FIXTURES / f"{name}.json").write_text(json.dumps(fixture, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {checkpoint} ({checkpoint.stat().st_size:,} bytes) and {name}.json")


def main(names: list[str]) -> int:
    names = names or sorted(p.stem for p in FIXTURES.glob("*.yaml"))
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            make(name, Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
