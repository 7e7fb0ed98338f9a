"""Summaries, tables and plots of taskloom compare, from rows alone (no training)."""
import importlib.util
import math
import shutil
import statistics
from pathlib import Path

import pytest

from taskloom import compare, plots, summary

REPO = Path(__file__).resolve().parents[1]
INFO = {"a": {"kind": "classification", "primary": "accuracy", "higher_is_better": {"accuracy": True}},
        "b": {"kind": "regression", "primary": "mae", "higher_is_better": {"mae": False}}}


def _row(label, seed, task_info, task="", baseline="single-task", params=100, **metrics):
    return {"label": label, "seed": seed, "task": task, "baseline": baseline, "params": params, "seconds": 1.0,
            "task_info": task_info, **{k.replace("_", "/", 1): v for k, v in metrics.items()}}


ROWS = [
    _row("single-task", 0, {"a": INFO["a"]}, "a", a_accuracy=0.8),
    _row("single-task", 1, {"a": INFO["a"]}, "a", a_accuracy=0.8),
    _row("single-task", 0, {"b": INFO["b"]}, "b", b_mae=10.0),
    _row("single-task", 1, {"b": INFO["b"]}, "b", b_mae=10.0),
    _row("m", 0, INFO, a_accuracy=0.88, b_mae=9.0),   # a +10 %, b +10 % (lower is better)
    _row("m", 1, INFO, a_accuracy=0.84, b_mae=11.0),  # a +5 %,  b -10 %
    _row("pair", 0, {"a": INFO["a"]}, a_accuracy=0.72),  # a -10 %, no b
]


def test_delta_m_formula():
    info = {"a": {"primary": "accuracy", "higher_is_better": {"accuracy": True}},
            "b": {"primary": "mae", "higher_is_better": {"mae": False}}}
    single = {"a": {"accuracy": 0.8}, "b": {"mae": 10.0}}
    row = {"a/accuracy": 0.88, "b/mae": 11.0}  # +10% and -10% -> 0
    assert summary.delta_m(row, info, single) == pytest.approx(0.0)
    row = {"a/accuracy": 0.88, "b/mae": 9.0}
    assert summary.delta_m(row, info, single) == pytest.approx(10.0)
    assert math.isnan(summary.delta_m({"a/accuracy": 0.9}, info, single))
    # A run on a subset of the tasks (its own task_info) is scored on those tasks only.
    assert summary.delta_m({"a/accuracy": 0.88, "task_info": {"a": info["a"]}}, info, single) == pytest.approx(10.0)


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
    table = summary.summarize(rows)["table"]
    assert table["pair"]["param_ratio"] == pytest.approx(150 / 300)  # against the a and b networks only
    assert table["all"]["param_ratio"] == pytest.approx(300 / 600)
    assert table["single-task"]["param_ratio"] == pytest.approx(1.0)


def test_relative_changes_are_signed_per_task_with_the_seed_spread_and_sorted_by_delta_m():
    changes = summary.relative_changes(ROWS)
    assert changes.columns == ["a accuracy", "b mae", "Δm"]
    assert changes.labels == ["m", "pair"]  # Δm 3.75 before -10; single-task is the reference, no row
    assert changes.seeds == [2, 1]
    m, pair = changes.mean
    assert m == pytest.approx([7.5, 0.0, 3.75])
    assert changes.std[0] == pytest.approx([statistics.stdev([10, 5]), statistics.stdev([10, -10]),
                                            statistics.stdev([10, -2.5])])
    assert pair[0] == pytest.approx(-10.0) and math.isnan(pair[1]) and pair[2] == pytest.approx(-10.0)
    # the Δm column is the table's Δm
    assert summary.summarize(ROWS)["table"]["m"]["delta_m"][0] == pytest.approx(m[2])


def test_heatmap_and_parameter_plot_are_written(tmp_path):
    changes = summary.relative_changes(ROWS)
    path = plots.plot_relative_change(changes, tmp_path / "relative_change.png", title="synthetic")
    assert path.stat().st_size > 5000 and path.read_bytes()[:4] == b"\x89PNG"
    path = plots.plot_metric_vs_params(summary.summarize(ROWS), tmp_path / "metric_vs_params.png")
    assert path.stat().st_size > 5000


def test_results_page_shows_the_heatmap(tmp_path):
    summary.write_csv([{**r, "task_info": __import__("json").dumps(r["task_info"])} for r in ROWS],
                      tmp_path / "results.csv")
    md = compare.write_results(tmp_path, title="Synthetic").read_text()
    assert md.startswith("# Synthetic\n") and "![relative change" in md and "(relative_change.png)" in md
    assert "[metric_vs_params.png](metric_vs_params.png)" in md
    assert (tmp_path / "relative_change.png").is_file()


def test_one_colour_per_family_and_distinct_markers_within_it():
    labels = ["single-task", "single-task (resnet_small)", "hard[+pose]", "hard/dwa", "cross_stitch",
              "cross_stitch+l2", "cs-lr[lr_mult=10]", "X0", "X-conv1x1", "split@2"]
    assert [plots.family(label) for label in labels] == [
        "single-task", "single-task", "hard", "hard", "cross_stitch", "cross_stitch", "cross_stitch",
        "xresnet", "xresnet", "split"]
    style = plots.styles(labels)
    for a in labels:
        for b in labels:
            same_family = plots.family(a) == plots.family(b)
            assert (style[a][0] == style[b][0]) == same_family
            assert a == b or not same_family or style[a][1] != style[b][1]


def test_record_report_regenerates_every_committed_study_from_its_csv(tmp_path, monkeypatch, capsys):
    """scripts/record.py report with no run roots: the committed results.csv files alone give
    the same tables as committed, and each study page gets its heatmap."""
    spec = importlib.util.spec_from_file_location("record", REPO / "scripts" / "record.py")
    record = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(record)
    docs = tmp_path / "results"
    shutil.copytree(REPO / "docs" / "results", docs)
    monkeypatch.setattr(record, "DOCS", docs)
    record.main(["report", "--runs", str(tmp_path / "no-runs")])
    studies = sorted(p.parent.name for p in docs.glob("*/results.csv"))
    assert {"mtfl", "utkface", "ablations", "multimnist_default"} <= set(studies)
    for study in studies:
        committed = (REPO / "docs" / "results" / study / "results.md").read_text()
        regenerated = (docs / study / "results.md").read_text()
        table = lambda text: [line for line in text.splitlines() if line.startswith("|")]
        assert table(regenerated) == table(committed)
        assert "(relative_change.png)" in regenerated and (docs / study / "relative_change.png").is_file()
    for page in ("README.md", "weighting_mtfl.md"):
        assert (docs / page).read_text() == (REPO / "docs" / "results" / page).read_text()
