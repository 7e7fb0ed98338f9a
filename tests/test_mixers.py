import pytest
import torch

from taskloom.mixers import CrossStitch, convex_init


def test_convex_init_generalises_to_k_tasks():
    m = convex_init(3, 0.8)
    assert torch.allclose(m.diagonal(), torch.full((3,), 0.8))
    assert torch.allclose(m.sum(1), torch.ones(3))
    assert m[0, 1] == pytest.approx(0.1)
    two = convex_init(2, 0.9, 0.1)
    assert torch.equal(two, torch.tensor([[0.9, 0.1], [0.1, 0.9]]))


@pytest.mark.parametrize("granularity", ["channel", "layer"])
@pytest.mark.parametrize("shape", [(4, 6, 5, 5), (4, 6)])
def test_cross_stitch_matches_the_formula(granularity, shape):
    k, c = 3, shape[1]
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


def test_identity_alpha_is_exactly_the_independent_towers():
    unit = CrossStitch(3, 4, "channel", alpha_same=1.0, alpha_diff=0.0)
    xs = [torch.randn(2, 4, 3, 3) for _ in range(3)]
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
