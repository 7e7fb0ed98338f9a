import json
import math

import pytest
import yaml

from taskloom import compare
from taskloom.cli import main
from taskloom.errors import ConfigError

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
    rows = compare.read_csv(out / "results.csv")
    assert sorted((r["label"], r["task"] or "") for r in rows) == [
        ("cross_stitch", ""), ("single-task", "left"), ("single-task", "right"), ("split@1", "")]
    md = (out / "results.md").read_text()
    for label in ("single-task", "split@1", "cross_stitch", "Δm", "× single"):
        assert label in md
    assert (out / "metric_vs_params.png").stat().st_size > 1000
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


def test_failed_job_is_retried_once(tmp_path, monkeypatch):
    job = compare.Job("x", 0, {}, tmp_path / "x")
    calls = []

    def flaky(j, threads):
        calls.append(j)
        if len(calls) == 2:
            j.run_dir.mkdir(parents=True, exist_ok=True)
            j.final.write_text("{}")
            return 0
        return -9

    monkeypatch.setattr(compare, "_launch", flaky)
    assert compare.run_jobs([job], 1, resume=True, log=lambda *_: None) == []
    assert len(calls) == 2


def test_results_md_is_regenerated_from_the_csv(finished):
    _, out = finished
    original = (out / "results.md").read_text()
    (out / "results.md").unlink()
    assert main(["compare", "--run-root", str(out), "--report-only"]) == 0
    assert (out / "results.md").read_text().split("\n", 1)[1] == original.split("\n", 1)[1]


def test_a_changed_config_is_a_new_run(tmp_path):
    grid = compare.Grid(None, TINY, 1, [{"label": "s", "architecture": "split@1", "overrides": [], "sweep": {}}])
    a = compare.expand(grid, 1, tmp_path)
    grid.overrides = [*TINY, "train.lr=0.002"]
    b = compare.expand(grid, 1, tmp_path)
    assert {j.run_dir for j in a}.isdisjoint({j.run_dir for j in b})
    assert len(a) == 3  # two single-task baselines + split@1


def test_split_all_enumerates_every_split_point(tmp_path):
    grid = compare.Grid(None, TINY, 1, [{"label": "split@all", "architecture": "split@all", "overrides": [], "sweep": {}}])
    labels = [j.label for j in compare.expand(grid, 2, tmp_path)]
    assert [l for l in labels if l.startswith("split")] == [f"split@{k}" for k in range(4) for _ in range(2)]


def test_delta_m_formula():
    info = {"a": {"primary": "accuracy", "higher_is_better": {"accuracy": True}},
            "b": {"primary": "mae", "higher_is_better": {"mae": False}}}
    single = {"a": {"accuracy": 0.8}, "b": {"mae": 10.0}}
    row = {"a/accuracy": 0.88, "b/mae": 11.0}  # +10% and -10% -> 0
    assert compare.delta_m(row, info, single) == pytest.approx(0.0)
    row = {"a/accuracy": 0.88, "b/mae": 9.0}
    assert compare.delta_m(row, info, single) == pytest.approx(10.0)
    assert math.isnan(compare.delta_m({"a/accuracy": 0.9}, info, single))
    # A run on a subset of the tasks (its own task_info) is scored on those tasks only.
    assert compare.delta_m({"a/accuracy": 0.88, "task_info": {"a": info["a"]}}, info, single) == pytest.approx(10.0)


def test_jobs_on_a_subset_of_tasks_drop_the_other_tasks_settings(tmp_path):
    overrides = [*TINY, "train.loss_weights={left: 1.0, right: 0.5}", "train.select=right/accuracy"]
    grid = compare.Grid(None, overrides, 1, [
        {"label": "pair", "architecture": "split@1", "overrides": ["data.tasks=[left]"], "sweep": {}},
        {"label": "both", "architecture": "split@1", "overrides": [], "sweep": {}}])
    jobs = {(j.label, j.task): j.config["train"] for j in compare.expand(grid, 1, tmp_path)}
    assert jobs[("single-task", "left")]["loss_weights"] == {"left": 1.0}
    assert jobs[("single-task", "left")]["select"] == "mean"  # right/accuracy does not exist there
    assert jobs[("single-task", "right")]["select"] == "right/accuracy"
    assert jobs[("pair", None)]["loss_weights"] == {"left": 1.0}
    assert jobs[("both", None)]["loss_weights"] == {"left": 1.0, "right": 0.5}


def test_bad_grid(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text("architectures: []\n")
    with pytest.raises(ConfigError, match="non-empty list"):
        compare.load_grid(path)
    path.write_text("architecture: [single]\n")
    with pytest.raises(ConfigError, match="unknown grid keys"):
        compare.load_grid(path)


def test_parameter_ratio_of_a_run_on_a_subset_of_tasks_uses_its_own_tasks():
    info = {t: {"kind": "classification", "primary": "accuracy", "higher_is_better": {"accuracy": True}}
            for t in ("a", "b", "c")}
    rows = [{"label": "single-task", "seed": 0, "task": t, "baseline": "single-task", "params": p,
             "seconds": 1.0, "task_info": {t: info[t]}, f"{t}/accuracy": 0.5}
            for t, p in (("a", 100), ("b", 200), ("c", 300))]
    rows.append({"label": "pair", "seed": 0, "task": None, "baseline": "single-task", "params": 150, "seconds": 1.0,
                 "task_info": {"a": info["a"], "b": info["b"]}, "a/accuracy": 0.5, "b/accuracy": 0.5})
    rows.append({"label": "all", "seed": 0, "task": None, "baseline": "single-task", "params": 300, "seconds": 1.0,
                 "task_info": info, "a/accuracy": 0.5, "b/accuracy": 0.5, "c/accuracy": 0.5})
    table = compare.summarize(rows)["table"]
    assert table["pair"]["param_ratio"] == pytest.approx(150 / 300)  # against the a and b networks only
    assert table["all"]["param_ratio"] == pytest.approx(300 / 600)
    assert table["single-task"]["param_ratio"] == pytest.approx(1.0)
