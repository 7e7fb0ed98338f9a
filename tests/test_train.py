import json
import os

import pytest
import torch

from taskloom import checkpoint
from taskloom.architectures import CrossStitchOptions, build_model
from taskloom.backbones import LeNetOptions
from taskloom.config import Config, GroupOptions, ParamGroups, ScheduleOptions, TrainConfig
from taskloom.errors import CheckpointError, ConfigError
from taskloom.models import parameter_kinds
from taskloom.train import Interrupted, TrainingError, build_optimizer, build_scheduler, fit, schedule_factor

from helpers import InterruptAt, tiny_multimnist

INPUT = (1, 36, 36)


def small_cs(tasks, **kw):
    return build_model(CrossStitchOptions(**kw), LeNetOptions(channels=[4, 8], hidden=16), tasks, INPUT)


def _measured_steps(model, optimizer, x, y):
    """Per kind: measured |delta p| / |grad| of one optimizer step (the effective rate)."""
    optimizer.zero_grad()
    losses = model.loss_terms(model(x), y)
    sum(losses.values()).backward()
    kinds = parameter_kinds(model)
    before = {k: [p.detach().clone() for p in ps] for k, ps in kinds.items()}
    grads = {k: [p.grad.detach().clone() for p in ps] for k, ps in kinds.items()}
    optimizer.step()
    rate = {}
    for k, ps in kinds.items():
        delta = torch.cat([(b - p.detach()).flatten() for b, p in zip(before[k], ps)])
        grad = torch.cat([g.flatten() for g in grads[k]])
        mask = grad.abs() > 1e-8
        rate[k] = (delta[mask] / grad[mask]).mean().item()
    return rate


@pytest.mark.parametrize("schedule", ["constant", "step", "plateau", "poly", "cosine"])
def test_fusion_multiplier_survives_every_schedule_in_the_actual_update(schedule, data):
    # REFERENCE §7: a schedule writing one rate into every group silently drops the x100.
    model = small_cs(data.tasks).double()  # float64: the measured rates are exact to ~1e-12
    cfg = TrainConfig(optimizer="sgd", lr=0.01, momentum=0.0, weight_decay=0.0, epochs=6,
                      schedule=ScheduleOptions(name=schedule, step_size=2, patience=0, gamma=0.5),
                      groups=ParamGroups(fusion=GroupOptions(lr_mult=100.0, weight_decay=0.0)))
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg.schedule, cfg.epochs)
    x = torch.stack([data.train[i][0] for i in range(16)]).double()
    y = {t.name: torch.stack([data.train[i][1][t.name] for i in range(16)]) for t in data.tasks}
    rates = []
    for epoch in range(cfg.epochs):
        rate = _measured_steps(model, optimizer, x, y)
        rates.append(rate)
        assert rate["fusion"] / rate["backbone"] == pytest.approx(100.0, rel=1e-6)
        assert rate["head"] == pytest.approx(rate["backbone"], rel=1e-6)
        if schedule == "plateau":
            scheduler.step(1.0)  # never improves -> decays every epoch after the first
        else:
            scheduler.step()
            assert rate["backbone"] == pytest.approx(0.01 * schedule_factor(cfg.schedule, epoch, cfg.epochs), rel=1e-6)
    if schedule != "constant":
        assert rates[-1]["fusion"] < rates[0]["fusion"] * 0.9, "the schedule must actually decay"


def test_adam_first_step_size_follows_the_multiplier(data):
    model = small_cs(data.tasks)
    cfg = TrainConfig(optimizer="adam", lr=1e-3, weight_decay=0.0,
                      groups=ParamGroups(fusion=GroupOptions(lr_mult=10.0, weight_decay=0.0)))
    optimizer = build_optimizer(model, cfg)
    kinds = parameter_kinds(model)
    alpha = kinds["fusion"][0]
    weight = kinds["backbone"][0]
    a0, w0 = alpha.detach().clone(), weight.detach().clone()
    x, y = data.train[0][0][None], {k: v[None] for k, v in data.train[0][1].items()}
    sum(model.loss_terms(model(x), y).values()).backward()
    optimizer.step()
    # Adam's first step moves every parameter with a non-zero gradient by ~lr.
    da, dw = (alpha - a0).abs(), (weight - w0).abs()
    assert da[da > 0].median().item() == pytest.approx(1e-2, rel=0.05)
    assert dw[dw > 0].median().item() == pytest.approx(1e-3, rel=0.05)


def test_weight_decay_is_per_group(data):
    model = small_cs(data.tasks)
    cfg = TrainConfig(optimizer="sgd", lr=0.1, momentum=0.0, weight_decay=0.5)  # fusion default: no decay
    optimizer = build_optimizer(model, cfg)
    kinds = parameter_kinds(model)
    before = {k: [p.detach().clone() for p in ps] for k, ps in kinds.items()}
    for ps in kinds.values():
        for p in ps:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    for b, p in zip(before["backbone"], kinds["backbone"]):
        assert torch.allclose(p, b * (1 - 0.1 * 0.5))
    for b, p in zip(before["fusion"], kinds["fusion"]):
        assert torch.equal(p, b), "alphas must not be decayed toward 0 unless asked"


def _fit(model, data, run_dir, **kw):
    cfg = TrainConfig(epochs=2, lr=1e-3, progress=False, **kw.pop("train", {}))
    return fit(model, data, cfg, run_dir, config=Config(train=cfg), batch_size=64, log=lambda *_: None, **kw)


def test_fit_writes_the_run_directory(tmp_path, data):
    torch.manual_seed(0)
    final = _fit(small_cs(data.tasks), data, tmp_path)
    assert set(final) >= {"tasks", "params", "seconds", "config"}
    assert set(final["tasks"]) == {"left", "right"}
    assert 0.0 <= final["tasks"]["left"]["accuracy"] <= 1.0 and final["tasks"]["left"]["count"] == 128
    assert json.loads((tmp_path / "final.json").read_text()) == final
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [l["epoch"] for l in lines] == [1, 2]
    assert lines[0]["lr"]["fusion"] == pytest.approx(100 * lines[0]["lr"]["backbone"])
    assert (tmp_path / "config.yaml").is_file()
    for name in ("last.pt", "best.pt"):
        assert checkpoint.load(tmp_path / "checkpoints" / name)["model"]
    with pytest.raises(ConfigError, match="already holds a run"):
        _fit(small_cs(data.tasks), data, tmp_path)


def test_resume_after_an_interrupt_mid_epoch_gives_the_same_weights(tmp_path, data):
    torch.manual_seed(0)
    reference = small_cs(data.tasks)
    start = {k: v.clone() for k, v in reference.state_dict().items()}
    _fit(reference, data, tmp_path / "a")

    interrupted = small_cs(data.tasks)
    interrupted.load_state_dict(start)
    bundle = tiny_multimnist()
    bundle.train = InterruptAt(bundle.train, at=256 + 100)  # epoch 2, inside its 2nd batch
    with pytest.raises(Interrupted, match="--resume"):
        _fit(interrupted, bundle, tmp_path / "b")
    saved = checkpoint.load(tmp_path / "b" / "checkpoints" / "last.pt")
    assert saved["state"]["epoch"] == 1 and saved["state"]["step"] == 2

    resumed = small_cs(data.tasks)  # fresh weights: everything must come from the checkpoint
    _fit(resumed, data, tmp_path / "b", resume=True)
    for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert len((tmp_path / "b" / "metrics.jsonl").read_text().splitlines()) == 2


def test_resume_with_a_changed_config_is_refused(tmp_path, data):
    _fit(small_cs(data.tasks), data, tmp_path)
    cfg = TrainConfig(epochs=2, lr=5e-3, progress=False)
    with pytest.raises(ConfigError, match="changed keys: train.lr"):
        fit(small_cs(data.tasks), data, cfg, tmp_path, config=Config(train=cfg), resume=True, log=lambda *_: None)


def test_non_finite_loss_stops_with_task_and_step(tmp_path, data):
    model = small_cs(data.tasks)
    with torch.no_grad():
        model.heads["right"].fc.bias.fill_(float("nan"))
    with pytest.raises(TrainingError, match=r"task 'right' is nan at epoch 1, step 1.*no checkpoint"):
        _fit(model, data, tmp_path)
    assert not (tmp_path / "checkpoints" / "last.pt").exists()


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_checkpoint_with_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": "taskloom-checkpoint", "version": 1, "model": _Evil()}, path)
    with pytest.raises(CheckpointError, match="refused to load"):
        checkpoint.load(path)


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "c.pt"
    checkpoint.save({"model": {"w": torch.ones(1000)}}, path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        checkpoint.load(path)


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    checkpoint.save({"model": {"w": torch.zeros(3)}}, path)

    def full_disk(obj, f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointError, match="No space left on device.*intact"):
        checkpoint.save({"model": {"w": torch.ones(3)}}, path)
    monkeypatch.undo()
    assert torch.equal(checkpoint.load(path)["model"]["w"], torch.zeros(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]
