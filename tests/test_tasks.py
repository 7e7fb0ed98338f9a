"""Task kinds: heads, output shapes, losses, ensembles and the metric flags."""
import pytest
import torch

from taskloom.dense import DepthTask, NormalsTask, SegmentationTask
from taskloom.tasks import TASK_KINDS, BinaryTask, ClassificationTask, LandmarkTask, OrdinalExpectationTask, RegressionTask


def test_every_kind_is_registered_with_a_primary_metric_and_flags():
    assert set(TASK_KINDS) >= {"classification", "binary", "regression", "ordinal_expectation", "landmarks",
                               "segmentation", "normals", "depth"}
    for cls in TASK_KINDS.values():
        assert cls.primary in cls.higher_is_better
    assert not RegressionTask.higher_is_better["mae"] and BinaryTask.higher_is_better["average_precision"]
    assert NormalsTask.higher_is_better["within_30"] and not NormalsTask.higher_is_better["median_angle"]


@pytest.mark.parametrize("feature_shape", [(8,), (8, 3, 3)])
def test_vector_heads_give_the_documented_shapes(feature_shape):
    x = torch.randn(4, *feature_shape)
    assert BinaryTask("b").build_head(feature_shape)(x).shape == (4,)
    assert BinaryTask("b", 3).build_head(feature_shape)(x).shape == (4, 3)
    assert RegressionTask("r").build_head(feature_shape)(x).shape == (4,)
    assert RegressionTask("r", dims=2).build_head(feature_shape)(x).shape == (4, 2)
    assert OrdinalExpectationTask("a", 1, 116).build_head(feature_shape)(x).shape == (4, 116)
    assert LandmarkTask("l").build_head(feature_shape)(x).shape == (4, 5, 2)


def test_regression_head_starts_near_the_given_mean():
    head = RegressionTask("age", mean=33.0, scale=20.0).build_head((8,))
    torch.nn.init.zeros_(head[0].fc.weight)
    torch.nn.init.zeros_(head[0].fc.bias)
    assert head(torch.randn(3, 8)).tolist() == [33.0, 33.0, 33.0]
    assert "1.offset" in head.state_dict()  # saved with the checkpoint


def test_landmark_head_predicts_offsets_from_the_box_centre():
    head = LandmarkTask("l").build_head((8,))
    torch.nn.init.zeros_(head.linear.fc.weight)
    torch.nn.init.zeros_(head.linear.fc.bias)
    assert torch.equal(head(torch.randn(2, 8)), torch.full((2, 5, 2), 0.5))


def test_dense_heads_upsample_to_the_output_size():
    feat = torch.randn(2, 16, 5, 6)
    seg = SegmentationTask("s", 13, output_size=(20, 24))
    assert seg.build_head((16, 5, 6))(feat).shape == (2, 13, 20, 24)
    assert NormalsTask("n", output_size=(21, 23)).build_head((16, 5, 6))(feat).shape == (2, 3, 21, 23)
    assert DepthTask("d", output_size=(20, 24)).build_head((16, 5, 6))(feat).shape == (2, 1, 20, 24)
    with pytest.raises(ValueError, match="output_size"):
        DepthTask("d").build_head((16, 5, 6))
    with pytest.raises(ValueError, match="spatial feature map"):
        seg.build_head((100,))


def test_constructor_checks():
    with pytest.raises(ValueError):
        RegressionTask("r", loss="huber")
    with pytest.raises(ValueError):
        OrdinalExpectationTask("a", 5, 5)
    with pytest.raises(ValueError):
        NormalsTask("n", loss="dot")
    with pytest.raises(ValueError):
        SegmentationTask("s", 1)
    with pytest.raises(ValueError):
        LandmarkTask("l", 3, names=["a", "b"])


def test_ensemble_combination_averages_probabilities():
    a, b = torch.tensor([[10.0, -10.0]]), torch.tensor([[-10.0, 10.0]])
    for task in (ClassificationTask("c", 2), OrdinalExpectationTask("o", 0, 1)):
        assert torch.allclose(task.combine([a, b]).softmax(-1), torch.tensor([[0.5, 0.5]]), atol=1e-4)
    logit = BinaryTask("b").combine([torch.tensor([10.0]), torch.tensor([-10.0])])
    assert float(logit.sigmoid()) == pytest.approx(0.5, abs=1e-4)
    seg = SegmentationTask("s", 2, output_size=(1, 1))
    out = seg.combine([a.reshape(1, 2, 1, 1), b.reshape(1, 2, 1, 1)])
    assert torch.allclose(out.softmax(1).flatten(), torch.tensor([0.5, 0.5]), atol=1e-4)
    assert torch.equal(RegressionTask("r").combine([torch.tensor([1.0]), torch.tensor([3.0])]), torch.tensor([2.0]))


def test_losses_backpropagate_for_every_kind():
    cases = [
        (BinaryTask("b"), (8,), torch.tensor([1, 0])),
        (RegressionTask("r"), (8,), torch.tensor([3.0, 40.0])),
        (OrdinalExpectationTask("o", 1, 10), (8,), torch.tensor([3.0, 9.6])),
        (LandmarkTask("l"), (8,), torch.rand(2, 5, 2)),
        (SegmentationTask("s", 3, output_size=(4, 4)), (8, 2, 2), torch.randint(-1, 3, (2, 4, 4))),
        (NormalsTask("n", output_size=(4, 4)), (8, 2, 2), torch.nn.functional.normalize(torch.randn(2, 3, 4, 4), dim=1)),
        (DepthTask("d", output_size=(4, 4)), (8, 2, 2), torch.rand(2, 1, 4, 4)),
    ]
    for task, shape, target in cases:
        head = task.build_head(shape)
        loss = task.loss(head(torch.randn(2, *shape)), target)
        loss.backward()
        assert torch.isfinite(loss), task
        assert all(p.grad is not None for p in head.parameters()), task


@pytest.mark.parametrize("task, output, target", [
    (SegmentationTask("s", 3, output_size=(2, 2)), torch.randn(2, 3, 2, 2), torch.full((2, 2, 2), -1)),
    (NormalsTask("n", output_size=(2, 2)), torch.randn(2, 3, 2, 2), torch.zeros(2, 3, 2, 2)),
    (DepthTask("d", output_size=(2, 2)), torch.randn(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)),
])
def test_dense_batch_without_labelled_pixels_is_zero_with_graph(task, output, target):
    output.requires_grad_(True)
    loss = task.loss(output, target)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(output.grad, torch.zeros_like(output))
    assert task.labelled(target).all()  # missing targets of dense kinds are per pixel


def test_a_new_kind_gets_the_missing_label_handling_from_the_base_class():
    """A kind implements only the loss over labelled elements; Task.loss masks and returns an
    exact, differentiable 0 for a batch without labels (NaN marks a missing float target)."""
    from taskloom.tasks import Task

    class Squared(Task):
        def labelled_loss(self, output, target, mask):
            return (output[mask] - target[mask]).pow(2).mean()

    task = Squared("sq")
    out = torch.tensor([1.0, 2.0, 4.0], requires_grad=True)
    assert task.loss(out, torch.tensor([0.0, float("nan"), 2.0])).item() == pytest.approx(2.5)
    loss = task.loss(out, torch.full((3,), float("nan")))
    assert loss.item() == 0.0 and loss.requires_grad
    assert task.labelled(torch.tensor([1, 2])).all()  # integer targets are always present
