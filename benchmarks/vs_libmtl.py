"""Training-step time of taskloom against LibMTL on the same networks, side by side in one process.

LibMTL (https://github.com/median-research-group/LibMTL, the PyPI release 1.1.5) is the common
harness of the field. Compared here, for K = 2 and 3 classification tasks on 3x64x64 inputs with
a torchvision ResNet-18 as the encoder / tower and a pool + linear head per task:

* hard sharing: LibMTL ``HPS`` vs taskloom ``split@5`` (all five stages shared, K heads);
* cross-stitch: LibMTL ``Cross_stitch`` vs taskloom ``cross_stitch`` (K towers, a unit after each
  of the four residual layers). LibMTL's unit is one scalar per source task and layer, and every
  task receives the same mixture (REFERENCE §7: "all tasks fed the same mixed tensor"); taskloom's
  is the paper's K x K per-channel unit. The work is the same up to the K x K scalar products;
* MMoE with 3 experts, each a whole encoder: LibMTL ``MMoE`` (gates on the flattened image) vs
  taskloom ``mmoe`` (gates on the pooled image).

Method (``step_time.py``'s): every variant is built in this process from the same seed; after
``--warmup`` rounds, every round times one full step (forward, the K cross-entropy losses,
zero_grad, backward, Adam step) of every variant in a fresh random order; reported: median
ms/step, IQR, the median over rounds of the paired ratio taskloom / LibMTL, and the FLOPs ratio
(``torch.utils.flop_counter``: the same work, or not).

LibMTL 1.1.5 imports ``torchvision.models.utils``, which torchvision removed in 0.13: a stand-in
module giving ``torch.hub.load_state_dict_from_url`` (what it re-exported) is installed before the
import. Nothing else of LibMTL is changed. Install it with ``pip install --no-deps LibMTL==1.1.5``
(its own requirements are torch, torchvision and numpy, which taskloom has).

    python benchmarks/vs_libmtl.py --threads 2 --json benchmarks/results/vs_libmtl.json
"""
from __future__ import annotations

import argparse
import sys
import time
import types
from pathlib import Path

import torch
import torchvision
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from step_time import Variant, add_timing_arguments, compare, make, write_json  # noqa: E402

from taskloom.architectures import CrossStitchOptions, SplitOptions  # noqa: E402
from taskloom.backbones import ResNet18Options  # noqa: E402
from taskloom.gated_architectures import MMoEOptions  # noqa: E402

SHAPE = (3, 64, 64)
CLASSES = 10


def libmtl():
    """The LibMTL package (with the stand-in for ``torchvision.models.utils``), or a clear exit."""
    if "torchvision.models.utils" not in sys.modules:
        shim = types.ModuleType("torchvision.models.utils")
        shim.load_state_dict_from_url = torch.hub.load_state_dict_from_url
        sys.modules["torchvision.models.utils"] = shim
    try:
        import LibMTL.architecture
    except ImportError as exc:
        sys.exit(f"vs_libmtl.py needs LibMTL ({exc}): pip install --no-deps LibMTL==1.1.5")
    return LibMTL.architecture


class Encoder(torchvision.models.ResNet):
    """torchvision's ResNet-18 up to layer4 (the feature map), with the attribute names LibMTL's
    Cross_stitch reads (conv1, bn1, relu, maxpool, layer1..layer4)."""

    def __init__(self):
        super().__init__(torchvision.models.resnet.BasicBlock, [2, 2, 2, 2])
        del self.fc

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class LibMTLNet(nn.Module):
    """A LibMTL architecture with the ``loss_terms`` that ``step_time.Variant`` calls."""

    def __init__(self, arch: str, k: int):
        super().__init__()
        names = [f"t{i}" for i in range(k)]
        heads = nn.ModuleDict({n: nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, CLASSES))
                               for n in names})
        cls = getattr(libmtl(), arch)
        extra = {"img_size": list(SHAPE), "num_experts": [3]} if arch == "MMoE" else {}
        self.net = cls(names, Encoder, heads, rep_grad=False, multi_input=False, device=torch.device("cpu"), **extra)

    def forward(self, x):
        return self.net(x)

    def loss_terms(self, outputs, targets):
        return {n: nn.functional.cross_entropy(outputs[n], targets[n]) for n in outputs}


def libmtl_variant(arch: str, k: int, batch: int, device, seed: int = 0) -> Variant:
    torch.manual_seed(seed)
    model = LibMTLNet(arch, k)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *SHAPE, generator=g).to(device)
    y = {f"t{i}": torch.randint(0, CLASSES, (batch,), generator=g).to(device) for i in range(k)}
    return Variant(model, x, y, device)


PAIRS = {  # label: (LibMTL class, taskloom architecture)
    "hard sharing": ("HPS", SplitOptions(at=5)),
    "cross-stitch": ("Cross_stitch", CrossStitchOptions()),
    "MMoE (3 experts)": ("MMoE", MMoEOptions(experts=3)),
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ks", nargs="+", type=int, default=[2, 3])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    add_timing_arguments(p, "benchmarks/results/vs_libmtl.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    libmtl()  # fail before any work when it is missing
    rows, t0 = [], time.perf_counter()
    for label in args.pairs:
        theirs, ours = PAIRS[label]
        for k in args.ks:
            variants = {"LibMTL": libmtl_variant(theirs, k, args.batch, device),
                        "taskloom": make(ours, ResNet18Options(), SHAPE, k, args.batch, device)}
            params = {n: sum(p.numel() for p in v.model.parameters()) for n, v in variants.items()}
            for row in compare(f"{label} K={k}", variants, "LibMTL", args):
                rows.append({**row, "params": params[row["variant"]]})
    machine = write_json(args, device, rows, time.perf_counter() - t0, batch=args.batch)
    print("\n| comparison | library | params | median ms | IQR ms | x LibMTL (paired median) | ratio IQR | FLOPs x LibMTL |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['group']} | {r['variant']} | {r['params'] / 1e6:.2f}M | {r['median_ms']:.1f} "
              f"| {r['iqr_ms'][0]:.0f}–{r['iqr_ms'][1]:.0f} | {r['ratio']:.2f} "
              f"| {r['ratio_iqr'][0]:.2f}–{r['ratio_iqr'][1]:.2f} | {r['flops_ratio']:.3f} |")
    print(f"\n{machine}")


if __name__ == "__main__":
    main()
