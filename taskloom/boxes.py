"""Box regression: one axis-aligned box per image (the ``box`` task kind).

Output and target ``(N, 4)``: ``(x_min, y_min, x_max, y_max)`` normalised by the image width and
height (so ``[0, 1]`` for boxes inside the image). The head is global average pooling and a linear
layer predicting the box's centre and size through a sigmoid (DETR's parametrisation), turned into
corners: at initialisation every prediction is the centred box of half the image's width and
height, not a degenerate one. A target with any ``NaN`` coordinate is missing (partially labelled
data).

Loss: ``l1`` (mean absolute coordinate error, default) or ``l1_giou`` (L1 plus ``1 - GIoU``,
the DETR recipe). Metrics: ``miou`` (mean IoU of predicted and true boxes, the primary),
``iou50`` (fraction of boxes with IoU >= 0.5, the PASCAL criterion) and ``l1`` (mean absolute
coordinate error, lower is better). A predicted box whose corners are swapped counts with its
corners sorted (``x_min = min(x0, x1)``, ...), so IoU is always defined.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from taskloom.tasks import Task, _FlatLinear, register_task_kind

if TYPE_CHECKING:
    import torchmetrics


def sort_corners(boxes: Tensor) -> Tensor:
    """``(x0, y0, x1, y1)`` with ``x0 <= x1`` and ``y0 <= y1``."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([torch.minimum(x0, x1), torch.minimum(y0, y1), torch.maximum(x0, x1),
                        torch.maximum(y0, y1)], -1)


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of corresponding boxes ``(N, 4)`` -> ``(N,)`` (0 for two empty boxes)."""
    a, b = sort_corners(a), sort_corners(b)
    w = (torch.minimum(a[:, 2], b[:, 2]) - torch.maximum(a[:, 0], b[:, 0])).clamp_min(0)
    h = (torch.minimum(a[:, 3], b[:, 3]) - torch.maximum(a[:, 1], b[:, 1])).clamp_min(0)
    inter = w * h
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    union = area(a) + area(b) - inter
    return torch.where(union > 0, inter / union.clamp_min(1e-12), torch.zeros_like(inter))


class _BoxHead(nn.Module):
    def __init__(self, feature_shape: tuple[int, ...]):
        super().__init__()
        self.linear = _FlatLinear(feature_shape, 4)

    def forward(self, x: Tensor) -> Tensor:
        cx, cy, w, h = torch.sigmoid(self.linear(x)).unbind(-1)  # centre and size in (0, 1)
        return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)


def _box_metrics():
    import torchmetrics

    class BoxErrors(torchmetrics.Metric):
        """Summed IoU, hits at IoU >= 0.5 and absolute coordinate error (sync by summing)."""

        full_state_update = False

        def __init__(self, which: str):
            super().__init__()
            self.which = which
            self.add_state("total", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

        def update(self, preds: Tensor, target: Tensor) -> None:
            preds, target = preds.reshape(-1, 4).double(), target.reshape(-1, 4).double()
            if self.which == "l1":
                self.total += (preds - target).abs().mean(1).sum()
            else:
                iou = box_iou(preds, target)
                self.total += (iou >= 0.5).double().sum() if self.which == "iou50" else iou.sum()
            self.count += len(preds)

        def compute(self) -> Tensor:
            return (self.total / self.count).float() if self.count > 0 else torch.tensor(float("nan"))

    return BoxErrors


@register_task_kind
class BoxTask(Task):
    """One box per image, ``(x_min, y_min, x_max, y_max)`` normalised to ``[0, 1]`` (see the
    module docstring); ``NaN`` marks a missing box."""

    kind = "box"
    primary = "miou"
    higher_is_better = {"miou": True, "iou50": True, "l1": False}

    def __init__(self, name: str, loss: str = "l1"):
        super().__init__(name)
        if loss not in ("l1", "l1_giou"):
            raise ValueError(f"task {name!r}: box loss must be 'l1' or 'l1_giou', got {loss!r}")
        self.loss_name = loss

    def build_head(self, feature_shape: tuple[int, ...]) -> nn.Module:
        return _BoxHead(feature_shape)

    def loss_target(self, output: Tensor, target: Tensor) -> Tensor:
        return target.to(output.dtype).reshape(output.shape)

    def labelled_loss(self, output: Tensor, target: Tensor, mask: Tensor) -> Tensor:
        output, target = output[mask], target[mask]  # a box with any NaN coordinate is missing
        loss = F.l1_loss(output, target)
        if self.loss_name == "l1_giou":
            from torchvision.ops import generalized_box_iou_loss

            loss = loss + generalized_box_iou_loss(sort_corners(output), target, reduction="mean")
        return loss

    def metrics(self) -> torchmetrics.MetricCollection:
        import torchmetrics

        errors = _box_metrics()
        return torchmetrics.MetricCollection({k: errors(k) for k in self.higher_is_better})
