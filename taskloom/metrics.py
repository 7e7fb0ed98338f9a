"""Metrics that torchmetrics does not provide, as :class:`torchmetrics.Metric` subclasses.

Every state here is a sum (or a fixed-size histogram, itself a sum), so the metrics sync across
processes exactly like torchmetrics' own, with no per-sample lists. Where torchmetrics already
computes a metric (MAE, RMSE, accuracy, average precision, confusion matrix) the tasks use it
directly; what is here is only what it lacks:

* :class:`LandmarkErrors`: per-landmark normalised point-to-point error and failure rate, under
  two normalisers at once (inter-ocular distance and face-box width);
* :class:`MedianAbsoluteError`: the median of ``|pred - target|`` (a histogram of fine bins);
* :class:`ConfusionDerived`: mIoU, pixel accuracy and frequency-weighted IoU from torchmetrics'
  multiclass confusion matrix (which handles ``ignore_index``);
* :class:`AngleErrors`: surface-normal angle error (mean, median, % within thresholds);
* :class:`DepthErrors`: absolute and relative depth error on valid pixels.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.classification import MulticlassConfusionMatrix

LANDMARK_NAMES = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")


def _hist_median(hist: Tensor, lo: float, width: float) -> Tensor:
    """Median of values binned into ``hist`` (bin i covers ``[lo + i*width, lo + (i+1)*width)``):
    the centre of the bin holding the middle value (the mean of the two middle bins' centres
    for an even count). NaN for an empty histogram."""
    total = int(hist.sum().item())
    if total == 0:
        return torch.tensor(float("nan"))
    cum = torch.cumsum(hist, 0)

    def kth(k: int) -> float:  # 0-based k-th smallest value's bin centre
        i = int(torch.searchsorted(cum, torch.tensor(k + 1, dtype=cum.dtype, device=cum.device)).item())
        return lo + (i + 0.5) * width

    if total % 2:
        return torch.tensor(kth(total // 2))
    return torch.tensor(0.5 * (kth(total // 2 - 1) + kth(total // 2)))


class LandmarkErrors(Metric):
    """Normalised point-to-point error of L landmarks, with two normalisers.

    ``update(preds, target)``: both ``(N, L, 2)`` (or ``(N, 2L)`` interleaved ``x1, y1, x2, ...``)
    in coordinates where the face box spans ``[0, box_width]`` (crop coordinates normalised to
    the crop: ``box_width = 1``). For each image and landmark the Euclidean error is divided by

    * the **inter-ocular distance**: distance between the *true* landmarks ``eyes[0]`` and
      ``eyes[1]`` (the MTFL / TCDCN protocol; failure if > ``iod_threshold``, default 10%);
    * the **face-box width** ``box_width`` (seed 004's protocol; failure if > ``box_threshold``,
      default 5%).

    ``compute()`` returns, for both normalisers (suffix ``_iod`` / ``_box``): ``mean_error``
    (mean over images and landmarks), ``failure`` (fraction of (image, landmark) pairs whose
    error exceeds the threshold, i.e. the mean of the per-landmark failure rates),
    ``failure_image`` (fraction of images whose mean error over landmarks exceeds the threshold)
    and per-landmark vectors ``error_<norm>_per_landmark`` / ``failure_<norm>_per_landmark``
    (order: :attr:`names`). Images whose inter-ocular distance is 0 are an error.
    """

    full_state_update = False
    higher_is_better = False

    def __init__(self, num_landmarks: int = 5, eyes: tuple[int, int] = (0, 1), box_width: float = 1.0,
                 iod_threshold: float = 0.10, box_threshold: float = 0.05, **kwargs):
        super().__init__(**kwargs)
        self.num_landmarks, self.eyes, self.box_width = num_landmarks, tuple(eyes), float(box_width)
        self.iod_threshold, self.box_threshold = float(iod_threshold), float(box_threshold)
        for norm in ("iod", "box"):
            self.add_state(f"err_{norm}", torch.zeros(num_landmarks, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"fail_{norm}", torch.zeros(num_landmarks, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"fail_image_{norm}", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def _points(self, x: Tensor) -> Tensor:
        x = x.detach().to(torch.float64)
        if x.ndim == 2:
            x = x.reshape(len(x), -1, 2)
        if x.ndim != 3 or x.shape[1:] != (self.num_landmarks, 2):
            raise ValueError(f"landmarks: expected shape (N, {self.num_landmarks}, 2), got {tuple(x.shape)}")
        return x

    def update(self, preds: Tensor, target: Tensor) -> None:
        p, t = self._points(preds), self._points(target)
        dist = (p - t).norm(dim=-1)  # (N, L)
        iod = (t[:, self.eyes[0]] - t[:, self.eyes[1]]).norm(dim=-1, keepdim=True)
        if (iod <= 0).any():
            raise ValueError("landmarks: a target has zero inter-ocular distance; cannot normalise")
        for norm, err, thr in (("iod", dist / iod, self.iod_threshold),
                               ("box", dist / self.box_width, self.box_threshold)):
            setattr(self, f"err_{norm}", getattr(self, f"err_{norm}") + err.sum(0))
            setattr(self, f"fail_{norm}", getattr(self, f"fail_{norm}") + (err > thr).sum(0))
            setattr(self, f"fail_image_{norm}", getattr(self, f"fail_image_{norm}") + (err.mean(1) > thr).sum())
        self.count += len(p)

    def compute(self) -> dict[str, Tensor]:
        n = self.count  # 0 / 0 -> nan when nothing was seen
        out = {}
        for norm in ("iod", "box"):
            per = getattr(self, f"err_{norm}") / n
            fail = getattr(self, f"fail_{norm}") / n
            out[f"mean_error_{norm}"] = per.mean()
            out[f"failure_{norm}"] = fail.mean()
            out[f"failure_image_{norm}"] = getattr(self, f"fail_image_{norm}") / n
            out[f"error_{norm}_per_landmark"] = per
            out[f"failure_{norm}_per_landmark"] = fail
        return {k: v.float() for k, v in out.items()}


class MedianAbsoluteError(Metric):
    """Median of ``|preds - target|`` over all elements, from a histogram of ``bin_width`` bins on
    ``[0, max_error]`` (errors above ``max_error`` go into the last bin). Exact to within half a
    bin (default 0.01: exact to 0.005 for ages in years) with a fixed-size, summable state."""

    full_state_update = False
    higher_is_better = False

    def __init__(self, max_error: float = 200.0, bin_width: float = 0.01, **kwargs):
        super().__init__(**kwargs)
        self.bin_width = float(bin_width)
        self.num_bins = int(math.ceil(max_error / bin_width)) + 1
        self.add_state("hist", torch.zeros(self.num_bins, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        err = (preds.detach().to(torch.float64) - target.detach().to(torch.float64)).abs().flatten()
        idx = (err / self.bin_width).floor().clamp(0, self.num_bins - 1).long()
        self.hist += torch.bincount(idx, minlength=self.num_bins).to(self.hist.dtype)

    def compute(self) -> Tensor:
        return _hist_median(self.hist, 0.0, self.bin_width)


class ConfusionDerived(MulticlassConfusionMatrix):
    """A segmentation score computed from torchmetrics' (summed, synced) confusion matrix.

    ``kind``: ``miou`` (mean IoU over the classes present in the target or the prediction of the
    evaluated pixels), ``pixel_accuracy`` (correct / labelled pixels) or ``fwiou`` (IoU weighted by
    each class's share of labelled pixels). Pixels whose target is ``ignore_index`` count nowhere.
    ``preds`` may be logits ``(N, C, H, W)`` (argmax taken) or labels ``(N, H, W)``.
    Several of these in one MetricCollection share one confusion matrix (compute groups).
    """

    def __init__(self, num_classes: int, kind: str, ignore_index: int | None = None, **kwargs):
        super().__init__(num_classes, ignore_index=ignore_index, validate_args=False, **kwargs)
        if kind not in ("miou", "pixel_accuracy", "fwiou"):
            raise ValueError(f"unknown segmentation score {kind!r}")
        self.kind = kind

    def update(self, preds: Tensor, target: Tensor) -> None:
        if preds.is_floating_point() and preds.ndim == target.ndim + 1:
            preds = preds.argmax(1)
        super().update(preds, target)

    def compute(self) -> Tensor:
        cm = self.confmat.to(torch.float64)  # rows: target, columns: prediction
        tp = cm.diag()
        gt, pr = cm.sum(1), cm.sum(0)
        union = gt + pr - tp
        total = cm.sum()
        if total == 0:
            return torch.tensor(float("nan"))
        if self.kind == "pixel_accuracy":
            return (tp.sum() / total).float()
        iou = torch.where(union > 0, tp / union.clamp_min(1), torch.zeros_like(tp))
        if self.kind == "miou":
            return (iou[union > 0].mean()).float()
        return ((gt / total) * iou).sum().float()


class AngleErrors(Metric):
    """Angle between predicted and true surface normals, in degrees, over valid pixels.

    ``update(preds, target)``: ``(N, 3, H, W)``. A pixel is valid where the target has non-zero
    length (zero-length targets mark missing ground truth and are skipped). Both vectors are
    normalised; a zero-length *prediction* has no direction and counts as a 90 degree error.
    ``compute()``: ``mean_angle``, ``median_angle`` (histogram of ``bin_width`` degree bins, exact to half a
    bin), and ``within_11.25`` / ``within_22.5`` / ``within_30`` (percent of valid pixels).
    """

    full_state_update = False
    higher_is_better = None  # mixed: angles lower, "within" percentages higher
    thresholds = (11.25, 22.5, 30.0)

    def __init__(self, bin_width: float = 0.01, **kwargs):
        super().__init__(**kwargs)
        self.bin_width = float(bin_width)
        self.num_bins = int(math.ceil(180.0 / bin_width)) + 1
        self.add_state("sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("within", torch.zeros(len(self.thresholds), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("hist", torch.zeros(self.num_bins, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        angles = angle_errors(preds.detach(), target.detach())
        self.sum += angles.sum()
        self.count += angles.numel()
        self.within += torch.stack([(angles <= t).sum() for t in self.thresholds]).to(self.within.dtype)
        idx = (angles / self.bin_width).floor().clamp(0, self.num_bins - 1).long()
        self.hist += torch.bincount(idx, minlength=self.num_bins).to(self.hist.dtype)

    def compute(self) -> dict[str, Tensor]:
        n = self.count
        out = {"mean_angle": (self.sum / n).float(), "median_angle": _hist_median(self.hist, 0.0, self.bin_width).float()}
        for t, w in zip(self.thresholds, self.within):
            out[f"within_{t:g}"] = (100.0 * w / n).float()
        return out


def angle_errors(preds: Tensor, target: Tensor, eps: float = 1e-12) -> Tensor:
    """Angles in degrees (float64, flat) between ``preds`` and ``target`` ``(N, 3, ...)`` at the
    pixels where the target has non-zero length."""
    p, t = preds.to(torch.float64), target.to(torch.float64)
    valid = t.norm(dim=1) > 0
    cos = (F.normalize(p, dim=1, eps=eps) * F.normalize(t, dim=1, eps=eps)).sum(1)
    return torch.rad2deg(torch.acos(cos.clamp(-1.0, 1.0)))[valid]


class DepthErrors(Metric):
    """Depth errors over valid pixels (target > 0; zero marks missing depth).

    ``compute()``: ``abs_error`` = mean ``|pred - gt|``, ``rel_error`` = mean ``|pred - gt| / gt``.
    """

    full_state_update = False
    higher_is_better = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        for name in ("abs_sum", "rel_sum", "count"):
            self.add_state(name, torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        p, t = preds.detach().to(torch.float64), target.detach().to(torch.float64)
        if p.shape != t.shape:
            p = p.reshape(t.shape)
        valid = t > 0
        diff = (p - t).abs()[valid]
        self.abs_sum += diff.sum()
        self.rel_sum += (diff / t[valid]).sum()
        self.count += diff.numel()

    def compute(self) -> dict[str, Tensor]:
        return {"abs_error": (self.abs_sum / self.count).float(), "rel_error": (self.rel_sum / self.count).float()}


def names_or_default(names: Sequence[str] | None, n: int) -> tuple[str, ...]:
    if names is not None:
        return tuple(names)
    return LANDMARK_NAMES if n == 5 else tuple(f"landmark_{i}" for i in range(n))
