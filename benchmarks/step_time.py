"""Training-step time and peak memory of taskloom's tower networks (GitHub issue 5).

Sections (``--sections``, default all):

* ``fusion``   step of cross-stitch / NDDR / sluice / X-ResNet vs the same K towers without a mixer
               (``single``; for X-ResNet ``split@4``, its trunk and branch without cross terms),
               K = 2, 3, 5, on LeNet (MultiMNIST 1x36x36), TCDCN (MTFL 1x40x40), ResNet-18 (3x64x64).
* ``batched``  towers as one: loop (``off``) vs ``on`` (vmap everywhere supported) vs ``conv`` (vmap
               the conv-only stages, loop the fully connected one) vs the library's ``auto`` vs
               ``packed`` (taskloom.packed: one grouped conv / BatchNorm / batched matmul per layer;
               ``tcdcn_bn``, the MTFL record's BatchNorm towers, only packs: vmap loops there).
* ``scaling``  step time and peak memory against K = 2..8 per mixer (TCDCN), PNG plot.
* ``inference`` one forward of a K-task network vs K single-task networks (throughput ratio).
* ``checkpoint`` activation checkpointing of the tower stages: time and memory cost.
* ``loaders``  samples/s of the MTFL and UTKFace loaders vs the model's samples/s.

Method: every variant of a comparison is built in the same process from the same seed; after
``--warmup`` rounds, every round times one full step (forward, loss, zero_grad, backward, Adam
step) of every variant in a fresh random order, so machine-load drift hits all alike. Reported:
median ms/step, IQR, and the median over rounds of the paired ratio to the comparison's baseline.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` over one step; on CPU the peak of the
bytes live in PyTorch's CPU allocator during one step, from ``torch.profiler`` memory events
(each op's self allocations and the free events, in time order, relative to the start of the step: activations, gradients,
optimizer state and temporaries; not the Python heap nor allocator caching).

    python benchmarks/step_time.py --threads 2 --json benchmarks/results/step_time.json
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from taskloom.architectures import (  # noqa: E402
    CrossStitchOptions, NDDROptions, SingleOptions, SluiceOptions, SplitOptions, XResNetOptions, build_model,
)
from taskloom.backbones import LeNetOptions, ResNet18Options, TCDCNOptions  # noqa: E402
from taskloom.models import configure_towers  # noqa: E402
from taskloom.tasks import ClassificationTask  # noqa: E402

BACKBONES = {
    "lenet": (LeNetOptions(), (1, 36, 36)),
    "tcdcn": (TCDCNOptions(), (1, 40, 40)),
    "tcdcn_bn": (TCDCNOptions(batch_norm=True), (1, 40, 40)),  # the MTFL record's towers (vmap: loop only)
    "resnet18": (ResNet18Options(), (3, 64, 64)),
}
MIXERS = {"cross_stitch": CrossStitchOptions(), "nddr": NDDROptions(), "sluice": SluiceOptions()}


def quartiles(values):
    if len(values) < 2:
        return values[0], values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], statistics.median(values), q[2]


class Variant:
    def __init__(self, model, x, y, device, amp=False):
        self.model, self.x, self.y, self.device, self.amp = model.to(device).train(), x, y, device, amp
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-4)

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def step(self):
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            losses = self.model.loss_terms(self.model(self.x), self.y)
        self.opt.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        self.opt.step()

    def timed(self):
        self.sync()
        t = time.perf_counter()
        self.step()
        self.sync()
        return time.perf_counter() - t

    def forward_timed(self):
        self.model.eval()
        self.sync()
        t = time.perf_counter()
        with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            self.model(self.x)
        self.sync()
        self.model.train()
        return time.perf_counter() - t


def peak_bytes(v: Variant) -> int:
    v.step()  # optimizer state exists from here on (steady state)
    if v.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        v.step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        v.step()
    # allocations are attributed to the op that made them (self memory), frees are "[memory]" events
    events = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events() if e.self_cpu_memory_usage)
    live = peak = 0
    for _, delta in events:
        live += delta
        peak = max(peak, live)
    return peak


def step_flops(v: Variant) -> float:
    """Multiply-add FLOPs of one training step (convolutions and matrix products, forward and
    backward; elementwise work is not counted), by ``torch.utils.flop_counter``."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        v.step()
    return float(counter.get_total_flops())


def make(arch, backbone, shape, k, batch, device, seed=0, batched="off", ckpt=False, channels_last=False, amp=False):
    torch.manual_seed(seed)
    tasks = [ClassificationTask(f"t{i}", 10) for i in range(k)]
    model = build_model(arch, backbone, tasks, shape)
    # "conv": vmap the conv-only stages (K >= 3) on any device, loop the fully connected ones
    # (what `auto` does on a GPU; on CPU the library's `auto` keeps the loop)
    configure_towers(model, "auto" if batched == "conv" else batched, ckpt)
    if batched == "conv":
        for m in model.modules():
            if getattr(m, "mode", None) == "auto":
                m.mode = "vmap"
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *shape, generator=g)
    y = {t.name: torch.randint(0, 10, (batch,), generator=g).to(device) for t in tasks}
    x = x.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    return Variant(model, x, y, device, amp)


def compare(group: str, variants: dict[str, Variant], baseline: str, args, memory=False, kind="step") -> list[dict]:
    """Interleaved rounds; rows with median, IQR and paired ratio to ``baseline``."""
    rng = random.Random(0)
    times = {n: [] for n in variants}
    names = list(variants)
    for r in range(args.warmup + args.rounds):
        rng.shuffle(names)
        for n in names:
            t = variants[n].timed() if kind == "step" else variants[n].forward_timed()
            if r >= args.warmup:
                times[n].append(t)
    rows = []
    flops = {n: step_flops(v) for n, v in variants.items()} if kind == "step" else {}
    for n, v in variants.items():
        q1, med, q3 = quartiles(times[n])
        ratios = [a / b for a, b in zip(times[n], times[baseline])]
        r1, rmed, r3 = quartiles(ratios)
        row = {"group": group, "variant": n, "median_ms": med * 1e3, "iqr_ms": [q1 * 1e3, q3 * 1e3],
               "ratio": rmed, "ratio_iqr": [r1, r3], "rounds": len(times[n])}
        if flops:
            row["gflops"], row["flops_ratio"] = flops[n] / 1e9, flops[n] / flops[baseline]
        if memory:
            row["peak_mb"] = peak_bytes(v) / 2**20
        rows.append(row)
        print(f"  {group:28s} {n:22s} {med * 1e3:8.1f} ms  x{rmed:.2f} [{r1:.2f}-{r3:.2f}]"
              + (f"  FLOPs x{row['flops_ratio']:.2f}" if flops else "")
              + (f"  peak {row['peak_mb']:.1f} MB" if memory else ""), flush=True)
    return rows


def batch_for(bb):
    return {"lenet": 32, "tcdcn": 32, "tcdcn_bn": 32, "resnet18": 4}[bb]


def sec_fusion(args, device):
    rows = []
    for bb in args.backbones:
        backbone, shape = BACKBONES[bb]
        for k in args.ks:
            b = batch_for(bb)
            vs = {"none (single)": make(SingleOptions(), backbone, shape, k, b, device)}
            for name, arch in MIXERS.items():
                vs[name] = make(arch, backbone, shape, k, b, device)
            rows += compare(f"fusion {bb} K={k}", vs, "none (single)", args, memory=args.memory)
            if bb == "resnet18":
                xs = {"none (split@4)": make(SplitOptions(at=4), backbone, shape, k, b, device),
                      "xresnet (Xs)": make(XResNetOptions(), backbone, shape, k, b, device)}
                rows += compare(f"fusion {bb} K={k} branch", xs, "none (split@4)", args, memory=args.memory)
    return rows


def sec_batched(args, device):
    rows = []
    for bb in [b for b in args.backbones if b != "resnet18"]:  # ResNet-18 towers have BatchNorm: loop only
        backbone, shape = BACKBONES[bb]
        for k in args.ks:
            for aname in ("single", "cross_stitch"):
                arch = SingleOptions() if aname == "single" else CrossStitchOptions()
                vs = {mode: make(arch, backbone, shape, k, batch_for(bb), device, batched=mode)
                      for mode in ("off", "on", "conv", "auto", "packed")}
                rows += compare(f"batched {bb} {aname} K={k}", vs, "off", args)
    return rows


def sec_scaling(args, device):
    rows = []
    backbone, shape = BACKBONES["tcdcn"]
    for k in range(2, args.max_k + 1):
        vs = {"none": make(SingleOptions(), backbone, shape, k, 32, device)}
        for name, arch in MIXERS.items():
            vs[name] = make(arch, backbone, shape, k, 32, device)
        vs["cross_stitch+vmap conv"] = make(CrossStitchOptions(), backbone, shape, k, 32, device, batched="conv")
        for row in compare(f"scaling tcdcn K={k}", vs, "none", args, memory=True):
            rows.append({**row, "k": k})
    if args.plot:
        plot_scaling(rows, args.plot)
    return rows


def plot_scaling(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(16, 4.4))
    for v in dict.fromkeys(r["variant"] for r in rows):
        rs = [r for r in rows if r["variant"] == v]
        ax[0].plot([r["k"] for r in rs], [r["median_ms"] for r in rs], marker="o", label=v)
        ax[1].plot([r["k"] for r in rs], [r["ratio"] for r in rs], marker="o", label=v)
        ax[2].plot([r["k"] for r in rs], [r["peak_mb"] for r in rs], marker="o", label=v)
    ax[0].set(title="Training step time (TCDCN 1x40x40, batch 32)", xlabel="K (tasks / towers)",
              ylabel="median ms / step (absolute: load drift)")
    ax[1].set(title="Step time / no-mixer towers (paired, same round)", xlabel="K (tasks / towers)",
              ylabel="x none (median of paired ratios)")
    ax[2].set(title="Peak memory per step", xlabel="K (tasks / towers)", ylabel="MB (torch.profiler CPU / CUDA max allocated)")
    for a in ax:
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"  wrote {path}")


def sec_inference(args, device):
    rows = []
    for bb in ("lenet", "tcdcn"):
        backbone, shape = BACKBONES[bb]
        k = 3
        vs = {"K x single-task": None,
              "split@2 (one forward)": make(SplitOptions(at=2), backbone, shape, k, 256, device),
              "cross_stitch (one forward)": make(CrossStitchOptions(), backbone, shape, k, 256, device),
              "cross_stitch+vmap conv": make(CrossStitchOptions(), backbone, shape, k, 256, device, batched="conv")}
        singles = [make(SingleOptions(), backbone, shape, 1, 256, device, seed=s) for s in range(k)]

        class Many(Variant):
            def __init__(self):
                pass

            def forward_timed(self):
                return sum(s.forward_timed() for s in singles)

        vs["K x single-task"] = Many()
        for row in compare(f"inference {bb} K={k} batch 256", vs, "K x single-task", args, kind="forward"):
            row["throughput_vs_singles"] = 1 / row["ratio"]
            rows.append(row)
    return rows


def sec_checkpoint(args, device):
    rows = []
    for bb, arch in (("tcdcn", CrossStitchOptions()), ("resnet18", CrossStitchOptions())):
        backbone, shape = BACKBONES[bb]
        vs = {"plain": make(arch, backbone, shape, 3, batch_for(bb), device),
              "checkpoint_towers": make(arch, backbone, shape, 3, batch_for(bb), device, ckpt=True)}
        rows += compare(f"checkpoint {bb} cross_stitch K=3", vs, "plain", args, memory=True)
    return rows


def sec_loaders(args, device):
    from torch.utils.data import DataLoader

    from taskloom.data import build_data
    from taskloom.data.mtfl import MTFLOptions
    from taskloom.data.utkface import UTKFaceOptions

    rows = []
    shared = Path(__file__).resolve().parents[2] / "shared" / "data"
    for name, opts, bb in (("mtfl", MTFLOptions(root=str(shared / "mtfl"), limit=args.loader_limit), "tcdcn"),
                           ("utkface", UTKFaceOptions(root=str(shared / "utkface64"), limit=args.loader_limit), "resnet18")):
        t = time.perf_counter()
        try:
            data = build_data(opts)
        except Exception as exc:  # data not present on this machine
            print(f"  loaders {name}: skipped ({exc})")
            continue
        decode = time.perf_counter() - t
        n_dec = len(data.train) + len(data.val) + len(data.test)
        row = {"group": f"loaders {name}", "decoded": n_dec, "decode_samples_s": n_dec / decode}
        for workers in (0, 2):
            loader = DataLoader(data.train, batch_size=64, shuffle=True, num_workers=workers,
                                pin_memory=device.type == "cuda", persistent_workers=False)
            t, n = time.perf_counter(), 0
            for _ in range(2):
                for x, _y in loader:
                    n += len(x)
            row[f"loader_samples_s_w{workers}"] = n / (time.perf_counter() - t)
        backbone, shape = BACKBONES[bb]
        v = make(CrossStitchOptions(), backbone, data.input_shape, len(data.tasks), 64, device)
        v.step()
        ts = [v.timed() for _ in range(args.rounds // 2 + 1)]
        row["model_samples_s"] = 64 / statistics.median(ts)
        row["model"] = f"cross_stitch {bb} K={len(data.tasks)} batch 64"
        print(f"  loaders {name}: decode {row['decode_samples_s']:.0f}/s (first epoch, once per process), "
              f"cached loader {row['loader_samples_s_w0']:.0f}/s (0 workers), {row['loader_samples_s_w2']:.0f}/s "
              f"(2 workers), model {row['model_samples_s']:.0f}/s", flush=True)
        rows.append(row)
    return rows


SECTIONS = {"fusion": sec_fusion, "batched": sec_batched, "scaling": sec_scaling, "inference": sec_inference,
            "checkpoint": sec_checkpoint, "loaders": sec_loaders}


def add_timing_arguments(p: argparse.ArgumentParser, json_default: str) -> None:
    """The options of every paired-timing benchmark (this one and ``vs_libmtl.py``)."""
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=json_default)


def write_json(args, device: torch.device, rows: list[dict], seconds: float, **settings) -> dict:
    """Write ``{"machine": ..., "rows": rows}`` to ``args.json`` (when set); return the machine record."""
    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "torch": torch.__version__, "threads": args.threads, "device": str(device),
               "cuda": torch.cuda.get_device_name() if device.type == "cuda" else None,
               **settings, "seconds": seconds, "argv": sys.argv[1:]}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))
    return machine


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    p.add_argument("--backbones", nargs="+", default=list(BACKBONES), choices=list(BACKBONES))
    p.add_argument("--ks", nargs="+", type=int, default=[2, 3, 5])
    p.add_argument("--max-k", type=int, default=8)
    add_timing_arguments(p, "benchmarks/results/step_time.json")
    p.add_argument("--memory", action="store_true", help="also peak memory in the fusion section")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--loader-limit", type=int, default=3000)
    p.add_argument("--plot", default="benchmarks/results/scaling.png")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    global make
    base_make = make

    def make(*a, **kw):  # noqa: F811 - the global options apply to every variant
        kw.setdefault("amp", args.bf16)
        kw.setdefault("channels_last", args.channels_last)
        return base_make(*a, **kw)

    rows = []
    t0 = time.perf_counter()
    for s in args.sections:
        print(f"[{s}]", flush=True)
        rows += SECTIONS[s](args, device)
    machine = write_json(args, device, rows, time.perf_counter() - t0, bf16=args.bf16, channels_last=args.channels_last)
    print("\n| group | variant | median ms | IQR ms | x baseline (paired median) | ratio IQR | FLOPs x baseline | peak MB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "median_ms" not in r:
            continue
        peak = f"{r['peak_mb']:.1f}" if "peak_mb" in r else ""
        flops = f"{r['flops_ratio']:.3f}" if "flops_ratio" in r else ""
        print(f"| {r['group']} | {r['variant']} | {r['median_ms']:.1f} | {r['iqr_ms'][0]:.0f}–{r['iqr_ms'][1]:.0f} "
              f"| {r['ratio']:.2f} | {r['ratio_iqr'][0]:.2f}–{r['ratio_iqr'][1]:.2f} | {flops} | {peak} |")
    loaders = [r for r in rows if r["group"].startswith("loaders")]
    if loaders:
        print("\n| loader | decode samples/s (once) | cached samples/s, 0 workers | 2 workers | model samples/s |")
        print("|---|---|---|---|---|")
        for r in loaders:
            print(f"| {r['group']} | {r['decode_samples_s']:.0f} | {r['loader_samples_s_w0']:.0f} | "
                  f"{r['loader_samples_s_w2']:.0f} | {r['model_samples_s']:.0f} ({r['model']}) |")
    print(f"\n{machine}")


if __name__ == "__main__":
    main()
