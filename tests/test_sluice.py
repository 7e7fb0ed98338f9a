"""Sluice networks: S = 1 without beta is the per-layer cross-stitch network; beta mixing; the
orthogonality penalty reaches the trainer through MultiTaskNet.penalty()."""
import pytest
import torch

from taskloom.architectures import CrossStitchOptions, SingleOptions, SluiceOptions, build_model
from taskloom.backbones import LeNetOptions
from taskloom.blocks import BetaMix
from taskloom.errors import ConfigError
from taskloom.mixers import Sluice
from taskloom.models import TaskParallel

from helpers import classification_tasks as tasks, copy_towers

LENET = LeNetOptions(channels=[6, 8], hidden=12)
INPUT = (1, 36, 36)


@pytest.mark.parametrize("k", [2, 3])
def test_sluice_with_one_subspace_and_no_beta_is_the_layer_cross_stitch_network(k):
    ts = tasks(k)
    stitch = build_model(CrossStitchOptions(granularity="layer"), LENET, ts, INPUT).double()
    sluice = build_model(SluiceOptions(subspaces=1), LENET, ts, INPUT).double()
    copy_towers(sluice, stitch)
    for (_, cs), (_, sl) in zip(stitch.mixers(), sluice.mixers(), strict=True):
        with torch.no_grad():
            cs.alpha.copy_(torch.randn_like(cs.alpha))
            sl.alpha.copy_(cs.alpha)
    x = torch.randn(2, *INPUT, dtype=torch.float64)
    a, b = stitch(x), sluice(x)
    for t in ts:
        assert torch.allclose(a[t.name], b[t.name], atol=1e-10)


def test_sluice_at_its_independent_setting_is_independent_towers():
    ts = tasks(3)
    single = build_model(SingleOptions(), LENET, ts, INPUT)
    sluice = build_model(SluiceOptions(subspaces=2, alpha_same=1.0, alpha_diff=0.0), LENET, ts, INPUT)
    copy_towers(sluice, single)
    x = torch.randn(2, *INPUT)
    for t in ts:
        assert torch.allclose(single(x)[t.name], sluice(x)[t.name], atol=1e-5)


def test_sluice_units_have_k_s_squared_weights():
    model = build_model(SluiceOptions(subspaces=2), LENET, tasks(3), INPUT)
    units = [m for _, m in model.mixers()]
    assert len(units) == 3 and all(isinstance(u, Sluice) and u.alpha.shape == (6, 6) for u in units)
    with pytest.raises(ConfigError, match="model.architecture.subspaces: 4 does not divide the 6 channels"):
        build_model(SluiceOptions(subspaces=4), LENET, tasks(2), INPUT)


def test_beta_mixes_the_pooled_layer_outputs_per_task():
    ts = tasks(2)
    model = build_model(SluiceOptions(beta=True), LENET, ts, INPUT).eval()
    (mix,) = [b for b in model.body if isinstance(b, BetaMix)]
    assert mix.beta.shape == (2, 3) and mix.out_shape == (6 + 8 + 12,)
    with torch.no_grad():
        mix.beta.copy_(torch.tensor([[0.0, 0.0, 1.0], [0.5, 2.0, 1.0]]))
    outs = {}
    for name, unit in model.mixers():
        unit.register_forward_hook(lambda m, i, o, name=name: outs.setdefault(name, o))
    feats = model.features(torch.randn(2, *INPUT))
    layers = [[y.mean((2, 3)) if y.ndim == 4 else y for y in o] for o in outs.values()]
    assert torch.allclose(feats[0], torch.cat([0 * layers[0][0], 0 * layers[1][0], layers[2][0]], 1))
    assert torch.allclose(feats[1], torch.cat([0.5 * layers[0][1], 2 * layers[1][1], layers[2][1]], 1))
    out = model(torch.randn(2, *INPUT))
    sum(o.sum() for o in out.values()).backward()
    assert mix.beta.grad is not None and mix.beta.grad.abs().sum() > 0


def test_orthogonality_penalty_reaches_the_model_penalty():
    model = build_model(SluiceOptions(orthogonality=0.1), LENET, tasks(2), INPUT).train()
    model(torch.randn(4, *INPUT))
    penalty = model.penalty()
    units = [u for _, u in model.mixers()]
    assert set(penalty) == {"sluice_orthogonality"}
    assert torch.allclose(penalty["sluice_orthogonality"], sum(u.penalty()["sluice_orthogonality"] for u in units))
    penalty["sluice_orthogonality"].backward()
    assert any(p.grad is not None for p in model.parameters())
    off = build_model(SluiceOptions(), LENET, tasks(2), INPUT).train()
    off(torch.randn(4, *INPUT))
    assert off.penalty() == {}
