"""``taskloom data check``: counts, class counts, malformed entries by name, exit status."""
import json

import pytest

from taskloom.cli import main

from conftest import shared_path
from test_cifar100 import make_cifar100
from test_mtfl import _fixture as mtfl_fixture
from test_nyuv2 import make_nyuv2
from test_utkface import DAMAGED, NO_RACE, _fixture as utk_fixture


def test_mtfl_fixture_report(tmp_path, capsys):
    root, _ = mtfl_fixture(tmp_path)
    assert main(["data", "check", "mtfl", "--data-root", str(root), "-o", "val_size=1"]) == 0
    out = capsys.readouterr().out
    assert "training.txt: 4 images" in out and "testing.txt: 2 images" in out
    assert "split sizes: train 3, val 1, test 2" in out
    assert "pose" in out and "frontal" in out and "errors: 0" in out


def test_mtfl_bad_lines_are_listed_with_file_and_line(tmp_path, capsys):
    root, chosen = mtfl_fixture(tmp_path)
    rel = chosen["training.txt"][1].split()[0].replace("\\", "/")
    (root / rel).write_bytes(b"broken")
    assert main(["data", "check", "mtfl", "--data-root", str(root), "-o", "val_size=1"]) == 1
    out = capsys.readouterr().out
    assert "errors: 1" in out and "training.txt, line 2: image" in out and "cannot be decoded" in out
    assert main(["data", "check", "mtfl", "--data-root", str(root), "-o", "val_size=1", "-o", "skip_malformed=true"]) == 0
    out = capsys.readouterr().out
    assert "malformed, skipped: 1" in out and "errors: 0" in out


def test_utkface_fixture_lists_quirky_names(tmp_path, capsys):
    root, names = utk_fixture(tmp_path)
    assert main(["data", "check", "utkface", "--data-root", str(root), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["files"] == {"image files": len(names), "usable": len(names) - 3}
    assert [s.split(":")[0] for s in report["skipped"]] == sorted(NO_RACE) and report["errors"] == []
    assert [s.split(":")[0] for s in report["kept"]] == sorted(DAMAGED)
    assert sum(report["class_counts"][s]["race"][r] for s in ("train", "val", "test")
               for r in report["class_counts"]["train"]["race"]) == len(names) - 3
    assert main(["data", "check", "utkface", "--data-root", str(root), "-o", "skip_malformed=false"]) == 1
    out = capsys.readouterr().out
    assert "errors: 3" in out and "39_1_20170116174525125.jpg.chip.jpg: lacks the race field" in out


def test_generic_report_for_fixture_datasets(tmp_path, capsys):
    assert main(["data", "check", "cifar100", "--data-root", str(make_cifar100(tmp_path / "c")), "-o", "val_size=8"]) == 0
    out = capsys.readouterr().out
    assert "split sizes: train 32, val 8, test 12" in out and "coarse" in out
    assert main(["data", "check", "nyuv2", "--data-root", str(make_nyuv2(tmp_path / "n")), "-o", "val_size=2"]) == 0
    out = capsys.readouterr().out
    assert "split sizes: train 4, val 2, test 3" in out and "unlabelled" in out


def test_missing_root_and_bad_option(tmp_path, capsys):
    assert main(["data", "check", "mtfl", "--data-root", str(tmp_path / "none")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["data", "check", "mtfl", "--data-root", str(tmp_path), "-o", "val_sise=3"]) == 2
    assert "did you mean 'val_size'" in capsys.readouterr().err


@pytest.mark.slow
def test_real_data_check_numbers(capsys):
    assert main(["data", "check", "mtfl", "--data-root", str(shared_path("mtfl")), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["files"] == {"training.txt": 10000, "testing.txt": 2995} and report["errors"] == []
    assert report["splits"] == {"train": 9000, "val": 1000, "test": 2995}
    assert main(["data", "check", "utkface", "--data-root", str(shared_path("utkface64")), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["files"]["usable"] == 23704 and len(report["skipped"]) == 3 and report["errors"] == []
