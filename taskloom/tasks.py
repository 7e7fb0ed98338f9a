"""Tasks: what is predicted, with which head, loss and metrics.

A :class:`Task` knows how to build its output head on top of a feature map of a given shape,
its loss, its metrics and, for each metric, whether higher is better (needed for delta_m and
model selection). New task kinds subclass :class:`Task` and register in :data:`TASK_KINDS`.
This module holds the base class and the per-sample kinds; the dense (per-pixel) kinds are in
:mod:`taskloom.dense`.

**Missing targets** (partially labelled data). Any sample may lack the target of any task; one
convention per kind marks it: ``classification`` and ``binary``: a negative label (``-1``);
``regression``, ``ordinal_expectation`` and ``landmarks``: ``NaN`` (any NaN coordinate marks the
whole sample). Dense kinds keep their per-pixel conventions (``ignore_index``, zero normals,
zero depth). :meth:`Task.loss` handles missing targets once for every kind: it averages over
the labelled part of the batch (:meth:`Task.loss_mask`) and is exactly 0 (with a graph) when a
batch has none; :meth:`Task.labelled` gives the per-sample mask the evaluator uses to update
metrics with labelled samples only and to count them.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    import torchmetrics

TASK_KINDS: dict[str, type[Task]] = {}


def register_task_kind(cls: type[Task]) -> type[Task]:
    TASK_KINDS[cls.kind] = cls
    return cls


class Task:
    """One prediction target of a multi-task network."""

    kind: ClassVar[str] = ""
    primary: ClassVar[str] = ""
    """The metric used for model selection and delta_m."""
    higher_is_better: ClassVar[dict[str, bool]] = {}
    empty_mask_safe: ClassVar[bool] = False
    """True when :meth:`labelled_loss` itself returns 0 (connected) for an empty mask, with no
    shape that depends on the data. :meth:`loss` then skips its ``mask.any()`` check, which
    reads the mask back from the device and makes every training step wait for it."""

    def __init__(self, name: str):
        self.name = name

    def build_head(self, feature_shape: tuple[int, ...]) -> nn.Module:
        """A head mapping features of ``feature_shape`` (without batch) to this task's output."""
        raise NotImplementedError

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        """The loss averaged over the labelled part of the batch; exactly 0 and connected to the
        graph (no signal, not NaN) when nothing in the batch is labelled. Kinds implement
        :meth:`labelled_loss` and, where needed, :meth:`loss_target` and :meth:`loss_mask`."""
        target = self.loss_target(output, target)
        mask = self.loss_mask(target)
        if not self.empty_mask_safe and not mask.any():
            return output.sum() * 0.0
        return self.labelled_loss(output, target, mask)

    def loss_target(self, output: Tensor, target: Tensor) -> Tensor:
        """The target as :meth:`labelled_loss` takes it (dtype, shape). Default: unchanged."""
        return target

    def loss_mask(self, target: Tensor) -> Tensor:
        """Boolean mask of the target elements that carry a label (samples, labels or pixels).
        Default: :meth:`labelled`, one per sample."""
        return self.labelled(target)

    def labelled_loss(self, output: Tensor, target: Tensor, mask: Tensor) -> Tensor:
        """The loss over the elements ``mask`` marks (at least one, unless :attr:`empty_mask_safe`)."""
        raise NotImplementedError

    def labelled(self, target: Tensor) -> Tensor:
        """Boolean mask ``(N,)`` of the samples whose target is present (see the module
        docstring for each kind's "missing" marker). Default: a float target with any ``NaN``
        is missing; integer targets are always present."""
        if not target.is_floating_point():
            return torch.ones(len(target), dtype=torch.bool, device=target.device)
        return ~torch.isnan(target.reshape(len(target), -1)).any(1)

    def missing_like(self, target: Tensor) -> Tensor:
        """A target of the same shape as ``target`` (one sample or a batch) marked "missing"
        (default ``NaN``, float). Used to drop labels and to mix datasets."""
        return torch.full(target.shape, float("nan"), dtype=target.dtype if target.is_floating_point() else torch.float32)

    def metrics(self) -> torchmetrics.MetricCollection:
        """A fresh collection of this task's metrics (synced across processes by torchmetrics)."""
        raise NotImplementedError

    def combine(self, outputs: list[Tensor]) -> Tensor:
        """Combine the outputs of ensemble members into one prediction."""
        return torch.stack(outputs).mean(0)

    def summarize(self, values: dict[str, Tensor]) -> dict[str, float | list[float]]:
        """Turn computed metric tensors into JSON-ready numbers."""
        return {k: (v.tolist() if v.ndim else float(v)) for k, v in values.items()}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


def mean_of_softmax(outputs: list[Tensor], dim: int = -1) -> Tensor:
    """Ensemble of logits: the log of the members' mean probabilities (not the mean logit); the
    log keeps argmax and cross-entropy meaningful."""
    probs = torch.stack([o.softmax(dim) for o in outputs]).mean(0)
    return probs.clamp_min(1e-12).log()


class _FlatLinear(nn.Module):
    """Global average pool (for feature maps), flatten, linear."""

    def __init__(self, feature_shape: tuple[int, ...], out_features: int):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1) if len(feature_shape) == 3 else nn.Identity()
        self.fc = nn.Linear(feature_shape[0], out_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.pool(x), 1))


@register_task_kind
class ClassificationTask(Task):
    """Single-label classification: softmax cross-entropy; top-1, top-5, macro and per-class
    accuracy (per-class feeds the "data-starved" view of the cross-stitch paper)."""

    kind = "classification"
    empty_mask_safe = True
    primary = "accuracy"
    higher_is_better = {"accuracy": True, "top5": True, "macro_accuracy": True, "per_class_accuracy": True}

    def __init__(self, name: str, num_classes: int):
        super().__init__(name)
        if num_classes < 2:
            raise ValueError(f"task {name!r}: a classification task needs at least 2 classes")
        self.num_classes = num_classes

    def build_head(self, feature_shape: tuple[int, ...]) -> nn.Module:
        return _FlatLinear(feature_shape, self.num_classes)

    def labelled(self, target: Tensor) -> Tensor:
        """Labels ``< 0`` (``-1``) are missing."""
        return target.reshape(len(target)) >= 0

    def missing_like(self, target: Tensor) -> Tensor:
        return torch.full(target.shape, -1, dtype=torch.int64)

    def loss_target(self, output: Tensor, target: Tensor) -> Tensor:
        return target.long()

    def labelled_loss(self, output: Tensor, target: Tensor, mask: Tensor) -> Tensor:
        total = F.cross_entropy(output, target.clamp_min(-1), ignore_index=-1, reduction="sum")
        return total / mask.sum().clamp_min(1)

    def combine(self, outputs: list[Tensor]) -> Tensor:
        return mean_of_softmax(outputs)

    def metrics(self) -> torchmetrics.MetricCollection:
        import torchmetrics
        from torchmetrics.classification import MulticlassAccuracy

        k = self.num_classes
        collection = {
            "accuracy": MulticlassAccuracy(k, average="micro"),
            "macro_accuracy": MulticlassAccuracy(k, average="macro"),
            "per_class_accuracy": MulticlassAccuracy(k, average="none"),
        }
        if k > 5:
            collection["top5"] = MulticlassAccuracy(k, top_k=5, average="micro")
        return torchmetrics.MetricCollection(collection)


class _Affine(nn.Module):
    """``offset + scale * x`` with fixed (non-learned) offset and scale, saved in the state dict."""

    def __init__(self, offset: float | Tensor, scale: float | Tensor):
        super().__init__()
        self.register_buffer("offset", torch.as_tensor(offset, dtype=torch.float32).clone())
        self.register_buffer("scale", torch.as_tensor(scale, dtype=torch.float32).clone())

    def forward(self, x: Tensor) -> Tensor:
        return self.offset + self.scale * x


@register_task_kind
class BinaryTask(Task):
    """``num_labels`` independent binary labels (1: plain binary; > 1: multilabel).

    Output: logits ``(N,)`` for one label, ``(N, num_labels)`` otherwise; targets 0/1 of the same
    shape (any dtype). Loss: binary cross-entropy with logits, mean over labels. Metrics
    (torchmetrics): ``accuracy`` at probability 0.5 (micro over labels) and ``average_precision``
    (macro mean over labels for multilabel)."""

    kind = "binary"
    empty_mask_safe = True
    primary = "accuracy"
    higher_is_better = {"accuracy": True, "average_precision": True}

    def __init__(self, name: str, num_labels: int = 1):
        super().__init__(name)
        if num_labels < 1:
            raise ValueError(f"task {name!r}: num_labels must be at least 1")
        self.num_labels = num_labels

    def build_head(self, feature_shape: tuple[int, ...]) -> nn.Module:
        head = _FlatLinear(feature_shape, self.num_labels)
        return nn.Sequential(head, nn.Flatten(0)) if self.num_labels == 1 else head

    def labelled(self, target: Tensor) -> Tensor:
        """A sample counts as labelled when any of its labels is present (``>= 0``); missing
        labels of a partly labelled multilabel sample are ignored by loss and metrics."""
        return (target.reshape(len(target), -1) >= 0).any(1)

    def missing_like(self, target: Tensor) -> Tensor:
        return torch.full(target.shape, -1, dtype=target.dtype if target.is_floating_point() else torch.int64)

    def loss_target(self, output: Tensor, target: Tensor) -> Tensor:
        return target.to(output.dtype).reshape(output.shape)

    def loss_mask(self, target: Tensor) -> Tensor:
        return target >= 0  # per label

    def labelled_loss(self, output: Tensor, target: Tensor, mask: Tensor) -> Tensor:
        losses = F.binary_cross_entropy_with_logits(output, torch.where(mask, target, 0), reduction="none")
        return masked_mean(losses, mask)

    def combine(self, outputs: list[Tensor]) -> Tensor:
        p = torch.stack([o.sigmoid() for o in outputs]).mean(0).clamp(1e-7, 1 - 1e-7)
        return p.log() - (-p).log1p()  # logit of the mean probability

    def metrics(self) -> torchmetrics.MetricCollection:
        import torchmetrics

        return torchmetrics.MetricCollection({
            "accuracy": _BinaryWrap("accuracy", self.num_labels),
            "average_precision": _BinaryWrap("average_precision", self.num_labels),
        })


def _BinaryWrap(which: str, num_labels: int):
    """torchmetrics' binary / multilabel metric taking logits and 0/1 targets of any dtype."""
    from torchmetrics.classification import (BinaryAccuracy, BinaryAveragePrecision, MultilabelAccuracy,
                                             MultilabelAveragePrecision)

    if num_labels == 1:
        base = BinaryAccuracy if which == "accuracy" else BinaryAveragePrecision
        kwargs = {"ignore_index": -1}
    else:
        base = MultilabelAccuracy if which == "accuracy" else MultilabelAveragePrecision
        kwargs = {"num_labels": num_labels, "average": "micro" if which == "accuracy" else "macro",
                  "ignore_index": -1}

    class Wrapped(base):  # type: ignore[misc, valid-type]
        def update(self, preds: Tensor, target: Tensor) -> None:
            super().update(preds.sigmoid().reshape(target.shape), target.long())

    Wrapped.__name__ = base.__name__
    return Wrapped(**kwargs)


@register_task_kind
class RegressionTask(Task):
    """Real-valued targets (``dims`` per sample; output ``(N,)`` when ``dims == 1``).

    The head predicts ``mean + scale * linear(features)`` so that targets far from 0 (ages) start
    near their typical value; ``mean`` and ``scale`` are fixed (set by the dataset). Loss ``mse``
    or ``l1``; metrics (torchmetrics) ``mae`` and ``rmse``, both lower-is-better."""

    kind = "regression"
    empty_mask_safe = True
    primary = "mae"
    higher_is_better = {"mae": False, "rmse": False}

    def __init__(self, name: str, dims: int = 1, loss: str = "l1", mean: float = 0.0, scale: float = 1.0):
        super().__init__(name)
        if loss not in ("mse", "l1"):
            raise ValueError(f"task {name!r}: loss must be 'mse' or 'l1', got {loss!r}")
        self.dims, self.loss_name, self.mean, self.scale = dims, loss, mean, scale

    def build_head(self, feature_shape: tuple[int, ...]) -> nn.Module:
        layers = [_FlatLinear(feature_shape, self.dims), _Affine(self.mean, self.scale)]
        if self.dims == 1:
            layers.append(nn.Flatten(0))
        return nn.Sequential(*layers)

    def loss_target(self, output: Tensor, target: Tensor) -> Tensor:
        return target.to(output.dtype).reshape(output.shape)

    def labelled_loss(self, output: Tensor, target: Tensor, mask: Tensor) -> Tensor:
        mask = mask.reshape(len(mask), *[1] * (output.dim() - 1)).expand_as(output)
        target = torch.where(mask, target, 0)  # NaN (missing) would reach the gradient through where
        loss = F.l1_loss if self.loss_name == "l1" else F.mse_loss
        return masked_mean(loss(output, target, reduction="none"), mask)

    def metrics(self) -> torchmetrics.MetricCollection:
        import torchmetrics
        from torchmetrics.regression import MeanAbsoluteError, MeanSquaredError

        return torchmetrics.MetricCollection({"mae": MeanAbsoluteError(), "rmse": MeanSquaredError(squared=False)})


class _Expectation(nn.Module):
    """Logits -> expected value over the bin values (for metrics)."""

    def __init__(self, values: Tensor):
        super().__init__()
        self.values = values

    def forward(self, logits: Tensor) -> Tensor:
        return logits.softmax(-1) @ self.values.to(logits.device, logits.dtype)


@register_task_kind
class OrdinalExpectationTask(Task):
    """NDDR's (after DEX) age recipe: an N-way softmax over the integer values ``low..high``
    trained with cross-entropy on the (rounded, clipped) target; the prediction is the expected
    value ``sum_k p_k * value_k``. Output: logits ``(N, high - low + 1)``; target: real values
    ``(N,)``. Metrics: ``mae`` (torchmetrics) and ``median_ae`` of the expected value."""

    kind = "ordinal_expectation"
    empty_mask_safe = True
    primary = "mae"
    higher_is_better = {"mae": False, "median_ae": False}

    def __init__(self, name: str, low: int = 0, high: int = 100):
        super().__init__(name)
        if high <= low:
            raise ValueError(f"task {name!r}: high ({high}) must exceed low ({low})")
        self.low, self.high = int(low), int(high)
        self.values = torch.arange(self.low, self.high + 1, dtype=torch.float32)

    @property
    def num_bins(self) -> int:
        return self.high - self.low + 1

    def build_head(self, feature_shape: tuple[int, ...]) -> nn.Module:
        return _FlatLinear(feature_shape, self.num_bins)

    def target_bins(self, target: Tensor) -> Tensor:
        return (target.round().long().clamp(self.low, self.high) - self.low).reshape(-1)

    def labelled_loss(self, output: Tensor, target: Tensor, mask: Tensor) -> Tensor:
        target = torch.where(mask, target.reshape(len(target)), self.low)  # NaN (missing) has no bin
        return masked_mean(F.cross_entropy(output, self.target_bins(target), reduction="none"), mask)

    def combine(self, outputs: list[Tensor]) -> Tensor:
        return mean_of_softmax(outputs)

    def metrics(self) -> torchmetrics.MetricCollection:
        import torchmetrics
        from torchmetrics.regression import MeanAbsoluteError

        from taskloom.metrics import MedianAbsoluteError

        expect = _Expectation(self.values)

        class _OnExpectation:
            def update(self, preds: Tensor, target: Tensor) -> None:  # type: ignore[override]
                super().update(expect(preds), target.to(torch.float32).reshape(-1))

        mae = type("ExpectedMAE", (_OnExpectation, MeanAbsoluteError), {})()
        med = type("ExpectedMedianAE", (_OnExpectation, MedianAbsoluteError), {})(max_error=float(self.high - self.low) + 1)
        return torchmetrics.MetricCollection({"mae": mae, "median_ae": med})


class _LandmarkHead(nn.Module):
    def __init__(self, feature_shape: tuple[int, ...], num_landmarks: int, offset: float):
        super().__init__()
        self.linear = _FlatLinear(feature_shape, 2 * num_landmarks)
        self.num_landmarks, self.offset = num_landmarks, offset

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x).reshape(len(x), self.num_landmarks, 2) + self.offset


@register_task_kind
class LandmarkTask(Task):
    """L 2-D points. Output and target ``(N, L, 2)`` as ``(x, y)`` in face-box coordinates
    normalised to ``[0, 1]`` (box width 1); the head predicts offsets from the box centre.
    Loss: squared Euclidean error summed over the 2L coordinates, averaged over images
    (TCDCN's ``||y - f(x)||^2``). Metrics (:class:`~taskloom.metrics.LandmarkErrors`): errors
    normalised by the inter-ocular distance (failure above ``iod_threshold``, 10%) and by the box
    width (failure above ``box_threshold``, 5%), mean and per landmark (order :attr:`names`)."""

    kind = "landmarks"
    empty_mask_safe = True
    primary = "mean_error_iod"
    higher_is_better = {
        "mean_error_iod": False, "failure_iod": False, "failure_image_iod": False,
        "mean_error_box": False, "failure_box": False, "failure_image_box": False,
    }
    """Scalar metrics only; the per-landmark vectors (``error_iod_per_landmark``, ...) are
    reported but not selectable."""

    def __init__(self, name: str, num_landmarks: int = 5, names: list[str] | tuple[str, ...] | None = None,
                 eyes: tuple[int, int] = (0, 1), iod_threshold: float = 0.10, box_threshold: float = 0.05):
        super().__init__(name)
        from taskloom.metrics import names_or_default

        self.num_landmarks = num_landmarks
        self.names = names_or_default(names, num_landmarks)
        if len(self.names) != num_landmarks:
            raise ValueError(f"task {name!r}: {len(self.names)} names for {num_landmarks} landmarks")
        self.eyes, self.iod_threshold, self.box_threshold = tuple(eyes), iod_threshold, box_threshold

    def build_head(self, feature_shape: tuple[int, ...]) -> nn.Module:
        return _LandmarkHead(feature_shape, self.num_landmarks, 0.5)

    def labelled_loss(self, output: Tensor, target: Tensor, mask: Tensor) -> Tensor:
        target = torch.where(mask[:, None], target.to(output.dtype).reshape(len(target), -1), 0)
        return masked_mean((output.reshape(len(output), -1) - target).pow(2).sum(1), mask)

    def metrics(self) -> torchmetrics.MetricCollection:
        import torchmetrics

        from taskloom.metrics import LandmarkErrors

        return torchmetrics.MetricCollection({"landmarks": LandmarkErrors(
            self.num_landmarks, self.eyes, 1.0, self.iod_threshold, self.box_threshold)})


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """The mean of ``values`` where ``mask`` is true, 0 (connected to the graph) where it is
    nowhere true. Shapes do not depend on the data, so the device need not be waited for
    (unlike ``values[mask].mean()``). Masked-out values must be finite: ``where`` passes them
    a zero gradient, and a zero times NaN is NaN."""
    return torch.where(mask, values, 0).sum() / mask.sum().clamp_min(1)


def primary_score(task: Task, values: dict[str, float | list[float]]) -> float:
    """The task's primary metric, negated where lower is better (higher score = better)."""
    value = float(values[task.primary])
    if math.isnan(value):
        return -math.inf
    return value if task.higher_is_better[task.primary] else -value
