"""A new task kind (loss, metrics, higher-is-better flags, missing-target marker) and a new
dataset that uses it: the sum of the two MultiMNIST digits as a count (Poisson regression)."""
import dataclasses

import torch
import torch.nn.functional as F
import torchmetrics

import taskloom as tl
from taskloom.config import from_dict
from taskloom.data import DATASETS, DataBundle
from taskloom.data.multimnist import MultiMNISTOptions
from taskloom.tasks import RegressionTask, register_task_kind

from _common import run_dir, settings


@register_task_kind
class CountTask(RegressionTask):
    """Non-negative counts: the head predicts log-rate; Poisson NLL; NaN = missing."""

    kind = "count"
    primary = "exact"
    higher_is_better = {"exact": True, "mae": False}

    def labelled_loss(self, output, target, mask):
        # Task.loss passes the labelled samples' mask (NaN targets are missing) and returns an
        # exact 0 for a batch without labels; RegressionTask.loss_target makes target float.
        return F.poisson_nll_loss(output[mask], target[mask], log_input=True)

    def metrics(self):
        class Exact(torchmetrics.MeanMetric):               # fraction of exactly right counts
            def update(self, preds, target):
                super().update((preds.exp().round() == target).float())

        class MAE(torchmetrics.MeanAbsoluteError):
            def update(self, preds, target):
                super().update(preds.exp(), target.float())

        return torchmetrics.MetricCollection({"exact": Exact(), "mae": MAE()})


@dataclasses.dataclass
class DigitSumOptions(MultiMNISTOptions):
    name: str = "digit_sum"


class _Sum(torch.utils.data.Dataset):
    def __init__(self, pairs):
        self.pairs = pairs

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        x, y = self.pairs[i]
        return x, {"sum": (y["left"] + y["right"]).float(), "left": y["left"]}


@DATASETS.register("digit_sum", DigitSumOptions)
def build_digit_sum(options: DigitSumOptions) -> DataBundle:
    """MultiMNIST with the digit sum (a count) and the left digit."""
    base = DATASETS["multimnist"].builder(options)
    tasks = [CountTask("sum", mean=2.0, scale=0.5), base.tasks[0]]
    return DataBundle(_Sum(base.train), _Sum(base.val), _Sum(base.test), tasks, base.input_shape)


if __name__ == "__main__":
    s = settings()
    s["data"]["name"] = "digit_sum"
    config = from_dict({**s, "model": {"architecture": "split@2"}, "train": {**s["train"], "select": "sum/exact"}})
    result = tl.run(config, run_dir("digit_sum"), log=lambda *a: None)
    print({"sum exact": round(result["tasks"]["sum"]["exact"], 4), "left accuracy": round(result["tasks"]["left"]["accuracy"], 4)})
