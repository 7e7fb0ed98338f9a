import pytest
import torch
from torch import nn

from taskloom.architectures import CrossStitchOptions, EnsembleOptions, SingleOptions, SplitOptions, build_model
from taskloom.backbones import Backbone, LeNetOptions, TCDCNOptions
from taskloom.errors import ConfigError
from taskloom.mixers import CrossStitch
from taskloom.models import MultiTaskModel, MultiTaskNet, TaskParallel, parameter_kinds
from taskloom.tasks import ClassificationTask

from helpers import classification_tasks, copy_towers

INPUT = (1, 36, 36)


def tasks(k=2):
    return classification_tasks(k, first=10)


@pytest.mark.parametrize("k", [2, 3])
def test_cross_stitch_with_identity_alpha_equals_independent_towers(k):
    ts = tasks(k)
    single = build_model(SingleOptions(), LeNetOptions(), ts, INPUT)
    cs = build_model(CrossStitchOptions(alpha_same=1.0, alpha_diff=0.0), LeNetOptions(), ts, INPUT)
    copy_towers(cs, single)
    x = torch.randn(4, *INPUT)
    a, b = single(x), cs(x)
    for t in ts:
        assert torch.allclose(a[t.name], b[t.name], atol=1e-6)
    # and with the default init the outputs differ, so the units are really in the forward path
    cs_default = build_model(CrossStitchOptions(), LeNetOptions(), ts, INPUT)
    copy_towers(cs_default, single)
    assert not torch.allclose(cs_default(x)["t0"], a["t0"], atol=1e-4)


def test_split_at_last_is_one_trunk_with_k_heads():
    ts = tasks(3)
    model = build_model(SplitOptions(at=3), LeNetOptions(), ts, INPUT)
    assert len(model.body) == 0 and len(model.trunk) == 3
    x = torch.randn(5, *INPUT)
    features = nn.Sequential(*model.trunk)(x)
    out = model(x)
    for t in ts:
        assert torch.allclose(out[t.name], model.heads[t.name](features), atol=1e-6)


@pytest.mark.parametrize("backbone", [LeNetOptions(), TCDCNOptions()])
def test_every_split_point_is_available_and_counts_add_up(backbone):
    shape = INPUT if backbone.name == "lenet" else (1, 40, 40)
    recipe = Backbone(backbone, shape)
    stage_params = [sum(p.numel() for p in s.parameters()) for s in recipe.build()]
    ts = tasks(2)
    heads = sum(p.numel() for p in build_model(SplitOptions(at=0), backbone, ts, shape).heads.parameters())
    for k in range(recipe.num_stages + 1):
        model = build_model(SplitOptions(at=k), backbone, ts, shape)
        expected = sum(stage_params[:k]) + 2 * sum(stage_params[k:]) + heads
        assert sum(p.numel() for p in model.parameters()) == expected
        assert set(model(torch.zeros(2, *shape))) == {"t0", "t1"}


def test_split_zero_has_the_same_structure_as_single():
    a = build_model(SplitOptions(at=0), LeNetOptions(), tasks(), INPUT)
    b = build_model(SingleOptions(), LeNetOptions(), tasks(), INPUT)
    assert [n for n, _ in a.named_parameters()] == [n for n, _ in b.named_parameters()]


def test_split_out_of_range_is_a_config_error():
    with pytest.raises(ConfigError, match="model.architecture.at: 4 is out of range.*3 stages"):
        build_model(SplitOptions(at=4), LeNetOptions(), tasks(), INPUT)
    with pytest.raises(ConfigError, match="model.architecture.after"):
        build_model(CrossStitchOptions(split_at=2, after=[1]), LeNetOptions(), tasks(), INPUT)


def test_cross_stitch_units_placement_and_kinds():
    model = build_model(CrossStitchOptions(split_at=1, granularity="layer"), LeNetOptions(), tasks(3), INPUT)
    units = [m for _, m in model.mixers()]
    assert len(units) == 2 and all(isinstance(u, CrossStitch) and u.alpha.shape == (3, 3) for u in units)
    kinds = parameter_kinds(model)
    assert set(kinds) == {"backbone", "fusion", "head"}
    assert {id(p) for p in kinds["fusion"]} == {id(u.alpha) for u in units}
    assert {id(p) for p in kinds["head"]} == {id(p) for p in model.heads.parameters()}
    channel = build_model(CrossStitchOptions(after=[2, 3]), LeNetOptions(), tasks(2), INPUT)
    assert [u.alpha.shape for _, u in channel.mixers()] == [(50, 2, 2), (500, 2, 2)]


def test_every_unit_is_used_in_the_forward_pass():
    # REFERENCE §7: a unit created but never used.
    model = build_model(CrossStitchOptions(), LeNetOptions(), tasks(2), INPUT)
    out = model(torch.randn(3, *INPUT))
    sum(o.sum() for o in out.values()).backward()
    for name, unit in model.mixers():
        assert unit.alpha.grad is not None and unit.alpha.grad.abs().sum() > 0, name


def test_ensemble_trains_members_separately_and_combines_probabilities():
    ts = tasks(2)
    model = build_model(EnsembleOptions(members=2), LeNetOptions(), ts, INPUT)
    single = build_model(SingleOptions(), LeNetOptions(), ts, INPUT)
    assert sum(p.numel() for p in model.parameters()) == 2 * sum(p.numel() for p in single.parameters())
    x = torch.randn(4, *INPUT)
    y = {"t0": torch.randint(0, 10, (4,)), "t1": torch.randint(0, 11, (4,))}
    model.train()
    stacked = model(x)
    assert stacked["t0"].shape == (2, 4, 10)
    losses = model.loss_terms(stacked, y)
    members = [m.loss_terms(m(x), y) for m in model.members]
    assert torch.allclose(losses["t0"], (members[0]["t0"] + members[1]["t0"]) / 2)
    model.eval()
    eval_losses = model.loss_terms(model(x), y)  # validation: the combined prediction's loss
    assert torch.allclose(eval_losses["t1"], torch.nn.functional.nll_loss(model(x)["t1"], y["t1"]))
    combined = model(x)["t1"].exp()
    expected = (model.members[0](x)["t1"].softmax(-1) + model.members[1](x)["t1"].softmax(-1)) / 2
    assert torch.allclose(combined, expected, atol=1e-6)


def test_networks_implement_the_model_contract():
    ts = tasks(2)
    net = build_model(SplitOptions(at=1), LeNetOptions(), ts, INPUT)
    ensemble = build_model(EnsembleOptions(members=2), LeNetOptions(), ts, INPUT)
    for model in (net, ensemble):
        assert isinstance(model, MultiTaskModel), type(model).__name__
        assert model.task_names == ["t0", "t1"] and model.penalty() == {}
    assert net.last_shared_layer() == list(net.trunk[0][0].parameters())  # the trunk's conv
    assert [id(p) for p in ensemble.last_shared_layer()] == \
        [id(p) for m in ensemble.members for p in m.last_shared_layer()]
    assert ensemble.tower_stages(0) == []  # no single tower per task
    own = {id(m) for m in ensemble.task_modules(1)}
    assert all(id(m) in own for member in ensemble.members for m in member.task_modules(1))


# --------------------------------------------------------------------------- penalties, optimiser groups, tower init

from taskloom.architectures import NDDROptions, SluiceOptions, XResNetOptions  # noqa: E402
from taskloom.experiment import init_towers  # noqa: E402


def test_penalty_collects_every_submodule_penalty():
    model = build_model(SluiceOptions(orthogonality=0.5), LeNetOptions(), tasks(2), INPUT).train()

    class Extra(nn.Module):
        def penalty(self):
            return {"extra": torch.tensor(2.0), "sluice_orthogonality": torch.tensor(1.0)}

    model.extra = Extra()  # another engineer's regulariser plugs in the same way
    model(torch.randn(2, *INPUT))
    own = sum(u.penalty()["sluice_orthogonality"] for _, u in model.mixers())
    penalty = model.penalty()
    assert set(penalty) == {"extra", "sluice_orthogonality"}
    assert torch.allclose(penalty["sluice_orthogonality"], own + 1.0)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_fusion_learning_rate_multiplier_and_weight_decay_by_measured_updates(optimizer):
    # REFERENCE §7: a schedule that writes one rate into every group silently drops the x100.
    from taskloom.config import GroupOptions, ParamGroups, ScheduleOptions, TrainConfig
    from taskloom.train import build_optimizer, build_scheduler

    model = build_model(NDDROptions(), LeNetOptions(channels=[4, 6], hidden=8), tasks(2), INPUT)
    groups = ParamGroups(backbone=GroupOptions(1.0, 0.0), fusion=GroupOptions(100.0, 0.1), head=GroupOptions(1.0, 0.0))
    cfg = TrainConfig(optimizer=optimizer, lr=1e-3, momentum=0.0, weight_decay=0.0, groups=groups,
                      schedule=ScheduleOptions(name="step", step_size=1, gamma=0.5))
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg.schedule, 4)
    kinds = parameter_kinds(model)
    for epoch in range(2):
        factor = 0.5 ** epoch
        before = {id(p): p.detach().clone() for p in model.parameters()}
        for p in model.parameters():
            p.grad = torch.full_like(p, 0.01)
        opt.step()
        for kind, mult, decay in (("backbone", 1.0, 0.0), ("fusion", 100.0, 0.1)):
            for p in kinds[kind]:
                step = p.detach() - before[id(p)]
                if optimizer == "sgd":  # update = -lr * mult * (grad + decay * p)
                    expected = -1e-3 * factor * mult * (0.01 + decay * before[id(p)])
                    assert torch.allclose(step, expected, rtol=1e-3, atol=1e-7), kind
                elif epoch == 0:  # Adam's first step has size lr * mult whatever the gradient
                    g = 0.01 + decay * before[id(p)]
                    assert torch.allclose(step, -1e-3 * mult * torch.sign(g), rtol=1e-3, atol=1e-7), kind
        sched.step()
    rates = {g["name"]: g["lr"] for g in opt.param_groups}
    assert rates["fusion"] == pytest.approx(100 * rates["backbone"])


def test_towers_start_from_single_task_checkpoints(tmp_path):
    from taskloom import checkpoint
    from taskloom.backbones import SmallResNetOptions
    from taskloom.config import Config, ModelConfig, to_dict
    from taskloom.errors import CheckpointError

    backbone = SmallResNetOptions(channels=[4, 8], blocks=[1, 2], stem_channels=4)
    ts = tasks(2)
    paths = {}
    sources = {}
    for t in ts:  # one single-task network per task (data.tasks: [t])
        cfg = Config(model=ModelConfig(backbone=backbone, architecture=SingleOptions()))
        src = build_model(cfg.model.architecture, backbone, [t], INPUT)
        paths[t.name] = tmp_path / f"{t.name}.pt"
        checkpoint.save({"config": to_dict(cfg), "model": src.state_dict(), "tasks": [t.name]}, paths[t.name])
        sources[t.name] = src
    model = build_model(XResNetOptions(), backbone, ts, INPUT)
    init_towers(model, {t.name: str(p) for t, p in zip(ts, paths.values())}, ts, INPUT)
    for i, t in enumerate(ts):
        for dst, src in zip(model.tower_stages(i)[len(model.trunk):], sources[t.name].tower_stages(0)[len(model.trunk):]):
            for a, b in zip(dst.state_dict().values(), src.state_dict().values()):
                assert torch.equal(a, b)
        assert torch.equal(model.heads[t.name].fc.weight, sources[t.name].heads[t.name].fc.weight)
    # the trunk comes from the first listed task's network
    for a, b in zip(model.trunk.state_dict().values(), nn.Sequential(*sources["t0"].tower_stages(0)[:len(model.trunk)]).state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(ConfigError, match="init.towers.nope: unknown task"):
        init_towers(model, {"nope": str(paths["t0"])}, ts, INPUT)
    other = build_model(SingleOptions(), SmallResNetOptions(channels=[4, 16], blocks=[1, 2], stem_channels=4), ts, INPUT)
    with pytest.raises(CheckpointError, match=r"init.towers.t0: stage 3 of .* does not fit this model's stage 3: .*shape"):
        init_towers(other, {"t0": str(paths["t0"])}, ts, INPUT)


def test_every_multimnist_config_builds_its_model():
    from pathlib import Path

    from taskloom import config as cfg

    files = sorted(Path(__file__).resolve().parents[1].joinpath("configs", "multimnist").glob("*.yaml"))
    names = {f.stem for f in files}
    assert {"nddr", "nddr_shortcut", "sluice", "xresnet_x0", "xresnet_xi", "xresnet_xs", "xresnet_conv1x1"} <= names
    ts = [ClassificationTask("left", 10), ClassificationTask("right", 10)]
    for f in files:
        config = cfg.load(f)
        model = build_model(config.model.architecture, config.model.backbone, ts, INPUT)
        out = model(torch.zeros(2, *INPUT))
        assert set(out) == {"left", "right"}, f.name
