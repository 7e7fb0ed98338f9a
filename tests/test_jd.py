"""The ``jd`` weighting: TorchJD aggregators on the Jacobian w.r.t. the shared parameters."""
import pytest
import torch

from taskloom.architectures import SplitOptions, build_model
from taskloom.backbones import LeNetOptions
from taskloom.config import TrainConfig
from taskloom.distributed import Context
from taskloom.errors import ConfigError
from taskloom.weighting import FixedOptions, PCGradWeighting, build_weighting, pcgrad

from helpers import classification_tasks

torchjd = pytest.importorskip("torchjd")

from taskloom.jd import JDOptions, split_parameters  # noqa: E402

INPUT = (1, 36, 36)


def model_and_batch(k=2, seed=0):
    torch.manual_seed(seed)
    ts = classification_tasks(k, first=10)
    model = build_model(SplitOptions(at=1), LeNetOptions(channels=[4, 8], hidden=16), ts, INPUT)
    x = torch.randn(4, *INPUT)
    y = {t.name: torch.randint(0, t.num_classes, (4,)) for t in ts}
    return model, x, y


def grads_with(options, k=2, static=None):
    model, x, y = model_and_batch(k)
    model.train()
    weighting = build_weighting(options, model.task_names, static or {})
    used = weighting.backward(model.loss_terms(model(x), y), {}, model)
    return model, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, used


def test_shared_parameters_are_those_of_no_task_module():
    model, _, _ = model_and_batch()
    shared, specific = split_parameters(model, 2)
    assert {id(p) for p in shared} == {id(p) for p in model.trunk.parameters()}
    assert len(shared) + len(specific) == len(list(model.parameters()))


def test_sum_aggregator_equals_fixed_weights_of_one_and_mean_gives_the_shared_a_kth():
    k = 3
    model, fixed, used_fixed = grads_with(FixedOptions(), k)
    _, summed, used_sum = grads_with(JDOptions(aggregator="sum"), k)
    _, mean, used_mean = grads_with(JDOptions(aggregator="mean"), k)
    assert used_sum == pytest.approx(used_fixed) and used_mean == pytest.approx({t: 1 / k for t in used_fixed})
    assert fixed.keys() == summed.keys() == mean.keys()
    shared = {n for n, _ in model.trunk.named_parameters()}
    for n, g in fixed.items():
        torch.testing.assert_close(summed[n], g, atol=1e-6, rtol=1e-5)
        is_shared = n.removeprefix("trunk.") in shared and n.startswith("trunk.")
        torch.testing.assert_close(mean[n], g / k if is_shared else g, atol=1e-6, rtol=1e-5)


def test_static_loss_weights_scale_the_jacobian_rows():
    _, fixed, _ = grads_with(FixedOptions(), 2, {"t1": 0.1})
    _, summed, used = grads_with(JDOptions(aggregator="sum"), 2, {"t1": 0.1})
    assert used == pytest.approx({"t0": 1.0, "t1": 0.1})
    for n, g in fixed.items():
        torch.testing.assert_close(summed[n], g, atol=1e-6, rtol=1e-5)


def test_torchjd_pcgrad_equals_taskloom_pcgrad_with_two_tasks():
    # K = 2: each task has one other to project against, so the drawn order plays no part.
    _, ours, _ = grads_with(PCGradWeighting.options_class(), 2)
    _, theirs, _ = grads_with(JDOptions(aggregator="pcgrad"), 2)
    assert ours.keys() == theirs.keys()
    for n, g in ours.items():
        torch.testing.assert_close(theirs[n], g, atol=1e-6, rtol=1e-5)
    jac = torch.tensor([[1.0, 0.0, 2.0], [-1.0, 1.0, 0.5]])
    torch.testing.assert_close(torchjd.aggregation.PCGrad()(jac), pcgrad(jac, [[1], [0]]))


@pytest.mark.parametrize("k", [3, 4])
def test_torchjd_pcgrad_equals_taskloom_pcgrad_in_the_same_task_order(k):
    # K > 2: TorchJD draws each task's order from the global generator (torch.randperm(K), skipping
    # the task itself); taskloom from its own seeded generator. Replaying TorchJD's draws as
    # taskloom's orders makes the two the same computation.
    jac = torch.randn(k, 20, generator=torch.Generator().manual_seed(k))
    torch.manual_seed(7)
    orders = [[j for j in torch.randperm(k).tolist() if j != i] for i in range(k)]
    torch.manual_seed(7)
    theirs = torchjd.aggregation.PCGrad()(jac)
    torch.testing.assert_close(theirs, pcgrad(jac, orders), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("aggregator", ["upgrad", "mgda", "imtl_g", "aligned_mtl", "config", "graddrop", "dualproj",
                                        "nash_mtl", "excess_mtl", "pcd"])
def test_aggregators_give_a_gradient_to_every_used_parameter(aggregator):
    try:
        _, grads, used = grads_with(JDOptions(aggregator=aggregator), 2)
    except ConfigError as exc:  # a solver extra of TorchJD is missing here
        pytest.skip(str(exc))
    assert set(used) == {"t0", "t1"}
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert any(n.startswith("trunk.") for n in grads) and any(n.startswith("heads.") for n in grads)


def test_unknown_aggregator_and_bad_options_are_config_errors():
    with pytest.raises(ConfigError, match="not one of"):
        build_weighting(JDOptions(aggregator="nope"), ["a", "b"], {})
    with pytest.raises(ConfigError, match="options"):
        build_weighting(JDOptions(aggregator="mgda", options={"bogus": 1}), ["a", "b"], {})


def test_jd_is_refused_under_torchrun_with_a_clear_message():
    from taskloom.train import build_loop

    model, _, _ = model_and_batch()
    train = TrainConfig()
    train.weighting = JDOptions()
    with pytest.raises(ConfigError, match="'jd' is not supported under torchrun"):
        build_loop(model, train, Context(rank=0, world=2), torch.device("cpu"))


def test_a_stateful_aggregator_starts_without_the_build_probes_state():
    """build_aggregator calls the aggregator once to surface a missing solver; Nash-MTL keeps a step
    count and its last weights, which must not carry that made-up call into training."""
    from taskloom.jd import build_aggregator

    try:
        nash = build_aggregator("nash_mtl", {}, 3)
    except ConfigError as exc:
        pytest.skip(str(exc))
    assert nash.weighting.step == 0
