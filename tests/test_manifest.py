"""The manifest dataset (folder of images + CSV / JSON lines), and the guide's walk-through."""
from __future__ import annotations

import json
import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from taskloom.data import build_data
from taskloom.data.manifest import ManifestOptions, TargetSpec
from taskloom.errors import DataError

REPO = Path(__file__).resolve().parents[1]
GUIDE = REPO / "docs" / "guide" / "custom-data.md"


def guide_blocks(text: str) -> list[tuple[str, str]]:
    """``(language, body)`` of every fenced code block of a markdown page."""
    return [(m.group(1), m.group(2)) for m in re.finditer(r"```(\w*)\n(.*?)```", text, re.S)]


def _block(blocks, lang: str, first_line: str | None = None, contains: str | None = None) -> str:
    for kind, body in blocks:
        if kind == lang and (first_line is None or body.splitlines()[0] == first_line) \
                and (contains is None or contains in body):
            return body
    raise AssertionError(f"no {lang} block starting with {first_line!r} in {GUIDE}")


def test_guide_walkthrough(tmp_path):
    """Exactly the steps of docs/guide/custom-data.md: make images, write the config, train."""
    blocks = guide_blocks(GUIDE.read_text(encoding="utf-8"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    # Step 1: the toy-data script, as printed.
    (tmp_path / "make_toy_data.py").write_text(_block(blocks, "python", "# make_toy_data.py"))
    subprocess.run([sys.executable, "make_toy_data.py"], cwd=tmp_path, check=True, env=env, timeout=120)
    # Step 2: the manifest it wrote starts with the lines the guide shows.
    shown = _block(blocks, "text", "path,shape,radius").splitlines()
    written = (tmp_path / "mydata" / "manifest.csv").read_text().splitlines()
    assert written[: len(shown)] == shown
    # Step 3: the config, as printed.
    config = _block(blocks, "yaml", "# mydata/config.yaml")
    (tmp_path / "mydata" / "config.yaml").write_text(config)
    # Step 4: the commands, as printed (``taskloom`` = this interpreter's ``-m taskloom``).
    commands = _block(blocks, "bash", contains="taskloom train mydata/config.yaml").splitlines()
    for command in commands:
        argv = shlex.split(command)
        if argv[0] == "taskloom":
            argv = [sys.executable, "-m", "taskloom", *argv[1:]]
        done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
    final = json.loads((tmp_path / "runs" / "mydata" / "final.json").read_text())
    assert set(final["tasks"]) == {"shape", "radius"}
    assert final["tasks"]["shape"]["count"] > 0
    # Every 4th image has no radius: the radius task is evaluated on fewer samples.
    assert 0 < final["tasks"]["radius"]["count"] < final["tasks"]["shape"]["count"]
    assert math.isfinite(final["tasks"]["radius"]["mae"])


def _images(root: Path, n: int, mode: str = "RGB", size: int = 12) -> list[str]:
    from PIL import Image

    (root / "img").mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        name = f"img/{i}.png"
        Image.new(mode, (size + i % 3, size), (i * 7 % 255,) * (3 if mode == "RGB" else 1)
                  if mode == "RGB" else i * 7 % 255).save(root / name)
        names.append(name)
    return names


def _options(root: Path, manifest: str = "m.csv", **kw) -> ManifestOptions:
    targets = kw.pop("targets", {"kind": TargetSpec(kind="classification", classes=["a", "b"]),
                                 "value": TargetSpec(kind="regression")})
    return ManifestOptions(root=str(root), manifest=manifest, targets=targets, size=8, **kw)


def test_csv_with_split_column_and_missing_cells(tmp_path):
    names = _images(tmp_path, 6)
    rows = ["path,kind,value,split"] + [f"{n},{'ab'[i % 2]},{'' if i == 1 else i / 10},{['train', 'train', 'train', 'train', 'val', 'test'][i]}"
                                        for i, n in enumerate(names)]
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    data = build_data(_options(tmp_path))
    assert (len(data.train), len(data.val), len(data.test)) == (4, 1, 1)
    assert data.input_shape == (3, 8, 8)
    x, y = data.train[1]
    assert x.shape == (3, 8, 8) and 0 <= x.min() and x.max() <= 1
    assert y["kind"].item() == 1 and math.isnan(y["value"].item())
    assert data.train[2][1]["value"].item() == pytest.approx(0.2)


def test_jsonl_grey_landmarks_binary_and_hash_split(tmp_path):
    names = _images(tmp_path, 40, mode="L")
    lines = [json.dumps({"path": n, "pts": [0.1, 0.2, 0.3, 0.4], "flag": i % 2 if i % 5 else None})
             for i, n in enumerate(names)]
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    options = _options(tmp_path, "m.jsonl", channels=1, val_fraction=0.25, test_fraction=0.25,
                       targets={"pts": TargetSpec(kind="landmarks", args={"num_landmarks": 2}),
                                "flag": TargetSpec(kind="binary")})
    data = build_data(options)
    assert len(data.train) + len(data.val) + len(data.test) == 40 and len(data.val) and len(data.test)
    assert data.input_shape == (1, 8, 8)
    _, y = data.train[0]
    assert y["pts"].shape == (2, 2) and y["flag"].dtype.is_floating_point
    flags = torch.stack([data.train[i][1]["flag"] for i in range(len(data.train))])
    assert (flags == -1).any() and (flags >= 0).any()


@pytest.mark.parametrize("row,message", [
    ("img/0.png,c,0.1", r"m\.csv, line 3: kind: 'c' is not one of \['a', 'b'\]"),
    ("img/0.png,a,abc", r"m\.csv, line 3: value: 'abc' is not a number"),
    ("img/nope.png,a,0.1", r"m\.csv, line 3: image .*nope\.png not found"),
    ("img/bad.png,a,0.1", r"m\.csv, line 3: image .*bad\.png cannot be decoded"),
    ("img/0.png,5,0.1", r"m\.csv, line 3: kind: label 5 outside 0\.\.1"),
    ("img/0.png,a,0.1,extra", r"m\.csv, line 3: more cells"),
])
def test_errors_name_the_manifest_line(tmp_path, row, message):
    _images(tmp_path, 2)
    (tmp_path / "img" / "bad.png").write_bytes(b"not an image")
    (tmp_path / "m.csv").write_text(f"path,kind,value\nimg/1.png,a,0.5\n{row}\n")
    with pytest.raises(DataError, match=message):
        build_data(_options(tmp_path))


def test_config_errors(tmp_path):
    _images(tmp_path, 2)
    (tmp_path / "m.csv").write_text("path,kind\nimg/0.png,a\n")
    with pytest.raises(DataError, match=r"column\(s\) \['value'\] not found"):
        build_data(_options(tmp_path))
    with pytest.raises(DataError, match="unknown task kind 'clasification'"):
        build_data(_options(tmp_path, targets={"kind": TargetSpec(kind="clasification")}))
    with pytest.raises(DataError, match="needs 'classes' or 'num_classes'"):
        build_data(_options(tmp_path, targets={"kind": TargetSpec(kind="classification")}))
    (tmp_path / "m.csv").write_text("path,kind\nimg/0.png,0\n")
    with pytest.raises(DataError, match=r"no images in split\(s\)"):
        build_data(_options(tmp_path, targets={"kind": TargetSpec(kind="classification", num_classes=2)}))
    with pytest.raises(DataError, match="not found"):
        build_data(_options(tmp_path, "missing.csv"))


def test_yaml_targets_are_validated(tmp_path):
    from taskloom.config import load
    from taskloom.errors import ConfigError

    path = tmp_path / "c.yaml"
    path.write_text("data:\n  name: manifest\n  targets:\n    a: {kind: classification, clases: [x, y]}\n")
    with pytest.raises(ConfigError, match=r"line 4: data\.targets\.a\.clases: unknown key; did you mean 'classes'"):
        load(path)
