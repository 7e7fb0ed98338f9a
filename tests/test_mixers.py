import pytest
import torch
from torch import Tensor, nn

from taskloom.mixers import NDDR, CrossShortcut, CrossStitch, Mixer, Sluice, apply_blocks, convex_init


def test_convex_init_generalises_to_k_tasks():
    m = convex_init(3, 0.8)
    assert torch.allclose(m.diagonal(), torch.full((3,), 0.8))
    assert torch.allclose(m.sum(1), torch.ones(3))
    assert m[0, 1] == pytest.approx(0.1)
    two = convex_init(2, 0.9, 0.1)
    assert torch.equal(two, torch.tensor([[0.9, 0.1], [0.1, 0.9]]))


@pytest.mark.parametrize("k", [2, 3, 5])  # K = 2 has its own kernel (scaled adds), K >= 3 the einsum
@pytest.mark.parametrize("granularity", ["channel", "layer"])
@pytest.mark.parametrize("shape", [(4, 6, 5, 5), (4, 6)])
def test_cross_stitch_matches_the_formula(k, granularity, shape):
    c = shape[1]
    unit = CrossStitch(k, c, granularity).double()
    with torch.no_grad():
        unit.alpha.copy_(torch.randn_like(unit.alpha))
    xs = [torch.randn(*shape, dtype=torch.float64) for _ in range(k)]
    ys = unit(xs)
    alpha = unit.matrix()  # (C, K, K)
    for t in range(k):
        expected = torch.zeros_like(xs[0])
        for s in range(k):
            scale = alpha[:, t, s].reshape(1, c, *([1] * (len(shape) - 2)))
            expected += scale * xs[s]
        assert torch.allclose(ys[t], expected, atol=1e-12)


@pytest.mark.parametrize("k", [2, 3])
def test_identity_alpha_is_exactly_the_independent_towers(k):
    unit = CrossStitch(k, 4, "channel", alpha_same=1.0, alpha_diff=0.0)
    xs = [torch.randn(2, 4, 3, 3) for _ in range(k)]
    for x, y in zip(xs, unit(xs)):
        assert torch.equal(x, y)


def test_each_task_gets_its_own_combination():
    # REFERENCE §7: a public port fed every task the same mixed tensor.
    unit = CrossStitch(2, 3, "layer")
    a, b = torch.randn(2, 3), torch.randn(2, 3)
    ya, yb = unit([a, b])
    assert torch.allclose(ya, 0.9 * a + 0.1 * b)
    assert torch.allclose(yb, 0.1 * a + 0.9 * b)
    assert not torch.allclose(ya, yb)


def test_channel_unit_with_equal_channels_equals_layer_unit():
    layer = CrossStitch(2, 5, "layer")
    channel = CrossStitch(2, 5, "channel")
    with torch.no_grad():
        layer.alpha.copy_(torch.tensor([[0.7, 0.4], [0.2, 1.1]]))
        channel.alpha.copy_(layer.alpha.expand(5, 2, 2))
    xs = [torch.randn(3, 5, 4, 4) for _ in range(2)]
    for y1, y2 in zip(layer(xs), channel(xs)):
        assert torch.allclose(y1, y2, atol=1e-6)


def test_alpha_receives_gradient():
    unit = CrossStitch(2, 3)
    ys = unit([torch.randn(2, 3, requires_grad=True), torch.randn(2, 3)])
    (ys[0].sum() + 2 * ys[1].sum()).backward()
    assert unit.alpha.grad is not None and unit.alpha.grad.abs().sum() > 0


# --------------------------------------------------------------------------- one abstraction



def _randomise(module: nn.Module, scale: float = 0.5) -> nn.Module:
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * scale)
    return module


def _inputs(k, shape=(3, 8, 4, 4), dtype=torch.float64):
    return [torch.randn(*shape, dtype=dtype) for _ in range(k)]


LINEAR_MIXERS = [
    lambda k, c: CrossStitch(k, c, "layer"),
    lambda k, c: CrossStitch(k, c, "channel"),
    lambda k, c: NDDR(k, c, batch_norm=False, activation=False),
    lambda k, c: NDDR(k, c, init="xavier", batch_norm=False, activation=False),
    lambda k, c: Sluice(k, c, 1),
    lambda k, c: Sluice(k, c, 2),
    lambda k, c: Sluice(k, c, 4),
    lambda k, c: CrossShortcut(k, c, "zero"),
    lambda k, c: CrossShortcut(k, c, "identity"),
    lambda k, c: CrossShortcut(k, c, "scale"),
    lambda k, c: CrossShortcut(k, c, "conv1x1"),
]


@pytest.mark.parametrize("make", LINEAR_MIXERS)
@pytest.mark.parametrize("k", [2, 3])
def test_every_linear_mixer_is_the_generic_formula_with_its_blocks(make, k):
    # y_t = sum_s A[t][s] x_s with A = mixer.blocks(): the single abstraction (REFERENCE §0).
    unit = _randomise(make(k, 8)).double()
    xs = _inputs(k)
    for y, expected in zip(unit(xs), apply_blocks(unit.blocks(), xs)):
        assert torch.allclose(y, expected, atol=1e-10)
    flat = _inputs(k, (5, 8))
    for y, expected in zip(unit(flat), apply_blocks(unit.blocks(), flat)):
        assert torch.allclose(y, expected, atol=1e-10)


def _nddr_from_blocks(blocks: Tensor, **kw) -> NDDR:
    k, _, c, _ = blocks.shape
    unit = NDDR(k, c, **kw).double()
    with torch.no_grad():
        for t, conv in enumerate(unit.convs):
            conv.weight.copy_(torch.cat([blocks[t, s] for s in range(k)], 1)[:, :, None, None])
    return unit


@pytest.mark.parametrize("k", [2, 3])
def test_nddr_with_zero_off_diagonal_and_tied_diagonals_is_layer_cross_stitch(k):
    # Gao et al. §2: off-diagonal elements fixed at 0 and each diagonal block tied to one value.
    c = 6
    stitch = _randomise(CrossStitch(k, c, "layer")).double()
    blocks = torch.einsum("ts,dc->tsdc", stitch.alpha.detach(), torch.eye(c, dtype=torch.float64))
    nddr = _nddr_from_blocks(blocks, batch_norm=False, activation=False)
    xs = _inputs(k, (3, c, 5, 5))
    for a, b in zip(stitch(xs), nddr(xs)):
        assert torch.allclose(a, b, atol=1e-10)
    # with its BN and ReLU, NDDR is exactly ReLU(BN(cross-stitch)) per task
    full = _nddr_from_blocks(blocks)
    for t, (a, b) in enumerate(zip(stitch(xs), full(xs))):
        assert torch.allclose(torch.relu(full.norms[t](a)), b, atol=1e-10)


@pytest.mark.parametrize("k", [2, 3])
def test_nddr_with_diagonal_blocks_is_channel_cross_stitch(k):
    c = 5
    stitch = _randomise(CrossStitch(k, c, "channel")).double()
    nddr = _nddr_from_blocks(torch.diag_embed(stitch.alpha.detach().permute(1, 2, 0)), batch_norm=False, activation=False)
    xs = _inputs(k, (2, c, 3, 3))
    for a, b in zip(stitch(xs), nddr(xs)):
        assert torch.allclose(a, b, atol=1e-10)


def test_nddr_diagonal_and_xavier_init():
    unit = NDDR(2, 4)
    blocks = unit.blocks()
    assert torch.allclose(blocks[0, 0], 0.9 * torch.eye(4)) and torch.allclose(blocks[0, 1], 0.1 * torch.eye(4))
    assert torch.allclose(blocks[1, 1], 0.9 * torch.eye(4)) and torch.allclose(blocks[1, 0], 0.1 * torch.eye(4))
    three = NDDR(3, 4, alpha=0.5, beta=0.2).blocks()
    assert torch.allclose(three[2, 0], 0.2 * torch.eye(4)) and torch.allclose(three[2, 2], 0.5 * torch.eye(4))
    xavier = NDDR(2, 64, init="xavier").blocks()
    bound = (6 / (2 * 64 + 64)) ** 0.5
    assert xavier.abs().max() <= bound and xavier.std() > bound / 3
    # one 1x1 conv per task: K * (K*C) * C weights and 2C BN parameters per task
    unit = NDDR(3, 7)
    assert sum(p.numel() for p in unit.parameters()) == 3 * (3 * 7) * 7 + 3 * 2 * 7
    assert all(conv.bias is None for conv in unit.convs)


def test_sluice_with_one_subspace_is_layer_cross_stitch():
    k, c = 3, 6
    stitch = _randomise(CrossStitch(k, c, "layer")).double()
    sluice = Sluice(k, c, subspaces=1).double()
    with torch.no_grad():
        sluice.alpha.copy_(stitch.alpha)
    xs = _inputs(k, (2, c, 3, 3))
    for a, b in zip(stitch(xs), sluice(xs)):
        assert torch.allclose(a, b, atol=1e-10)
    # and the default inits agree
    assert torch.equal(Sluice(k, c, 1).alpha, CrossStitch(k, c, "layer").alpha)


def test_sluice_mixes_subspaces_by_the_formula():
    k, s, c = 2, 2, 4
    unit = _randomise(Sluice(k, c, s)).double()
    xs = _inputs(k, (3, c))
    ys = unit(xs)
    a = unit.alpha.detach()
    for t in range(k):
        for i in range(s):
            expected = sum(a[t * s + i, u * s + j] * xs[u][:, j * 2:(j + 1) * 2] for u in range(k) for j in range(s))
            assert torch.allclose(ys[t][:, i * 2:(i + 1) * 2], expected, atol=1e-12)
    init = Sluice(2, 4, 2).alpha
    assert torch.allclose(init, torch.kron(convex_init(2, 0.9), torch.eye(2)))


def test_sluice_orthogonality_penalty():
    unit = Sluice(2, 4, 2, orthogonality=0.5)
    unit.train()
    x = torch.randn(6, 4, 3, 3)
    unit([x, x.clone()])
    g = x.permute(0, 2, 3, 1).reshape(-1, 4)
    term = (g[:, :2].T @ g[:, 2:] / g.shape[0]).pow(2).sum()
    assert torch.allclose(unit.penalty()["sluice_orthogonality"], 0.5 * 2 * term)
    # orthogonal subspaces give zero
    z = torch.zeros(2, 4, 1, 1)
    z[0, :2] = 1.0
    z[1, 2:] = 1.0
    unit([z, z])
    assert unit.penalty()["sluice_orthogonality"].abs() < 1e-12
    assert Sluice(2, 4, 2).penalty() == {}
    with pytest.raises(ValueError, match="divide"):
        Sluice(2, 5, 2)


def test_cross_shortcut_kinds_and_parameter_counts():
    k, c = 3, 5
    xs = _inputs(k, (2, c, 2, 2))
    zero, ident = CrossShortcut(k, c, "zero"), CrossShortcut(k, c, "identity")
    assert sum(p.numel() for p in zero.parameters()) == 0 == sum(p.numel() for p in ident.parameters())
    for x, y in zip(xs, zero(xs)):
        assert torch.equal(x, y)
    for y in ident(xs):
        assert torch.allclose(y, xs[0] + xs[1] + xs[2])
    scale = CrossShortcut(k, c, "scale")
    assert scale.weight.shape == (k * (k - 1), c)  # only cross connections carry weights
    conv = CrossShortcut(k, c, "conv1x1")
    assert conv.weight.shape == (k * (k - 1), c, c)
    blocks = scale.blocks()
    for t in range(k):
        assert torch.equal(blocks[t, t], torch.eye(c))  # W^(t->t) = I, fixed
    with pytest.raises(ValueError, match="cross must be one of"):
        CrossShortcut(2, 4, "sclae")


def test_cross_shortcut_scale_init_follows_he():
    # REFERENCE §3: zero-mean Gaussian, std sqrt(2 / n), n the mean of input and output units (C).
    c = 256
    w = CrossShortcut(4, c, "scale").weight.detach()
    assert abs(w.mean()) < 0.01
    assert w.std() == pytest.approx((2 / c) ** 0.5, rel=0.05)


@pytest.mark.parametrize("make", [
    lambda k, c: CrossStitch(k, c, "channel", alpha_same=1.0, alpha_diff=0.0),
    lambda k, c: CrossStitch(k, c, "layer", alpha_same=1.0, alpha_diff=0.0),
    lambda k, c: NDDR(k, c, alpha=1.0, beta=0.0, batch_norm=False, activation=False),
    lambda k, c: Sluice(k, c, 2, alpha_same=1.0, alpha_diff=0.0),
    lambda k, c: CrossShortcut(k, c, "zero"),
])
def test_every_mixer_at_its_independent_setting_is_the_identity(make):
    k, c = 3, 4
    unit = make(k, c)
    xs = _inputs(k, (2, c, 3, 3), torch.float32)
    for x, y in zip(xs, unit(xs)):
        assert torch.allclose(x, y, atol=1e-6)
    assert isinstance(unit, Mixer) and unit.param_kind == "fusion"
