"""Test metrics of a mixed-dataset run (data.name: mix), separately on each member's test split.

    python examples/evaluate_members.py runs/guide/mix

Prints one line per member and task: the task's primary metric and the number of samples.
"""
import sys
from pathlib import Path

import torch

from taskloom import checkpoint
from taskloom.architectures import build_model
from taskloom.config import load
from taskloom.data import build_data
from taskloom.data.mix import MixedSet
from taskloom.train import evaluate


def main(run_dir: str) -> None:
    run = Path(run_dir)
    config = load(run / "config.yaml")
    torch.set_num_threads(config.train.threads or torch.get_num_threads())
    data = build_data(config.data)
    model = build_model(config.model.architecture, config.model.backbone, data.tasks, data.input_shape)
    model.load_state_dict(checkpoint.load(run / "checkpoints" / "best.pt")["model"])
    test = data.test
    for k, (member, options) in enumerate(zip(test.members, config.data.members)):
        alone = MixedSet([member], None, data.tasks, [test.labelled_by[k]], test.templates, test.channels, test.size)
        metrics, _ = evaluate(model, alone, data.tasks, batch_size=config.data.eval_batch_size)
        for t in data.tasks:
            if metrics[t.name]["count"]:
                print(f"{options.name:10s} {t.name:10s} {t.primary} {metrics[t.name][t.primary]:.4f}  "
                      f"(n={metrics[t.name]['count']})")


if __name__ == "__main__":
    main(sys.argv[1])
