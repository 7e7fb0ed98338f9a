"""Run identity of taskloom compare: fingerprints ignore default values; resume against stored configs."""
import dataclasses

import pytest
import yaml

from taskloom import config as cfg
from taskloom.errors import ConfigError
from taskloom.grid import Grid, Job, config_delta, expand, fingerprint, legacy_fingerprint
from taskloom.runs import changed_keys, reconcile_stored_configs

TINY = ["train.epochs=1", "data.train_pairs=256", "data.val_pairs=64", "data.test_pairs=64",
        "model.backbone.channels=[4,8]", "model.backbone.hidden=16", "train.progress=false"]


def _with_new_train_option(config: cfg.Config, value=None):
    """``config`` as it would load after a release that adds ``train.new_option`` (default 0.5)."""
    train_cls = dataclasses.make_dataclass(
        "TrainConfig", [("new_option", float, dataclasses.field(default=0.5))], bases=(cfg.TrainConfig,))
    config_cls = dataclasses.make_dataclass(
        "Config", [("train", train_cls, dataclasses.field(default_factory=train_cls))], bases=(cfg.Config,))
    train = {f.name: getattr(config.train, f.name) for f in dataclasses.fields(cfg.TrainConfig)}
    new = train_cls(**train, **({} if value is None else {"new_option": value}))
    return config_cls(**{**{f.name: getattr(config, f.name) for f in dataclasses.fields(cfg.Config)}, "train": new})


def test_a_new_option_at_its_default_keeps_the_fingerprint():
    old = cfg.load(None, [*TINY, "model.architecture=nddr", "train.lr=0.002"])
    assert fingerprint(_with_new_train_option(old)) == fingerprint(old) == fingerprint(cfg.to_dict(old))
    assert fingerprint(_with_new_train_option(old, 0.25)) != fingerprint(old)


def test_the_fingerprint_hashes_the_values_that_differ_from_the_defaults():
    plain = cfg.load(None, TINY)
    assert fingerprint(cfg.load(None, [*TINY, "train.lr=0.001", "seed=0"])) == fingerprint(plain)  # defaults
    assert fingerprint(cfg.load(None, [*TINY, "train.lr=0.002"])) != fingerprint(plain)
    assert fingerprint(cfg.load(None, [*TINY, "model.regularizer={kind: l2}"])) != fingerprint(plain)
    delta = config_delta(cfg.load(None, ["model.architecture={name: xresnet, cross: zero}", "model.backbone=resnet_small"]),
                         cfg.Config())
    # another component than the default one is named even where its options keep their defaults
    assert delta == {"model": {"backbone": {"name": "resnet_small"}, "architecture": {"name": "xresnet", "cross": "zero"}}}


def test_options_inside_a_mapping_are_fingerprinted_by_their_values():
    """``model.heads`` maps a task to its head's options (a dataclass): YAML cannot write those as
    they are, so the pets grid could not be expanded; they count by their non-default values."""
    dense = ["data.name=nyuv2", "data.tasks=[segmentation]", "model.backbone=resnet_small"]
    aspp = fingerprint(cfg.load(None, [*dense, "model.heads={segmentation: {name: aspp, width: 128}}"]))
    assert aspp == fingerprint(cfg.load(None, [*dense, "model.heads={segmentation: {name: aspp, width: 128, rates: null}}"]))
    assert aspp != fingerprint(cfg.load(None, [*dense, "model.heads={segmentation: {name: aspp, width: 64}}"]))
    assert aspp != fingerprint(cfg.load(None, dense))


@pytest.mark.parametrize("name", ["mtfl", "utkface", "ablations", "pets", "gated"])
def test_every_record_grid_expands_into_fingerprinted_jobs(name, tmp_path, monkeypatch):
    from pathlib import Path

    from conftest import require_pretrained, shared_path
    from taskloom.grid import load_grid

    if name == "pets":
        require_pretrained("timm")  # its towers are timm's (expanding counts their stages)
    # the grids leave data.root unset; expanding one reads the datasets' task lists
    monkeypatch.setenv("TASKLOOM_DATA", str(shared_path()))
    grid = load_grid(Path(__file__).resolve().parents[1] / "configs" / "record" / f"{name}.yaml")
    jobs = expand(grid, grid.seeds, tmp_path)
    assert jobs and len({j.run_dir for j in jobs}) == len(jobs)  # one directory per (label, seed, task)
    for job in jobs:  # a single-task baseline keeps no head (loss weight, ...) of another task
        if job.config["data"].get("tasks") is None:  # the dataset's every task
            continue
        tasks = set(job.config["data"]["tasks"])
        assert set(job.config["model"].get("heads") or {}) <= tasks, (job.label, job.task)
        assert set(job.config["train"].get("loss_weights") or {}) <= tasks, (job.label, job.task)


def test_a_run_directory_named_by_the_old_whole_config_hash_is_reused(tmp_path):
    grid = Grid(None, TINY, 1, [{"label": "s", "architecture": "split@1", "overrides": [], "sweep": {}}])
    jobs = expand(grid, 1, tmp_path)
    assert all(j.run_dir.name == f"s0-{fingerprint(j.config)}" for j in jobs)
    old = jobs[-1].run_dir.with_name(f"s0-{legacy_fingerprint(jobs[-1].config)}")
    old.mkdir(parents=True)
    assert expand(grid, 1, tmp_path)[-1].run_dir == old


def test_changed_keys_ignore_options_added_or_removed_since():
    stored = {"train": {"lr": 0.001, "gone": 1}, "seed": 0}
    new = {"train": {"lr": 0.002, "new_option": 0.5}, "seed": 0, "init": {}}
    assert changed_keys(stored, new) == [("train.lr", 0.001, 0.002)]


def _started_job(tmp_path, stored: dict, new: dict, finished: bool = True) -> Job:
    job = Job("cs", 0, new, tmp_path / "cs" / "s0-abc")
    job.run_dir.mkdir(parents=True)
    job.stored_config.write_text(yaml.safe_dump(stored))
    if finished:
        job.final.write_text("{}")
    return job


@pytest.mark.parametrize("policy", ["stop", "keep", "rerun"])
def test_runs_with_a_changed_default_are_reported_never_silently_reused_or_rerun(tmp_path, policy):
    job = _started_job(tmp_path, {"train": {"lr": 0.001}}, {"train": {"lr": 0.002, "new_option": 0.5}})
    same = _started_job(tmp_path / "b", {"train": {"lr": 0.002}}, {"train": {"lr": 0.002, "new_option": 0.5}})
    fresh = Job("cs", 1, {"train": {"lr": 0.002}}, tmp_path / "cs" / "s1-abc")  # not started
    log = []
    if policy == "stop":
        with pytest.raises(ConfigError, match=r"(?s)1 run\(s\).*cs seed 0.*train.lr 0.001 -> 0.002.*--changed"):
            reconcile_stored_configs([job, same, fresh], policy, log.append)
        assert job.final.is_file() and job.config["train"]["lr"] == 0.002
        return
    assert reconcile_stored_configs([job, same, fresh], policy, log.append) == [job]
    assert len(log) == 1 and "train.lr 0.001 -> 0.002" in log[0]
    if policy == "keep":  # the finished result stays; the job carries the config it was trained with
        assert job.final.is_file() and job.config == {"train": {"lr": 0.001}}
    else:  # moved aside, so that the run starts again from scratch
        assert not job.run_dir.exists()
        assert (job.run_dir.parent / "s0-abc.replaced" / "final.json").is_file()
        assert "s0-abc.replaced" in log[0]
