"""Dense (per-pixel) tasks: semantic segmentation, surface normals, depth.

Each predicts a map of the input's size: the head (:func:`build_dense_head`) turns the last
stage's feature map into ``out_channels`` maps upsampled to the task's :attr:`DenseTask.output_size`,
which the dataset sets. Missing targets are per pixel (``ignore_index`` labels, zero-length
normals, zero depth); a sample always counts as labelled (:meth:`DenseTask.labelled`). The
kinds register in :data:`taskloom.tasks.TASK_KINDS` when :mod:`taskloom.tasks` is imported.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from taskloom.heads import DenseHead, DenseHeadOptions, FCNHeadOptions  # noqa: F401  (DenseHead: part of this module's API)
from taskloom.heads import build_dense_head as dense_head
from taskloom.tasks import Task, mean_of_softmax, register_task_kind

if TYPE_CHECKING:
    import torchmetrics


def build_dense_head(feature_shape: tuple[int, ...], out_channels: int, output_size: tuple[int, int],
                     options: DenseHeadOptions | None = None) -> nn.Module:
    """The head of a dense task: ``(C, H, W)`` features -> ``(out_channels, *output_size)``.
    The one place a dense head is built: ``options`` (``model.heads.<task>``) picks it from
    :data:`taskloom.heads.DENSE_HEADS`; ``None``: the FCN head."""
    return dense_head(options or FCNHeadOptions(), feature_shape, out_channels, output_size)


class DenseTask(Task):
    """A per-pixel task; the dataset sets :attr:`output_size` ``(H, W)`` (the head upsamples to it).
    Subclasses set :attr:`out_channels` and implement :meth:`~taskloom.tasks.Task.loss_mask`
    (the labelled pixels) and :meth:`~taskloom.tasks.Task.labelled_loss`."""

    out_channels: ClassVar[int] = 1
    head_options: DenseHeadOptions | None = None
    """This task's head (``model.heads.<task>``, set by :func:`taskloom.heads.apply_heads`);
    ``None``: the FCN head."""

    def __init__(self, name: str, output_size: tuple[int, int] | None = None):
        super().__init__(name)
        self.output_size = tuple(output_size) if output_size is not None else None

    def build_head(self, feature_shape: tuple[int, ...]) -> nn.Module:
        if self.output_size is None:
            raise ValueError(f"task {self.name!r}: output_size (H, W) must be set before building the head")
        return build_dense_head(feature_shape, self.out_channels, self.output_size, self.head_options)

    def labelled(self, target: Tensor) -> Tensor:
        """Every sample: missing targets are marked per pixel, and the loss skips those pixels."""
        return torch.ones(len(target), dtype=torch.bool, device=target.device)


@register_task_kind
class SegmentationTask(DenseTask):
    """Semantic segmentation: logits ``(N, C, H, W)``, target labels ``(N, H, W)`` with
    ``ignore_index`` for unlabelled pixels. Per-pixel cross-entropy ignoring those pixels.
    Metrics (from one torchmetrics confusion matrix): ``miou``, ``pixel_accuracy``, ``fwiou``."""

    kind = "segmentation"
    primary = "miou"
    higher_is_better = {"miou": True, "pixel_accuracy": True, "fwiou": True}

    def __init__(self, name: str, num_classes: int, ignore_index: int = -1, output_size: tuple[int, int] | None = None):
        super().__init__(name, output_size)
        if num_classes < 2:
            raise ValueError(f"task {name!r}: segmentation needs at least 2 classes")
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.out_channels = num_classes  # type: ignore[misc]

    def loss_target(self, output: Tensor, target: Tensor) -> Tensor:
        return target.long()

    def loss_mask(self, target: Tensor) -> Tensor:
        return target != self.ignore_index

    def labelled_loss(self, output: Tensor, target: Tensor, mask: Tensor) -> Tensor:
        return F.cross_entropy(output, target, ignore_index=self.ignore_index)

    def combine(self, outputs: list[Tensor]) -> Tensor:
        return mean_of_softmax(outputs, dim=1)

    def metrics(self) -> torchmetrics.MetricCollection:
        import torchmetrics

        from taskloom.metrics import ConfusionDerived

        return torchmetrics.MetricCollection({
            k: ConfusionDerived(self.num_classes, k, ignore_index=self.ignore_index)
            for k in ("miou", "pixel_accuracy", "fwiou")
        })


@register_task_kind
class NormalsTask(DenseTask):
    """Surface normals: output ``(N, 3, H, W)`` (normalised inside loss and metrics), target unit
    vectors with zero-length vectors marking missing pixels (skipped). Loss ``cosine``
    (1 - cos) or ``l2`` (squared distance between unit vectors), averaged over valid pixels.
    Metrics: angle error ``mean_angle``, ``median_angle`` (degrees, lower is better) and percent of pixels
    ``within_11.25`` / ``within_22.5`` / ``within_30`` degrees (higher is better)."""

    kind = "normals"
    primary = "mean_angle"
    higher_is_better = {"mean_angle": False, "median_angle": False, "within_11.25": True, "within_22.5": True, "within_30": True}
    out_channels = 3

    def __init__(self, name: str, loss: str = "cosine", output_size: tuple[int, int] | None = None):
        super().__init__(name, output_size)
        if loss not in ("cosine", "l2"):
            raise ValueError(f"task {name!r}: normals loss must be 'cosine' or 'l2', got {loss!r}")
        self.loss_name = loss

    def loss_target(self, output: Tensor, target: Tensor) -> Tensor:
        return target.to(output.dtype)

    def loss_mask(self, target: Tensor) -> Tensor:
        return target.norm(dim=1) > 0

    def labelled_loss(self, output: Tensor, target: Tensor, mask: Tensor) -> Tensor:
        p, t = F.normalize(output, dim=1), F.normalize(target, dim=1)
        if self.loss_name == "cosine":
            per_pixel = 1.0 - (p * t).sum(1)
        else:
            per_pixel = (p - t).pow(2).sum(1)
        return per_pixel[mask].mean()

    def metrics(self) -> torchmetrics.MetricCollection:
        import torchmetrics

        from taskloom.metrics import AngleErrors

        return torchmetrics.MetricCollection({"angle": AngleErrors()})


@register_task_kind
class DepthTask(DenseTask):
    """Depth: output ``(N, 1, H, W)``, target ``(N, 1, H, W)`` (or ``(N, H, W)``) with 0 marking
    missing depth. Loss: L1 over valid pixels. Metrics: ``abs_error``, ``rel_error``."""

    kind = "depth"
    primary = "abs_error"
    higher_is_better = {"abs_error": False, "rel_error": False}
    out_channels = 1

    def loss_target(self, output: Tensor, target: Tensor) -> Tensor:
        return target.to(output.dtype).reshape(output.shape)

    def loss_mask(self, target: Tensor) -> Tensor:
        return target > 0

    def labelled_loss(self, output: Tensor, target: Tensor, mask: Tensor) -> Tensor:
        return (output - target).abs()[mask].mean()

    def metrics(self) -> torchmetrics.MetricCollection:
        import torchmetrics

        from taskloom.metrics import DepthErrors

        return torchmetrics.MetricCollection({"depth": DepthErrors()})
