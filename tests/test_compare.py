import json
import math
import shutil

import pytest
import yaml

from taskloom import runs, summary
from taskloom.cli import main
from taskloom.errors import ConfigError
from taskloom.grid import Grid, Job, expand, load_grid

TINY = ["train.epochs=1", "data.train_pairs=256", "data.val_pairs=64", "data.test_pairs=64",
        "model.backbone.channels=[4,8]", "model.backbone.hidden=16", "train.progress=false"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = tmp_path_factory.mktemp("cmp")
    grid = root / "grid.yaml"
    grid.write_text(yaml.safe_dump({"base": None, "overrides": TINY, "seeds": 1,
                                    "architectures": ["split@1", "cross_stitch"]}))
    assert main(["compare", str(grid), "--run-root", str(root / "out"), "--jobs", "2"]) == 0
    return grid, root / "out"


def test_grid_runs_baselines_and_writes_results(finished):
    _, out = finished
    rows = summary.read_csv(out / "results.csv")
    assert sorted((r["label"], r["task"] or "") for r in rows) == [
        ("cross_stitch", ""), ("single-task", "left"), ("single-task", "right"), ("split@1", "")]
    md = (out / "results.md").read_text()
    for label in ("single-task", "split@1", "cross_stitch", "Δm", "× single"):
        assert label in md
    assert (out / "metric_vs_params.png").stat().st_size > 1000
    assert (out / "relative_change.png").stat().st_size > 1000
    assert "![relative change" in md and "(relative_change.png)" in md
    assert (out / "per_class_gain_left.png").is_file()


def test_rerun_without_resume_is_refused_and_resume_skips_finished(finished, capsys):
    grid, out = finished
    assert main(["compare", str(grid), "--run-root", str(out)]) == 2
    assert "--resume" in capsys.readouterr().err
    before = {p: p.stat().st_mtime_ns for p in out.rglob("final.json")}
    assert main(["compare", str(grid), "--run-root", str(out), "--resume"]) == 0
    assert "4 runs, 4 already finished, 0 to run" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in out.rglob("final.json")} == before


def test_a_killed_job_is_rerun_from_its_checkpoint(finished, capsys):
    grid, out = finished
    victim = next(out.glob("split@1/*/final.json"))
    victim.unlink()  # as if the job was killed after its last checkpoint
    assert main(["compare", str(grid), "--run-root", str(out), "--resume"]) == 0
    assert "1 to run" in capsys.readouterr().out
    assert victim.is_file()
    assert "--resume" in (victim.parent / "log.txt").read_text()


def test_resume_reports_a_run_whose_stored_config_differs(finished, tmp_path, capsys):
    """A default that changed since a run was trained keeps the run's fingerprint (defaults are
    not hashed): --resume stops and lists it, --changed keep reuses it as it is."""
    grid, out = finished
    root = tmp_path / "out"
    shutil.copytree(out, root)
    stored = next(root.glob("cross_stitch/*/job.yaml"))
    config = yaml.safe_load(stored.read_text())
    config["train"]["lr"] = 0.5  # as if the default learning rate had been 0.5 then
    stored.write_text(yaml.safe_dump(config))
    before = {p: p.stat().st_mtime_ns for p in root.rglob("final.json")}
    assert main(["compare", str(grid), "--run-root", str(root), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "1 run(s) were started with a config that differs" in err
    assert "cross_stitch seed 0" in err and "train.lr 0.5 -> 0.001" in err and "--changed keep" in err
    assert main(["compare", str(grid), "--run-root", str(root), "--resume", "--changed", "keep"]) == 0
    assert "4 already finished, 0 to run" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in root.rglob("final.json")} == before
    assert yaml.safe_load(stored.read_text())["train"]["lr"] == 0.5


def test_failed_job_is_retried_once(tmp_path, monkeypatch):
    job = Job("x", 0, {}, tmp_path / "x")
    calls = []

    def flaky(j, threads, started):
        calls.append(j)
        if len(calls) == 2:
            j.run_dir.mkdir(parents=True, exist_ok=True)
            j.final.write_text("{}")
            return 0
        return -9

    monkeypatch.setattr(runs, "launch", flaky)
    assert runs.run_jobs([job], 1, resume=True, log=lambda *_: None) == []
    assert len(calls) == 2


def test_results_md_is_regenerated_from_the_csv(finished):
    _, out = finished
    original = (out / "results.md").read_text()
    (out / "results.md").unlink()
    assert main(["compare", "--run-root", str(out), "--report-only"]) == 0
    assert (out / "results.md").read_text().split("\n", 1)[1] == original.split("\n", 1)[1]


def test_a_changed_config_is_a_new_run(tmp_path):
    grid = Grid(None, TINY, 1, [{"label": "s", "architecture": "split@1", "overrides": [], "sweep": {}}])
    a = expand(grid, 1, tmp_path)
    grid.overrides = [*TINY, "train.lr=0.002"]
    b = expand(grid, 1, tmp_path)
    assert {j.run_dir for j in a}.isdisjoint({j.run_dir for j in b})
    assert len(a) == 3  # two single-task baselines + split@1


def test_split_all_enumerates_every_split_point(tmp_path):
    grid = Grid(None, TINY, 1, [{"label": "split@all", "architecture": "split@all", "overrides": [], "sweep": {}}])
    labels = [j.label for j in expand(grid, 2, tmp_path)]
    assert [l for l in labels if l.startswith("split")] == [f"split@{k}" for k in range(4) for _ in range(2)]


def test_jobs_on_a_subset_of_tasks_drop_the_other_tasks_settings(tmp_path):
    overrides = [*TINY, "train.loss_weights={left: 1.0, right: 0.5}", "train.select=right/accuracy"]
    grid = Grid(None, overrides, 1, [
        {"label": "pair", "architecture": "split@1", "overrides": ["data.tasks=[left]"], "sweep": {}},
        {"label": "both", "architecture": "split@1", "overrides": [], "sweep": {}}])
    jobs = {(j.label, j.task): j.config["train"] for j in expand(grid, 1, tmp_path)}
    assert jobs[("single-task", "left")]["loss_weights"] == {"left": 1.0}
    assert jobs[("single-task", "left")]["select"] == "mean"  # right/accuracy does not exist there
    assert jobs[("single-task", "right")]["select"] == "right/accuracy"
    assert jobs[("pair", None)]["loss_weights"] == {"left": 1.0}
    assert jobs[("both", None)]["loss_weights"] == {"left": 1.0, "right": 0.5}


def test_bad_grid(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text("architectures: []\n")
    with pytest.raises(ConfigError, match="non-empty list"):
        load_grid(path)
    path.write_text("architecture: [single]\n")
    with pytest.raises(ConfigError, match="unknown grid keys"):
        load_grid(path)


def test_xresnet_rows_of_the_default_grid_train_the_cross_weights_like_every_other_layer(tmp_path):
    """The paper (and configs/multimnist/xresnet_*.yaml): x1 learning rate, train.weight_decay."""
    jobs = [j for j in expand(load_grid(None), 1, tmp_path)
            if j.config["model"]["architecture"]["name"] == "xresnet"]
    assert sorted(j.label for j in jobs) == ["X-conv1x1", "X0", "XI", "Xs"]
    for job in jobs:
        assert job.config["train"]["groups"]["fusion"] == {"lr_mult": 1.0, "weight_decay": None}


@pytest.mark.parametrize("name", ["ablations.yaml"])
def test_xresnet_rows_of_the_record_grids_set_both_fusion_fields(name):
    from pathlib import Path

    from taskloom import config as cfg

    grid = load_grid(Path(__file__).resolve().parents[1] / "configs" / "record" / name)
    entries = [e for e in grid.entries if isinstance(e["architecture"], dict) and e["architecture"]["name"] == "xresnet"]
    assert len(entries) == 4
    for entry in entries:
        assert "train.groups.fusion={lr_mult: 1.0, weight_decay: null}" in entry["overrides"]
        arch = f"model.architecture={json.dumps(entry['architecture'])}"
        fusion = cfg.load(grid.base, [*grid.overrides, arch, *entry["overrides"]]).train.groups.fusion
        assert (fusion.lr_mult, fusion.weight_decay) == (1.0, None)


def test_local_backend_cancels_running_and_queued_jobs(tmp_path, monkeypatch):
    import subprocess
    import sys
    import time

    def sleeper(job, threads, started):
        proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        started(job, proc)
        try:
            return proc.wait()
        finally:
            started(job, None)

    monkeypatch.setattr(runs, "launch", sleeper)
    backend = runs.LocalBackend(workers=1)
    running, queued = (backend.submit(Job(f"j{i}", 0, {}, tmp_path / f"j{i}")) for i in range(2))
    time.sleep(0.5)
    started = time.perf_counter()
    backend.cancel([running, queued])
    finished = dict(backend.wait([running]))
    assert finished[running] != 0 and queued.cancelled()
    assert time.perf_counter() - started < 30
    backend.close()
