"""Gated and attention sharing (taskloom.gated): the reductions that place each design in the
family (constant gates = per-layer cross-stitch, one expert = hard sharing, one-hot gates =
single-task, masks of 1 = a shared backbone), and that every design trains on any backbone."""
import pytest
import torch

from taskloom.architectures import CrossStitchOptions, SingleOptions, SplitOptions, build_model
from taskloom.backbones import LeNetOptions, SmallResNetOptions, TCDCNOptions
from taskloom.gated import ConstantMask, ExpertStage, GatedMixer, MTANStage
from taskloom.gated_architectures import (
    AdaTTOptions, CGCOptions, GatedOptions, MMoEOptions, MTANOptions, PLEOptions,
)
from taskloom.mixers import CrossStitch, apply_blocks
from taskloom.models import parameter_kinds

from helpers import classification_tasks

INPUT = (1, 36, 36)
LENET = LeNetOptions(channels=[4, 8], hidden=16)


def tasks(k=2):
    return classification_tasks(k, first=10)


def same_outputs(a, b, x, tol=1e-6):
    a.eval(), b.eval()
    oa, ob = a(x), b(x)
    for name in oa:
        torch.testing.assert_close(ob[name], oa[name], atol=tol, rtol=tol)


def one_hot_logits(n, i):
    """Gate logits whose softmax is exactly one-hot at ``i``."""
    logits = torch.full((n,), float("-inf"))
    logits[i] = 0.0
    return logits


def tower_stage_lists(single, k):
    return [single.tower_stages(t) for t in range(k)]


# --------------------------------------------------------------------------- gated mixer


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("softmax", [True, False])
def test_constant_gated_mixer_is_a_layer_cross_stitch(k, softmax):
    torch.manual_seed(0)
    gated = GatedMixer(k, 5, softmax=softmax, constant=True)
    with torch.no_grad():
        for gate in gated.gates:
            gate.bias.normal_()
    stitch = CrossStitch(k, 5, granularity="layer")
    with torch.no_grad():
        stitch.alpha.copy_(gated.matrix())
    if softmax:
        torch.testing.assert_close(gated.matrix().sum(1), torch.ones(k))
    xs = [torch.randn(4, 5, 3, 3) for _ in range(k)]
    for y, z, w in zip(gated(xs), stitch(xs), apply_blocks(gated.blocks(), xs)):
        torch.testing.assert_close(y, z)
        torch.testing.assert_close(y, w)
    torch.testing.assert_close(gated.blocks(), stitch.blocks())


def test_gated_mixer_starts_input_independent_and_learns_input_dependence():
    torch.manual_seed(0)
    gated, constant = GatedMixer(2, 4), GatedMixer(2, 4, constant=True)
    xs = [torch.randn(3, 4), torch.randn(3, 4)]
    for y, z in zip(gated(xs), constant(xs)):
        torch.testing.assert_close(y, z)
    sum(y.sum() for y in gated(xs)).backward()
    assert gated.gates[0].linear.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("k", [2, 3])
def test_constant_gated_architecture_equals_layer_cross_stitch(k):
    ts = tasks(k)
    stitch = build_model(CrossStitchOptions(granularity="layer"), LENET, ts, INPUT)
    gated = build_model(GatedOptions(constant=True, softmax=False), LENET, ts, INPUT)
    gated.load_state_dict({**gated.state_dict(), **{n: v for n, v in stitch.state_dict().items() if "alpha" not in n}})
    same_outputs(stitch, gated, torch.randn(4, *INPUT))
    kinds = parameter_kinds(gated)
    assert {id(p) for g in gated.modules() if isinstance(g, GatedMixer) for p in g.parameters()} <= {id(p) for p in kinds["fusion"]}


# --------------------------------------------------------------------------- MMoE, CGC, PLE, AdaTT


def test_mmoe_with_one_expert_is_hard_sharing_of_the_whole_backbone():
    ts = tasks(3)
    split = build_model(SplitOptions(at=3), LENET, ts, INPUT)
    mmoe = build_model(MMoEOptions(experts=1), LENET, ts, INPUT)
    (stage,) = mmoe.body
    stage.shared_experts[0].load_state_dict(split.trunk.state_dict())
    mmoe.heads.load_state_dict(split.heads.state_dict())
    same_outputs(split, mmoe, torch.randn(4, *INPUT))


def _load_experts(stage, experts_of_task, single, k):
    """Copy task t's tower into the expert ``experts_of_task(stage, t)``."""
    for t, stages in enumerate(tower_stage_lists(single, k)):
        experts_of_task(stage, t).load_state_dict(torch.nn.Sequential(*stages).state_dict())


@pytest.mark.parametrize("k", [2, 3])
def test_mmoe_with_k_experts_and_one_hot_gates_is_single_task(k):
    ts = tasks(k)
    single = build_model(SingleOptions(), LENET, ts, INPUT)
    mmoe = build_model(MMoEOptions(experts=k), LENET, ts, INPUT)
    (stage,) = mmoe.body
    _load_experts(stage, lambda s, t: s.shared_experts[t], single, k)
    with torch.no_grad():
        for t, gate in enumerate(stage.gates):
            gate.bias.copy_(one_hot_logits(k, t))
    mmoe.heads.load_state_dict(single.heads.state_dict())
    same_outputs(single, mmoe, torch.randn(4, *INPUT))


def test_cgc_without_shared_experts_is_single_task():
    ts = tasks(2)
    single = build_model(SingleOptions(), LENET, ts, INPUT)
    cgc = build_model(CGCOptions(task_experts=1, shared_experts=0), LENET, ts, INPUT)
    (stage,) = cgc.body
    _load_experts(stage, lambda s, t: s.task_experts[t][0], single, 2)
    cgc.heads.load_state_dict(single.heads.state_dict())
    same_outputs(single, cgc, torch.randn(4, *INPUT))
    assert stage.task_experts[0][0] in cgc.task_modules(0)


def _copy_per_stage_towers(model, single, k, pick):
    for level, stage_index in zip(model.body, range(3)):
        for t in range(k):
            pick(level, t).load_state_dict(torch.nn.Sequential(single.tower_stages(t)[stage_index]).state_dict())
    model.heads.load_state_dict(single.heads.state_dict())


@pytest.mark.parametrize("k", [2, 3])
def test_adatt_with_gates_on_the_own_unit_is_independent_towers(k):
    ts = tasks(k)
    single = build_model(SingleOptions(), LENET, ts, INPUT)
    adatt = build_model(AdaTTOptions(), LENET, ts, INPUT)
    assert len(adatt.body) == 3
    _copy_per_stage_towers(adatt, single, k, lambda level, t: level.task_experts[t][0])
    with torch.no_grad():
        for level in adatt.body:
            level.residual.weight.zero_()  # the residual adds the own unit again: off for the identity
            for t, gate in enumerate(level.gates):
                gate.bias.copy_(one_hot_logits(k, t))
    same_outputs(single, adatt, torch.randn(4, *INPUT))


def test_ple_without_shared_experts_is_single_task_and_with_them_passes_a_shared_stream():
    ts = tasks(2)
    single = build_model(SingleOptions(), LENET, ts, INPUT)
    ple = build_model(PLEOptions(task_experts=1, shared_experts=0), LENET, ts, INPUT)
    _copy_per_stage_towers(ple, single, 2, lambda level, t: level.task_experts[t][0])
    same_outputs(single, ple, torch.randn(4, *INPUT))
    ple = build_model(PLEOptions(levels=[2, 3]), LENET, ts, INPUT)
    assert [lvl.shared_gate is not None for lvl in ple.body] == [True, False]
    assert len(ple.body[0]([torch.randn(2, *INPUT)] * 2)) == 3


# --------------------------------------------------------------------------- MTAN


def test_mtan_with_masks_of_one_is_hard_sharing_of_the_whole_backbone():
    ts = tasks(2)
    split = build_model(SplitOptions(at=3), LENET, ts, INPUT)
    mtan = build_model(MTANOptions(), LENET, ts, INPUT)
    for level, stage in zip(mtan.body, split.trunk, strict=True):
        assert isinstance(level, MTANStage)
        level.stage.load_state_dict(stage.state_dict())
        level.attention = torch.nn.ModuleList(ConstantMask() for _ in ts)
    mtan.heads.load_state_dict(split.heads.state_dict())
    same_outputs(split, mtan, torch.randn(4, *INPUT))


# --------------------------------------------------------------------------- every design trains


DESIGNS = [GatedOptions(), MMoEOptions(experts=2), MMoEOptions(experts=2, levels=[1, 3]), CGCOptions(),
           PLEOptions(), AdaTTOptions(shared_experts=1), MTANOptions()]


@pytest.mark.parametrize("backbone", [LENET, TCDCNOptions(channels=[4, 4, 8, 8], hidden=8),
                                      SmallResNetOptions(channels=[4, 8], blocks=[1, 1], stem_channels=4)],
                         ids=["lenet", "tcdcn", "resnet_small"])
@pytest.mark.parametrize("options", DESIGNS, ids=lambda o: o.name + (str(o.levels) if getattr(o, "levels", None) else ""))
def test_every_design_builds_and_backpropagates_on_any_backbone(options, backbone):
    torch.manual_seed(0)
    ts = tasks(2)
    shape = (3, 40, 40) if isinstance(backbone, TCDCNOptions) else INPUT
    model = build_model(options, backbone, ts, shape)
    model.train()
    out = model(torch.randn(4, *shape))
    targets = {t.name: torch.randint(0, t.num_classes, (4,)) for t in ts}
    sum(model.loss_terms(out, targets).values()).backward()
    kinds = parameter_kinds(model)
    assert kinds["fusion"], "gates / attention are fusion parameters"
    gates = [m for m in model.modules() if isinstance(m, (ExpertStage, GatedMixer, MTANStage))]
    assert gates
    for t in range(2):
        assert model.task_modules(t)
