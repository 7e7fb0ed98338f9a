"""Tower-weight regulariser (REFERENCE §4)."""
import copy
import json
import math

import pytest
import torch
from torch import nn

from taskloom.architectures import (
    CrossStitchOptions, EnsembleOptions, SingleOptions, SluiceOptions, SplitOptions, build_model,
)
from taskloom.backbones import LeNetOptions
from taskloom.config import Config, ModelConfig, TrainConfig, load
from taskloom.errors import ConfigError
from taskloom.models import TaskParallel, parameter_kinds
from taskloom.regularizers import RegularizerOptions, TowerRegularizer, attach_regularizer, safe_expm1
from taskloom.train import build_optimizer, fit


INPUT = (1, 36, 36)
LENET = LeNetOptions(channels=[4, 8], hidden=16)
KINDS = ["l2", "exp", "affine_exp"]


class Towers(nn.Module):
    """Two (or K) tiny towers in one TaskParallel block, like MultiTaskNet.body; each tower is
    one stage (the part of the MultiTaskModel contract the regulariser uses: tasks, tower_stages)."""

    def __init__(self, k=2, same=True):
        super().__init__()
        first = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        towers = [copy.deepcopy(first) if same else nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
                  for _ in range(k)]
        self.body = nn.ModuleList([TaskParallel(towers)])
        self.tasks = [f"t{i}" for i in range(k)]

    def tower_stages(self, t):
        return [self.body[0].towers[t]]


@pytest.mark.parametrize("kind", KINDS)
def test_zero_for_identical_towers_positive_otherwise(kind):
    model = Towers(same=True)
    reg = TowerRegularizer(model, RegularizerOptions(kind=kind))
    assert reg.layer_names == ["stage1.0", "stage1.2"]
    assert reg().item() == 0.0
    with torch.no_grad():
        model.body[0].towers[1][2].weight.add_(0.1)
    assert reg().item() > 0.0


def test_values_by_hand():
    model = Towers(same=True)
    with torch.no_grad():
        model.body[0].towers[1][0].weight.add_(0.5)  # 12 elements, each differs by 0.5
    l2 = TowerRegularizer(model, RegularizerOptions(kind="l2", weight=2.0))
    assert l2().item() == pytest.approx(2.0 * 0.25)  # mean squared difference per element
    raw = TowerRegularizer(model, RegularizerOptions(kind="l2", normalise=False))
    assert raw().item() == pytest.approx(12 * 0.25)  # the paper's sum
    exp = TowerRegularizer(model, RegularizerOptions(kind="exp"))
    assert exp().item() == pytest.approx(math.expm1(0.25))
    aff = TowerRegularizer(model, RegularizerOptions(kind="affine_exp"))
    assert aff().item() == pytest.approx(math.expm1(0.25))  # a = 1, b = 0 at init
    with torch.no_grad():
        aff.b.fill_(0.5)  # a W_1 + 0.5 == W_2 on layer 0, but layer 2 now differs by 0.5
    assert aff().item() == pytest.approx(math.expm1(0.25), rel=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_gradient_pulls_two_tiny_towers_together(kind):
    torch.manual_seed(0)
    model = Towers(same=False)
    reg = TowerRegularizer(model, RegularizerOptions(kind=kind))
    towers = model.body[0].towers
    dist = lambda: sum((a - b).pow(2).sum() for a, b in zip(towers[0].parameters(), towers[1].parameters())
                       if a.dim() >= 2).item()
    before = dist()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)  # the towers only, not (a, b)
    for _ in range(20):
        opt.zero_grad()
        reg().backward()
        opt.step()
    assert dist() < 0.5 * before
    if kind == "affine_exp":
        assert reg.a.grad is not None and reg.b.grad is not None


def test_exponential_never_overflows():
    model = Towers(same=True)
    with torch.no_grad():
        for p in model.body[0].towers[1].parameters():
            p.add_(1e3)  # d = 1e6 per element: exp(d) would be inf
    for normalise in (True, False):
        reg = TowerRegularizer(model, RegularizerOptions(kind="exp", normalise=normalise, max_exponent=10.0))
        value = reg()
        value.backward()
        assert torch.isfinite(value)
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    d = torch.tensor([0.0, 9.0, 10.0, 11.0], requires_grad=True)
    out = safe_expm1(d, 10.0)
    out.sum().backward()
    assert out[:3].tolist() == pytest.approx([0.0, math.expm1(9.0), math.expm1(10.0)])
    assert out[3].item() == pytest.approx(2 * math.exp(10.0) - 1)  # linear continuation, C1 at 10
    assert d.grad[3].item() == pytest.approx(math.exp(10.0))


def test_all_pairs_for_three_towers_with_per_pair_affine():
    model = Towers(k=3, same=True)
    reg = TowerRegularizer(model, RegularizerOptions(kind="affine_exp"))
    assert reg.pairs == [(0, 1), (0, 2), (1, 2)] and reg.a.shape == (3, 2)
    with torch.no_grad():
        model.body[0].towers[2][0].weight.add_(0.5)  # pairs (0,2), (1,2) differ on layer 0
    assert reg().item() == pytest.approx(2 * math.expm1(0.25) / 3)  # mean over pairs


def test_biases_only_when_asked():
    model = Towers(same=True)
    with torch.no_grad():
        model.body[0].towers[1][0].bias.add_(1.0)
    assert TowerRegularizer(model, RegularizerOptions()).forward().item() == 0.0
    assert TowerRegularizer(model, RegularizerOptions(include_bias=True)).forward().item() > 0.0


@pytest.mark.parametrize("arch", [SingleOptions(), SplitOptions(at=1), CrossStitchOptions()],
                         ids=["single", "split1", "cross_stitch"])
def test_attached_to_real_models_with_or_without_mixers(arch, data):
    model = build_model(arch, LENET, data.tasks, INPUT)
    reg = attach_regularizer(model, RegularizerOptions(kind="affine_exp", weight=0.5))
    penalty = model.penalty()
    assert set(penalty) == {"tower_affine_exp"} and penalty["tower_affine_exp"].item() > 0  # towers init differently
    assert model.regularizer is reg
    kinds = parameter_kinds(model)
    assert [id(p) for p in kinds["regularizer"]] == [id(reg.a), id(reg.b)]
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for ps in kinds.values() for p in ps)
    groups = {g["name"]: g for g in build_optimizer(model, TrainConfig()).param_groups}
    assert groups["regularizer"]["weight_decay"] == 0.0
    assert "regularizer.a" in model.state_dict()
    assert "penalty" not in vars(model)  # the model's own penalty() collects it: nothing replaced


def test_the_regularizer_is_one_more_penalty_term(data):
    model = build_model(SluiceOptions(orthogonality=0.5), LENET, data.tasks, INPUT)
    model(torch.randn(2, *INPUT))  # the orthogonality penalty is of the last forward's features
    before = model.penalty()
    reg = attach_regularizer(model, RegularizerOptions(kind="l2"))
    after = model.penalty()
    assert set(after) == {"sluice_orthogonality", "tower_l2"}
    assert torch.equal(after["sluice_orthogonality"], before["sluice_orthogonality"])
    assert torch.equal(after["tower_l2"], reg())


def test_an_ensemble_has_no_towers_to_regularise(data):
    model = build_model(EnsembleOptions(members=2), LENET, data.tasks, INPUT)
    with pytest.raises(ConfigError, match="no task towers"):
        attach_regularizer(model, RegularizerOptions())


def test_no_towers_is_a_clear_error(data):
    model = build_model(SplitOptions(at=3), LENET, data.tasks, INPUT)  # only the heads are separate
    with pytest.raises(ConfigError, match="no task towers"):
        attach_regularizer(model, RegularizerOptions())
    assert attach_regularizer(model, None) is None


def test_config_key():
    cfg = load(None, ["model.regularizer.kind=exp", "model.regularizer.weight=0.01"])
    assert cfg.model.regularizer == RegularizerOptions(kind="exp", weight=0.01)
    assert load(None).model.regularizer is None
    with pytest.raises(ConfigError, match="not one of"):
        load(None, ["model.regularizer.kind=l1"])


def test_fit_logs_the_penalty(tmp_path, data):
    torch.manual_seed(0)
    model = build_model(CrossStitchOptions(), LENET, data.tasks, INPUT)
    attach_regularizer(model, RegularizerOptions(kind="exp", weight=0.1))
    cfg = TrainConfig(epochs=1, progress=False)
    fit(model, data, cfg, tmp_path, config=Config(model=ModelConfig(regularizer=RegularizerOptions(kind="exp", weight=0.1)),
                                                train=cfg), batch_size=64, log=lambda *_: None)
    (line,) = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert line["penalty"]["tower_exp"] > 0
