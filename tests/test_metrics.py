"""Every metric against values computed by hand on tiny tensors."""
import math

import pytest
import torch

from taskloom.metrics import AngleErrors, ConfusionDerived, DepthErrors, LandmarkErrors, MedianAbsoluteError
from taskloom.dense import DepthTask, NormalsTask, SegmentationTask
from taskloom.tasks import BinaryTask, ClassificationTask, LandmarkTask, OrdinalExpectationTask, RegressionTask


def _face(eyes):
    (lx, ly), (rx, ry) = eyes
    return torch.tensor([[lx, ly], [rx, ry], [0.5, 0.6], [0.35, 0.8], [0.65, 0.8]], dtype=torch.float64)


def _landmark_case():
    t1 = _face(((0.3, 0.4), (0.7, 0.4)))  # inter-ocular distance 0.4
    t2 = _face(((0.25, 0.5), (0.75, 0.5)))  # inter-ocular distance 0.5
    p1, p2 = t1.clone(), t2.clone()
    p1[2] += torch.tensor([0.06, 0.08])  # nose off by 0.1: 0.25 of iod (fail), 0.10 of box (fail)
    p2[0] += torch.tensor([0.02, 0.0])  # left eye off by 0.02: 0.04 of iod, 0.02 of box (no fail)
    return torch.stack([p1, p2]), torch.stack([t1, t2])


def test_landmark_errors_by_hand():
    preds, target = _landmark_case()
    m = LandmarkErrors()
    m.update(preds[:1], target[:1])  # two updates accumulate like one
    m.update(preds[1:], target[1:])
    r = m.compute()
    assert r["error_iod_per_landmark"].tolist() == pytest.approx([0.02, 0, 0.125, 0, 0], abs=1e-6)
    assert r["error_box_per_landmark"].tolist() == pytest.approx([0.01, 0, 0.05, 0, 0], abs=1e-6)
    assert float(r["mean_error_iod"]) == pytest.approx(0.029, abs=1e-6)
    assert float(r["mean_error_box"]) == pytest.approx(0.012, abs=1e-6)
    assert r["failure_iod_per_landmark"].tolist() == [0, 0, 0.5, 0, 0]
    assert r["failure_box_per_landmark"].tolist() == [0, 0, 0.5, 0, 0]
    assert float(r["failure_iod"]) == pytest.approx(0.1) and float(r["failure_box"]) == pytest.approx(0.1)
    # per image: mean error over landmarks 0.05 / 0.008 (iod) -> no image fails
    assert float(r["failure_image_iod"]) == 0 and float(r["failure_image_box"]) == 0


def test_landmark_errors_flat_input_perfect_and_worst():
    _, target = _landmark_case()
    m = LandmarkErrors()
    m.update(target.reshape(2, 10), target.reshape(2, 10))  # interleaved x1, y1, x2, ... layout
    r = m.compute()
    assert float(r["mean_error_iod"]) == 0 and float(r["failure_iod"]) == 0 and float(r["failure_box"]) == 0
    m = LandmarkErrors()
    m.update(target + 1.0, target)
    r = m.compute()
    assert float(r["mean_error_box"]) == pytest.approx(math.sqrt(2))
    assert float(r["failure_iod"]) == 1 and float(r["failure_box"]) == 1 and float(r["failure_image_box"]) == 1


def test_landmark_errors_thresholds_are_configurable_and_zero_iod_is_an_error():
    preds, target = _landmark_case()
    m = LandmarkErrors(iod_threshold=0.3, box_threshold=0.015)
    m.update(preds, target)
    r = m.compute()
    assert r["failure_iod_per_landmark"].tolist() == [0, 0, 0, 0, 0]
    assert r["failure_box_per_landmark"].tolist() == [0.5, 0, 0.5, 0, 0]
    bad = target.clone()
    bad[0, 1] = bad[0, 0]
    with pytest.raises(ValueError, match="inter-ocular"):
        LandmarkErrors().update(preds, bad)


def test_landmark_task_loss_and_summary():
    task = LandmarkTask("landmarks")
    preds, target = _landmark_case()
    # squared error summed over the 10 coordinates, mean over images: (0.1^2 + 0.02^2) / 2
    assert float(task.loss(preds.float(), target.float())) == pytest.approx((0.01 + 0.0004) / 2, rel=1e-5)
    m = task.metrics()
    m.update(preds.float(), target.float())
    values = task.summarize(m.compute())
    assert values["error_iod_per_landmark"] == pytest.approx([0.02, 0, 0.125, 0, 0], abs=1e-6)
    assert values["mean_error_iod"] == pytest.approx(0.029, abs=1e-6)
    assert task.names == ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")
    assert task.primary in task.higher_is_better and not task.higher_is_better[task.primary]


def test_median_absolute_error_by_hand():
    m = MedianAbsoluteError()
    m.update(torch.tensor([1.0, 2.0]), torch.zeros(2))
    m.update(torch.tensor([-3.0, 10.0]), torch.zeros(2))
    assert float(m.compute()) == pytest.approx(2.5, abs=0.006)  # median of 1, 2, 3, 10
    m.update(torch.tensor([7.0]), torch.zeros(1))
    assert float(m.compute()) == pytest.approx(3.0, abs=0.006)
    with pytest.warns(UserWarning):  # torchmetrics: compute before update
        assert math.isnan(float(MedianAbsoluteError().compute()))


def test_ordinal_expectation_by_hand():
    task = OrdinalExpectationTask("age", low=0, high=2)
    uniform = torch.zeros(2, 3)  # expected value 1
    confident = torch.tensor([[0.0, 0.0, 100.0]])  # expected value 2
    m = task.metrics()
    m.update(torch.cat([uniform, confident]), torch.tensor([3.0, 1.0, 2.0]))
    r = task.summarize(m.compute())
    assert r["mae"] == pytest.approx(2 / 3, abs=1e-5)  # errors 2, 0, 0
    assert r["median_ae"] == pytest.approx(0.0, abs=0.006)
    # cross-entropy on the rounded, clipped target bin: uniform -> log 3
    assert float(task.loss(uniform, torch.tensor([5.0, 0.4]))) == pytest.approx(math.log(3), rel=1e-6)
    assert task.target_bins(torch.tensor([-2.0, 0.6, 1.4, 9.0])).tolist() == [0, 1, 1, 2]
    assert float(confident.softmax(-1) @ task.values) == pytest.approx(2.0)  # the expected value


def test_regression_mae_rmse_by_hand():
    task = RegressionTask("y", loss="mse")
    m = task.metrics()
    m.update(torch.tensor([1.0, 2.0, 4.0]), torch.tensor([1.0, 4.0, 1.0]))
    r = task.summarize(m.compute())
    assert r["mae"] == pytest.approx(5 / 3) and r["rmse"] == pytest.approx(math.sqrt(13 / 3), rel=1e-6)
    assert float(task.loss(torch.tensor([1.0, 2.0, 4.0]), torch.tensor([1, 4, 1]))) == pytest.approx(13 / 3)
    assert float(RegressionTask("y", loss="l1").loss(torch.tensor([1.0, 2.0, 4.0]), torch.tensor([1.0, 4.0, 1.0]))) == pytest.approx(5 / 3)


def test_binary_accuracy_and_average_precision_by_hand():
    task = BinaryTask("b")
    m = task.metrics()
    m.update(torch.tensor([2.0, -1.0, 0.5, -3.0]), torch.tensor([1, 0, 0, 1]))
    r = task.summarize(m.compute())
    assert r["accuracy"] == pytest.approx(0.5)
    assert r["average_precision"] == pytest.approx((1 + 2 / 4) / 2)  # positives at ranks 1 and 4
    perfect = task.metrics()
    perfect.update(torch.tensor([5.0, -5.0]), torch.tensor([1.0, 0.0]))
    assert task.summarize(perfect.compute()) == {"accuracy": 1.0, "average_precision": 1.0}
    multi = BinaryTask("m", num_labels=2)
    m = multi.metrics()
    m.update(torch.tensor([[2.0, -2.0], [-1.0, 3.0]]), torch.tensor([[1, 1], [0, 1]]))
    r = multi.summarize(m.compute())
    assert r["accuracy"] == pytest.approx(3 / 4)
    assert r["average_precision"] == pytest.approx(1.0)  # label 0: perfect; label 1: only positives


def test_segmentation_scores_by_hand_with_ignored_pixels():
    target = torch.tensor([[[0, 0, 0], [1, 1, -1]]])
    labels = torch.tensor([[[0, 0, 1], [1, 2, 0]]])  # the ignored pixel's prediction counts nowhere
    logits = torch.nn.functional.one_hot(labels, 4).permute(0, 3, 1, 2).float()
    task = SegmentationTask("seg", num_classes=4, ignore_index=-1, output_size=(2, 3))
    m = task.metrics()
    m.update(logits, target)
    r = task.summarize(m.compute())
    # IoU: class 0 2/3, class 1 1/3, class 2 0 (predicted, never true), class 3 absent: not averaged
    assert r["miou"] == pytest.approx(1 / 3, abs=1e-6)
    assert r["pixel_accuracy"] == pytest.approx(3 / 5)
    assert r["fwiou"] == pytest.approx(3 / 5 * 2 / 3 + 2 / 5 * 1 / 3, abs=1e-6)
    perfect = ConfusionDerived(4, "miou", ignore_index=-1)
    perfect.update(target.clamp_min(0), target)
    assert float(perfect.compute()) == 1.0
    worst = ConfusionDerived(4, "pixel_accuracy", ignore_index=-1)
    worst.update(torch.full_like(target, 3), target)
    assert float(worst.compute()) == 0.0


def test_segmentation_loss_ignores_pixels_and_survives_an_unlabelled_batch():
    task = SegmentationTask("seg", num_classes=2, ignore_index=-1, output_size=(1, 2))
    logits = torch.tensor([[[[0.0, 5.0]], [[0.0, -5.0]]]])  # pixel 0 uniform, pixel 1 confident class 0
    target = torch.tensor([[[1, -1]]])
    assert float(task.loss(logits, target)) == pytest.approx(math.log(2))
    loss = task.loss(logits.requires_grad_(), torch.full((1, 1, 2), -1))
    assert float(loss.detach()) == 0.0
    loss.backward()


def _normals_case():
    s20, c20 = math.sin(math.radians(20)), math.cos(math.radians(20))
    pairs = [  # (prediction, target)
        ((0, 0, 2), (0, 0, 1)),  # 0 degrees (length does not matter)
        ((c20, s20, 0), (1, 0, 0)),  # 20
        ((1, 1, 0), (1, 0, 0)),  # 45
        ((0, 1, 0), (1, 0, 0)),  # 90
        ((0, 0, 0), (0, 0, 1)),  # zero-length prediction: 90
        ((1, 0, 0), (0, 0, 0)),  # zero-length target: missing ground truth, skipped
    ]
    preds = torch.tensor([p for p, _ in pairs], dtype=torch.float32).T.reshape(1, 3, 1, 6)
    target = torch.tensor([t for _, t in pairs], dtype=torch.float32).T.reshape(1, 3, 1, 6)
    return preds, target


def test_normal_angle_errors_by_hand():
    preds, target = _normals_case()
    task = NormalsTask("normals", output_size=(1, 6))
    m = task.metrics()
    m.update(preds, target)
    r = task.summarize(m.compute())
    assert r["mean_angle"] == pytest.approx((0 + 20 + 45 + 90 + 90) / 5, abs=1e-4)
    assert r["median_angle"] == pytest.approx(45, abs=0.006)
    assert r["within_11.25"] == pytest.approx(20) and r["within_22.5"] == pytest.approx(40)
    assert r["within_30"] == pytest.approx(40)
    perfect = AngleErrors()
    perfect.update(target, target)
    assert float(perfect.compute()["mean_angle"]) == pytest.approx(0, abs=1e-3)
    assert float(perfect.compute()["within_11.25"]) == 100
    worst = AngleErrors()
    worst.update(-target, target)
    assert float(worst.compute()["mean_angle"]) == pytest.approx(180, abs=1e-3)


def test_normals_losses_skip_missing_pixels():
    preds, target = _normals_case()
    cos = torch.tensor([1, math.cos(math.radians(20)), math.cos(math.radians(45)), 0, 0])
    assert float(NormalsTask("n").loss(preds, target)) == pytest.approx(float((1 - cos).mean()), abs=1e-5)
    l2 = 2 - 2 * cos
    l2[-1] = 1.0  # a zero-length prediction normalises to 0: |0 - t|^2 = 1
    assert float(NormalsTask("n", loss="l2").loss(preds, target)) == pytest.approx(float(l2.mean()), abs=1e-5)
    loss = NormalsTask("n").loss(preds, torch.zeros_like(target))
    assert float(loss) == 0.0


def test_depth_errors_by_hand():
    target = torch.tensor([[[[2.0, 0.0], [4.0, 1.0]]]])  # 0: missing depth
    preds = torch.tensor([[[[3.0, 5.0], [2.0, 1.0]]]])
    task = DepthTask("depth", output_size=(2, 2))
    m = task.metrics()
    m.update(preds, target)
    r = task.summarize(m.compute())
    assert r["abs_error"] == pytest.approx(1.0) and r["rel_error"] == pytest.approx(1 / 3)
    assert float(task.loss(preds, target)) == pytest.approx(1.0)
    perfect = DepthErrors()
    perfect.update(target, target)
    assert float(perfect.compute()["abs_error"]) == 0.0


def test_classification_metrics_by_hand():
    task = ClassificationTask("c", 3)
    m = task.metrics()
    logits = torch.eye(3)[[0, 1, 1, 2]]
    m.update(logits, torch.tensor([0, 1, 2, 2]))
    r = task.summarize(m.compute())
    assert r["accuracy"] == pytest.approx(3 / 4)
    assert r["per_class_accuracy"] == pytest.approx([1, 1, 0.5])
    assert r["macro_accuracy"] == pytest.approx(2.5 / 3)
