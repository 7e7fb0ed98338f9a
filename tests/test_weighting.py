"""Loss weightings: formulas on hand-made losses/gradients, then a short real fit with each."""
import dataclasses
import json
import math

import pytest
import torch
from torch import nn

from taskloom import checkpoint
from taskloom.architectures import CrossStitchOptions, SplitOptions, build_model
from taskloom.backbones import LeNetOptions
from taskloom.config import Config, TrainConfig, load
from taskloom.errors import ConfigError
from taskloom.models import last_layer
from taskloom.train import Interrupted, fit
from taskloom.weighting import (
    WEIGHTINGS, DWAOptions, DWAWeighting, FixedOptions, FixedWeighting, GradNormOptions, GradNormWeighting,
    PCGradOptions, PCGradWeighting, UncertaintyOptions, UncertaintyWeighting, Weighting, WeightingOptions,
    build_weighting, pcgrad, register_weighting, shared_layer,
)

from helpers import InterruptAt, tiny_multimnist

INPUT = (1, 36, 36)
LENET = LeNetOptions(channels=[4, 8], hidden=16)


class _Task:
    def __init__(self, name, kind):
        self.name, self.kind = name, kind


class TwoHeads(nn.Module):
    """A shared linear layer (trunk) and one linear head per task; plus a penalty-only parameter.
    (The parts of the MultiTaskModel contract the weightings use: tasks, last_shared_layer.)"""

    def __init__(self, kinds=("classification", "classification")):
        super().__init__()
        self.tasks = [_Task(f"t{i}", k) for i, k in enumerate(kinds)]
        self.trunk = nn.Sequential(nn.Linear(3, 4))
        self.heads = nn.ModuleList([nn.Linear(4, 1) for _ in kinds])
        self.extra = nn.Parameter(torch.tensor(2.0))

    def last_shared_layer(self):
        return last_layer(self.trunk)

    def losses(self, x):
        h = torch.tanh(self.trunk(x))
        return {t.name: head(h).pow(2).mean() for t, head in zip(self.tasks, self.heads)}


def _grads(model):
    return {n: (p.grad.clone() if p.grad is not None else None) for n, p in model.named_parameters()}


def test_registry_has_every_method():
    assert set(WEIGHTINGS.names()) >= {"fixed", "uncertainty", "dwa", "gradnorm", "pcgrad"}
    for cls in (FixedWeighting, UncertaintyWeighting, DWAWeighting, GradNormWeighting, PCGradWeighting):
        assert WEIGHTINGS[cls.options_class().name].options is cls.options_class


def test_a_registered_class_is_built_with_its_options_as_keywords():
    @dataclasses.dataclass
    class ScaledOptions(WeightingOptions):
        """Every task at one weight (a test entry).

        More detail that the configs reference leaves out."""

        name: str = "scaled_test"
        factor: float = 0.5

    @register_weighting("scaled_test", ScaledOptions)
    class Scaled(FixedWeighting):
        def __init__(self, task_names, static_weights, factor: float = 0.5):
            super().__init__(task_names, {t: factor for t in task_names})

    try:
        weighting = build_weighting(ScaledOptions(factor=0.25), ["a", "b"], {})
        assert type(weighting) is Scaled and weighting.static == {"a": 0.25, "b": 0.25}
        assert WEIGHTINGS["scaled_test"].doc == "Every task at one weight (a test entry)."
        assert Scaled.options_class is ScaledOptions
    finally:
        WEIGHTINGS._entries.pop("scaled_test")  # keep the registry as the other tests expect it


def test_uncertainty_forms_must_name_tasks():
    with pytest.raises(ConfigError, match="train.weighting.forms: unknown tasks"):
        build_weighting(UncertaintyOptions(forms={"t9": "regression"}), ["t0", "t1"], {})
    cfg = load(None, ["train.weighting.name=gradnorm", "train.weighting.alpha=0.5"])
    assert isinstance(cfg.train.weighting, GradNormOptions) and cfg.train.weighting.alpha == 0.5
    assert isinstance(load(None, ["train.weighting=pcgrad"]).train.weighting, PCGradOptions)


@pytest.mark.parametrize("name", ["fixed", "uncertainty", "dwa", "gradnorm", "pcgrad"])
def test_penalty_is_added_with_weight_one_in_every_weighting(name):
    model = TwoHeads()
    x = torch.randn(8, 3)
    w = build_weighting(WEIGHTINGS[name].options(), ["t0", "t1"], {})
    w.backward(model.losses(x), {"p": 3.0 * model.extra ** 2}, model)
    assert model.extra.grad == pytest.approx(12.0)  # d(3 e^2)/de at e=2, not reweighted


def test_fixed_is_the_weighted_sum():
    torch.manual_seed(0)
    model, x = TwoHeads(), torch.randn(8, 3)
    used = build_weighting(FixedOptions(), ["t0", "t1"], {"t1": 0.1}).backward(model.losses(x), {}, model)
    assert used == {"t0": 1.0, "t1": 0.1}
    got = _grads(model)
    model.zero_grad()
    losses = model.losses(x)
    (losses["t0"] + 0.1 * losses["t1"]).backward()
    for n, p in model.named_parameters():
        if p.grad is not None:
            assert torch.allclose(got[n], p.grad)


def test_uncertainty_forms_and_gradients():
    model = TwoHeads(kinds=("classification", "landmarks"))
    w = build_weighting(UncertaintyOptions(), ["t0", "t1"], {})
    with torch.no_grad():
        w.log_var.copy_(torch.tensor([0.0, math.log(4.0)]))
    losses = {"t0": torch.tensor(3.0, requires_grad=True), "t1": torch.tensor(8.0, requires_grad=True)}
    used = w.backward(losses, {}, model)
    # classification: exp(-s) L + s/2 ; regression: 0.5 exp(-s) L + s/2
    assert used["t0"] == pytest.approx(1.0) and used["t1"] == pytest.approx(0.5 / 4.0)
    assert losses["t0"].grad == pytest.approx(1.0) and losses["t1"].grad == pytest.approx(0.125)
    # d/ds: -c exp(-s) L + 1/2
    assert w.log_var.grad.tolist() == pytest.approx([-3.0 + 0.5, -0.5 * 8.0 / 4.0 + 0.5])
    forced = build_weighting(UncertaintyOptions(forms={"t1": "classification"}), ["t0", "t1"], {})
    assert forced.scales(model) == {"t0": 1.0, "t1": 1.0}


def test_uncertainty_is_learned_in_the_weighting_group(data):
    from taskloom.train import build_optimizer

    w = build_weighting(UncertaintyOptions(), ["left", "right"], {})
    model = build_model(SplitOptions(at=1), LENET, data.tasks, INPUT)
    groups = {g["name"]: g for g in build_optimizer(model, TrainConfig(), w).param_groups}
    assert groups["weighting"]["params"] == [w.log_var] and groups["weighting"]["weight_decay"] == 0.0


def test_dwa_formula_and_first_two_epochs():
    w = DWAWeighting(["a", "b"], {}, temperature=2.0)
    assert w.weights.tolist() == [1.0, 1.0]
    w.epoch_end({"a": 1.0, "b": 2.0})
    assert w.weights.tolist() == [1.0, 1.0], "weights are 1 until two epochs are known"
    w.epoch_end({"a": 0.5, "b": 2.0})  # r = (0.5, 1.0)
    e = torch.exp(torch.tensor([0.25, 0.5]))
    assert w.weights.tolist() == pytest.approx((2 * e / e.sum()).tolist())
    assert w.weights.sum().item() == pytest.approx(2.0)
    restored = DWAWeighting(["a", "b"], {})
    restored.load_state_dict(w.state_dict())
    restored.epoch_end({"a": 0.5, "b": 1.0})  # r = (1, 0.5): now b is the faster one
    assert restored.weights[0] > restored.weights[1]


def test_dwa_reads_its_weights_once_per_change():
    # The weights used in a step are read from the buffer after epoch_end or a checkpoint's load,
    # not every step (a read waits for the device); they must still follow both.
    w = DWAWeighting(["a", "b"], {})
    loss = {"a": torch.tensor(1.0, requires_grad=True), "b": torch.tensor(1.0, requires_grad=True)}
    assert w.backward(loss, {}, None) == {"a": 1.0, "b": 1.0}
    for losses in ({"a": 1.0, "b": 2.0}, {"a": 0.5, "b": 2.0}):
        w.epoch_end(losses)
    used = w.backward(loss, {}, None)
    assert [used["a"], used["b"]] == w.weights.tolist() and used["a"] < used["b"]
    other = DWAWeighting(["a", "b"], {})
    other.backward(loss, {}, None)
    other.load_state_dict(w.state_dict())
    assert other.backward(loss, {}, None) == used


def test_gradnorm_weight_gradient_by_hand():
    w = torch.ones(2)
    norms = torch.tensor([1.0, 3.0])
    # equal training rates: target = mean G = 2; sign(G - target) * ||grad L_t||
    grad = GradNormWeighting.weight_gradient(w, norms, torch.ones(2), torch.ones(2), alpha=1.5)
    assert grad.tolist() == pytest.approx([-1.0, 3.0])
    # task 0 trains slower (L/L0 = 1 vs 0.5): r = (4/3, 2/3); alpha = 1 -> target (8/3, 4/3)
    grad = GradNormWeighting.weight_gradient(w, torch.tensor([3.0, 1.0]), torch.tensor([1.0, 0.5]),
                                             torch.ones(2), alpha=1.0)
    assert grad.tolist() == pytest.approx([3.0, -1.0])  # G = (3, 1): 3 > 8/3, 1 < 4/3


def test_gradnorm_step_uses_the_shared_layer_and_renormalises():
    torch.manual_seed(0)
    model, x = TwoHeads(), torch.randn(8, 3)
    assert shared_layer(model) == list(model.trunk[0].parameters())
    w = GradNormWeighting(["t0", "t1"], {}, alpha=1.5)
    with torch.no_grad():
        w.weights.copy_(torch.tensor([3.0, 1.0]))
    used = w.backward(model.losses(x), {}, model)
    assert sum(used.values()) == pytest.approx(2.0) and used["t0"] == pytest.approx(1.5)
    assert torch.equal(w.initial, torch.stack(list(model.losses(x).values())).detach())
    assert w.weights.grad is not None and w.weights.grad.shape == (2,)
    got = _grads(model)
    model.zero_grad()
    losses = model.losses(x)
    (1.5 * losses["t0"] + 0.5 * losses["t1"]).backward()
    for n, p in model.named_parameters():
        if p.grad is not None:
            assert torch.allclose(got[n], p.grad, atol=1e-6), n


def test_gradnorm_shared_layer_on_real_architectures(data):
    tasks = data.tasks
    split = build_model(SplitOptions(at=1), LENET, tasks, INPUT)
    assert shared_layer(split) == list(split.trunk[0][0].parameters())  # the trunk's conv
    cs = build_model(CrossStitchOptions(), LENET, tasks, INPUT)
    expected = [p for t in cs.body[0].towers for p in t[0].parameters()]  # first stage's conv, all towers
    assert [id(p) for p in shared_layer(cs)] == [id(p) for p in expected]


def test_pcgrad_on_two_known_conflicting_gradients():
    g = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])  # g1 . g2 = -1 < 0
    total = pcgrad(g, [[1], [0]])
    # g1' = g1 - (-1/2) g2 = (0.5, 0.5); g2' = g2 - (-1/1) g1 = (0, 1)
    assert total.tolist() == pytest.approx([0.5, 1.5])
    assert torch.dot(torch.tensor([0.5, 0.5]), g[1]) == pytest.approx(0.0)
    agree = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    assert pcgrad(agree, [[1], [0]]).tolist() == pytest.approx([2.0, 1.0]), "no conflict: plain sum"


def test_pcgrad_projects_against_original_gradients_in_the_drawn_order():
    g = torch.tensor([[1.0, 0.0, 0.0], [-1.0, 1.0, 0.0], [-1.0, 0.0, 1.0]])
    manual = g[0] + 0.5 * g[1]
    manual = manual - torch.dot(manual, g[2]) / g[2].pow(2).sum() * g[2] if torch.dot(manual, g[2]) < 0 else manual
    assert torch.allclose(pcgrad(g, [[1, 2], [], []]) - g[1] - g[2], manual)
    assert not torch.allclose(pcgrad(g, [[1, 2], [], []]), pcgrad(g, [[2, 1], [], []])), "order matters"


def test_pcgrad_on_a_model_shared_vs_task_specific():
    torch.manual_seed(0)
    model, x = TwoHeads(), torch.randn(8, 3)
    w = PCGradWeighting(["t0", "t1"], {}, seed=0)
    w.backward(model.losses(x), {}, model)
    got = _grads(model)
    losses = model.losses(x)
    shared = list(model.trunk.parameters())
    per = [torch.cat([g.flatten() for g in torch.autograd.grad(losses[t], shared, retain_graph=True)])
           for t in ("t0", "t1")]
    expected = pcgrad(torch.stack(per), [[1], [0]])
    assert torch.allclose(torch.cat([got["trunk.0.weight"].flatten(), got["trunk.0.bias"].flatten()]), expected, atol=1e-6)
    head0 = torch.autograd.grad(losses["t0"], list(model.heads[0].parameters()))
    assert torch.allclose(got["heads.0.weight"], head0[0]) and got["extra"] is None


def test_pcgrad_task_order_is_seeded_and_resumable():
    a = PCGradWeighting(list("abcd"), {}, seed=3)
    first = [a.orders() for _ in range(3)]
    b = PCGradWeighting(list("abcd"), {}, seed=3)
    assert [b.orders() for _ in range(3)] == first
    c = PCGradWeighting(list("abcd"), {}, seed=99)
    c.load_state_dict(a.state_dict())
    assert c.orders() == a.orders()
    assert all(sorted(o) == [j for j in range(4) if j != i] for i, o in enumerate(first[0]))


# --------------------------------------------------------------------------- with the trainer


def _fit(model, data, run_dir, weighting, epochs=1, **kw):
    cfg = TrainConfig(epochs=epochs, lr=1e-3, progress=False, weighting=weighting)
    return fit(model, data, cfg, run_dir, config=Config(train=cfg), batch_size=64, log=lambda *_: None, **kw)


@pytest.mark.parametrize("name, arch", [(n, SplitOptions(at=1)) for n in ("fixed", "uncertainty", "dwa", "gradnorm", "pcgrad")]
                         + [(n, CrossStitchOptions()) for n in ("gradnorm",)],
                         ids=["fixed", "uncertainty", "dwa", "gradnorm", "pcgrad", "gradnorm-cross_stitch"])
def test_one_epoch_fit_logs_task_weights(tmp_path, data, name, arch):
    torch.manual_seed(0)
    model = build_model(arch, LENET, data.tasks, INPUT)
    final = _fit(model, data, tmp_path, WEIGHTINGS[name].options())
    assert 0.0 <= final["tasks"]["left"]["accuracy"] <= 1.0
    (line,) = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert set(line["task_weights"]) == {"left", "right"}
    assert all(math.isfinite(v) and v > 0 for v in line["task_weights"].values())


def test_resume_mid_epoch_is_exact_with_pcgrad(tmp_path, data):
    torch.manual_seed(0)
    reference = build_model(CrossStitchOptions(), LENET, data.tasks, INPUT)
    start = {k: v.clone() for k, v in reference.state_dict().items()}
    _fit(reference, data, tmp_path / "a", PCGradOptions(), epochs=2)
    interrupted = build_model(CrossStitchOptions(), LENET, data.tasks, INPUT)
    interrupted.load_state_dict(start)
    bundle = tiny_multimnist()
    bundle.train = InterruptAt(bundle.train, at=256 + 100)
    with pytest.raises(Interrupted):
        _fit(interrupted, bundle, tmp_path / "b", PCGradOptions(), epochs=2)
    resumed = build_model(CrossStitchOptions(), LENET, data.tasks, INPUT)
    _fit(resumed, data, tmp_path / "b", PCGradOptions(), epochs=2, resume=True)
    for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    ref_w = checkpoint.load(tmp_path / "a" / "checkpoints" / "last.pt")["weighting"]
    res_w = checkpoint.load(tmp_path / "b" / "checkpoints" / "last.pt")["weighting"]
    assert torch.equal(ref_w["rng_state"], res_w["rng_state"])
