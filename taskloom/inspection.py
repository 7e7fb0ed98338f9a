"""``taskloom inspect CHECKPOINT [--plot DIR]``: what a trained multi-task network is made of.

Prints parameter counts by kind (backbone / mixers / heads / regulariser, from
:func:`taskloom.models.parameter_kinds`), per task tower, against the K single-task networks it
replaces (backbone + head, one per task: the X-ResNet paper's ">40% fewer parameters"), and a
summary of the learned mixing weights of every unit. ``--plot DIR`` writes PNGs:

* ``cross_stitch.png``: sorted alpha_same / alpha_diff per unit (the cross-stitch paper);
* ``cross_residual.png``: sorted cross-residual scale weights per connection (X-ResNet Fig. 5);
* ``mixer_blocks.png``: ``||A[t][s]||_F / sqrt(C)`` as a K x K heat map per unit, for every
  mixer (NDDR, sluice, cross-stitch, cross-residual); ``alpha * I`` shows as ``alpha``;
* ``sluice.png``: each sluice unit's (K*S) x (K*S) matrix.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

KIND_LABELS = {"backbone": "backbone", "fusion": "mixers (fusion)", "head": "heads",
               "regularizer": "regularizer", "weighting": "loss weighting"}


def register_cli(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "inspect", help="parameter counts and learned mixing weights of a checkpoint",
        description="Print parameter counts (by kind, per task tower, against the K single-task networks "
                    "the model replaces) and a summary of the learned mixing weights per unit; "
                    "--plot DIR also writes PNG figures of them.",
    )
    parser.add_argument("checkpoint", help="a checkpoint written by taskloom train (best.pt or last.pt), or a YAML "
                                           "config (counts of the untrained model it describes)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="with a YAML config: config overrides, e.g. model.backbone=resnet_small")
    parser.add_argument("--plot", metavar="DIR", help="write PNG plots of the mixing weights into DIR")
    parser.add_argument("--data-root", help="folder of the dataset's files (overrides the saved data.root)")
    parser.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    from taskloom.errors import ConfigError

    if args.plot and Path(args.plot).exists() and not Path(args.plot).is_dir():
        raise ConfigError(f"--plot {args.plot}: is a file, not a folder; choose another --plot folder")
    if args.checkpoint.endswith((".yaml", ".yml")):
        model, config, payload, data = build_from_config(args.checkpoint, args.overrides, args.data_root)
    elif args.overrides:
        raise ConfigError(f"inspect: KEY=VALUE overrides ({args.overrides[0]}) apply to a YAML config, not a checkpoint")
    else:
        from taskloom.experiment import load_run

        model, config, payload, data = load_run(args.checkpoint, args.data_root)
    print(inspection_text(model, config, data.tasks, data.input_shape, source=args.checkpoint, payload=payload))
    if args.plot:
        written = plot(model, args.plot) if _units(model) else []
        for path in written:
            print(f"wrote {path}")
        if not written:
            print(f"nothing to plot: this network has no mixing units to draw")
    return 0


def build_from_config(path: str, overrides: list[str], data_root: str | None = None):
    """The (untrained) model a config file describes, for counting before training."""
    from taskloom import config as cfg
    from taskloom.experiment import build_experiment

    overrides = list(overrides) + ([f"data.root={data_root}"] if data_root else [])
    config = cfg.load(path, overrides)
    data, model = build_experiment(config)
    return model.eval(), config, None, data


def _count(params) -> int:
    seen, total = set(), 0
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def _params(modules) -> list:
    return [p for m in modules for p in m.parameters()]


def counts(model, tasks, input_shape, backbone_options) -> dict[str, Any]:
    """All the numbers :func:`inspection_text` prints, as a mapping (used by the tests and the docs)."""
    from taskloom.backbones import Backbone
    from taskloom.models import MultiTaskNet, parameter_kinds

    kinds = {kind: _count(params) for kind, params in parameter_kinds(model).items()}
    out: dict[str, Any] = {"kinds": kinds, "total": _count(model.parameters())}
    if isinstance(model, MultiTaskNet):
        out["trunk"] = _count(model.trunk.parameters())
        out["towers"] = {t.name: _count(_params(model.task_modules(i)[:-1])) for i, t in enumerate(model.tasks)}
        out["heads"] = {t.name: _count(model.heads[t.name].parameters()) for t in model.tasks}
    recipe = Backbone(backbone_options, input_shape)
    stages = _count(_params(recipe.build()))
    out["single"] = {t.name: stages + _count(t.build_head(recipe.shapes[-1]).parameters()) for t in tasks}
    return out


def _fmt(n: int) -> str:
    return f"{n:,}"


def inspection_text(model, config, tasks, input_shape, source: str = "", payload: dict | None = None) -> str:
    """The text ``taskloom inspect`` prints."""
    numbers = counts(model, tasks, input_shape, config.model.backbone)
    arch = config.model.architecture
    lines = [f"{source}: {arch.name} on {config.data.name}, backbone {config.model.backbone.name}, "
             f"{len(tasks)} tasks ({', '.join(t.name for t in tasks)})"
             + (f", epoch {payload['state']['epoch']}" if payload and "state" in payload else "")]
    total = numbers["total"]
    lines += ["", "parameters by kind"]
    order = [k for k in KIND_LABELS if k in numbers["kinds"]] + sorted(set(numbers["kinds"]) - set(KIND_LABELS))
    if "regularizer" not in order and getattr(config.model, "regularizer", None) is not None:
        numbers["kinds"]["regularizer"] = 0
        order.append("regularizer")
    for kind in order:
        n = numbers["kinds"][kind]
        lines.append(f"  {KIND_LABELS.get(kind, kind):<18}{_fmt(n):>14}  {100 * n / max(total, 1):6.2f}%")
    lines.append(f"  {'total':<18}{_fmt(total):>14}")
    if "towers" in numbers:
        lines += ["", "per task (tower: its stages above the shared trunk and its per-task blocks)",
                  f"  {'task':<12}{'tower':>14}{'head':>10}{'total':>14}"]
        for t in tasks:
            tower, head = numbers["towers"][t.name], numbers["heads"][t.name]
            lines.append(f"  {t.name:<12}{_fmt(tower):>14}{_fmt(head):>10}{_fmt(tower + head):>14}")
        lines.append(f"  {'shared trunk':<12}{_fmt(numbers['trunk']):>14}   ({len(model.trunk)} stages shared by all tasks)")
    single = numbers["single"]
    singles = sum(single.values())
    lines += ["", f"against the {len(tasks)} single-task networks it replaces ({config.model.backbone.name} + head each)"]
    for t in tasks:
        lines.append(f"  {t.name:<12}{_fmt(single[t.name]):>14}")
    change = 100 * (total - singles) / max(singles, 1)
    word = "fewer" if change < 0 else "more"
    lines.append(f"  {'sum':<12}{_fmt(singles):>14}   this model: {_fmt(total)} = {100 * total / max(singles, 1):.1f}% "
                 f"({abs(change):.1f}% {word} parameters)")
    mixing = mixing_summary(model)
    if mixing:
        lines += ["", "learned mixing weights (block norms ||A[t][s]||_F / sqrt(C): alpha * I shows as alpha)"]
        lines += mixing
    return "\n".join(lines)


def _units(model) -> list[tuple[str, Any]]:
    from taskloom.mixers import Mixer

    return [(name, m) for name, m in model.named_modules() if isinstance(m, Mixer)]


def _label(name: str, unit) -> str:
    where = getattr(unit, "label", None)
    return f"{name} ({where})" if where else name


def block_norms(unit):
    """``(K, K)``: ``||A[t][s]||_F / sqrt(C)`` of a mixer's blocks."""
    blocks = unit.blocks().float()
    return blocks.pow(2).sum((-1, -2)).sqrt() / blocks.shape[-1] ** 0.5


def mixing_summary(model) -> list[str]:
    import torch

    from taskloom.mixers import CrossShortcut, CrossStitch, NDDR, Sluice

    names = [t.name for t in getattr(model, "tasks", [])]
    lines = []
    for name, unit in _units(model):
        k = unit.num_tasks
        task = names if len(names) == k else [str(i) for i in range(k)]
        desc = type(unit).__name__
        if isinstance(unit, CrossStitch):
            alpha = unit.matrix()  # (C, K, K)
            eye = torch.eye(k, dtype=torch.bool)
            same, diff = alpha[:, eye], alpha[:, ~eye]
            desc += (f" {unit.granularity}, C={unit.channels}: alpha_same mean {same.mean():.3f} "
                     f"[{same.min():.3f}, {same.max():.3f}]")
            if diff.numel():
                desc += f", alpha_diff mean {diff.mean():.3f} [{diff.min():.3f}, {diff.max():.3f}]"
            lines.append(f"  {_label(name, unit)}: {desc}")
            continue
        if isinstance(unit, CrossShortcut):
            desc += f" {unit.cross}, C={unit.channels}"
            if unit.cross in ("scale", "conv1x1"):
                w = unit.weight.detach()
                parts = []
                for p, (t, s) in enumerate(unit.pairs):
                    v = w[p] if unit.cross == "scale" else w[p].diagonal()
                    parts.append(f"{task[s]}->{task[t]} mean {v.mean():.3f} std {v.std():.3f}"
                                 + (f" ({(v >= 0).float().mean() * 100:.0f}% >= 0)" if unit.cross == "scale" else " (diagonal)"))
                desc += ": " + "; ".join(parts)
            lines.append(f"  {_label(name, unit)}: {desc}")
            if unit.cross != "conv1x1":
                continue
        elif isinstance(unit, NDDR):
            desc += f" ({unit.init} init), C={unit.channels}"
            lines.append(f"  {_label(name, unit)}: {desc}")
        elif isinstance(unit, Sluice):
            desc += f" S={unit.subspaces}, C={unit.channels}"
            lines.append(f"  {_label(name, unit)}: {desc}")
        else:
            lines.append(f"  {_label(name, unit)}: {desc}")
        try:
            norms = block_norms(unit)
        except NotImplementedError:
            continue
        width = max(8, *(len(t) + 7 for t in task))
        lines.append("    " + " " * width + "".join(f"{'from ' + s:>{width}}" for s in task))
        for t in range(k):
            lines.append("    " + f"{'to ' + task[t]:<{width}}" + "".join(f"{norms[t, s].item():>{width}.3f}" for s in range(k)))
    for name, module in model.named_modules():
        if type(module).__name__ == "BetaMix":
            beta = module.beta.detach()
            for t in range(beta.shape[0]):
                label = names[t] if t < len(names) else str(t)
                lines.append(f"  {name} (beta layer mixing) {label}: " + ", ".join(f"{b:.3f}" for b in beta[t].tolist()))
    return lines


# --------------------------------------------------------------------------- plots


def plot(model, folder: str | Path) -> list[Path]:
    """Write the PNGs described in the module docstring; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    from taskloom.mixers import CrossShortcut, CrossStitch, Sluice

    figures = _Figures(Path(folder), [t.name for t in getattr(model, "tasks", [])])
    units = _units(model)
    _plot_cross_stitch(figures, [(n, u) for n, u in units if isinstance(u, CrossStitch)])
    _plot_cross_residual(figures, [(n, u) for n, u in units if isinstance(u, CrossShortcut) and u.cross == "scale"])
    _plot_block_norms(figures, units)
    _plot_sluice(figures, [(n, u) for n, u in units if isinstance(u, Sluice)])
    return figures.written


class _Figures:
    """Grids of subplots saved as PNGs into one folder (the paths written, in order)."""

    def __init__(self, folder: Path, names: list[str]):
        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.names, self.written = folder, names, []

    def task_names(self, k: int) -> list[str]:
        return self.names if len(self.names) == k else [f"task {i}" for i in range(k)]

    def grid(self, n: int, width: float = 4.6, height: float = 3.8):
        import matplotlib.pyplot as plt

        cols = min(n, 3)
        rows = (n + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
        for ax in axes.flat[n:]:
            ax.axis("off")
        return fig, list(axes.flat)

    def save(self, fig, title: str, filename: str) -> None:
        import matplotlib.pyplot as plt

        fig.suptitle(title, fontsize=13)
        fig.tight_layout()
        path = self.folder / filename
        fig.savefig(path, dpi=110)
        plt.close(fig)
        self.written.append(path)


def _plot_cross_stitch(figures: _Figures, stitches: list) -> None:
    import torch

    if not stitches:
        return
    fig, axes = figures.grid(len(stitches))
    for ax, (name, unit) in zip(axes, stitches):
        alpha = unit.matrix()
        task = figures.task_names(unit.num_tasks)
        x = torch.arange(1, alpha.shape[0] + 1)
        for t in range(unit.num_tasks):
            for s in range(unit.num_tasks):
                values = alpha[:, t, s].sort(descending=True).values
                same = s == t
                ax.plot(x, values, "-" if same else "--", marker="o" if alpha.shape[0] == 1 or unit.granularity == "layer" else None,
                        markersize=3, label=f"{'same' if same else 'diff'}: {task[s]} -> {task[t]}")
        ax.set_title(f"{getattr(unit, 'label', name)} ({unit.granularity}, C={unit.channels})")
        ax.set_xlabel("channel, sorted by weight" if unit.granularity == "channel" else "channel (one weight per layer)")
        ax.set_ylabel("alpha")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, title="alpha_same / alpha_diff: source -> target", title_fontsize=7)
    figures.save(fig, "Cross-stitch units: sorted alpha_same (solid) and alpha_diff (dashed) per stage", "cross_stitch.png")


def _plot_cross_residual(figures: _Figures, crosses: list) -> None:
    import torch

    if not crosses:
        return
    fig, axes = figures.grid(len(crosses))
    for ax, (name, unit) in zip(axes, crosses):
        task = figures.task_names(unit.num_tasks)
        w = unit.weight.detach()
        for p, (t, s) in enumerate(unit.pairs):
            ax.plot(torch.arange(1, w.shape[1] + 1), w[p].sort().values, label=f"{task[s]} -> {task[t]}")
        ax.axhline(0, color="grey", linewidth=0.8)
        ax.set_title(f"{getattr(unit, 'label', name)} (C={unit.channels})")
        ax.set_xlabel("channel, sorted by weight")
        ax.set_ylabel("cross-residual scale a")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, title="source -> target task", title_fontsize=8)
    figures.save(fig, "Cross-residual scale weights per connection, sorted (cf. X-ResNet Fig. 5)", "cross_residual.png")


def _plot_block_norms(figures: _Figures, units: list) -> None:
    mixers = []
    for name, unit in units:
        try:
            mixers.append((name, unit, block_norms(unit)))
        except NotImplementedError:
            pass
    if not mixers:
        return
    fig, axes = figures.grid(len(mixers), 4.8, 3.8)
    vmax = max(float(norms.max()) for _, _, norms in mixers)
    for ax, (name, unit, norms) in zip(axes, mixers):
        task = figures.task_names(unit.num_tasks)
        image = ax.imshow(norms.numpy(), cmap="viridis", vmin=0, vmax=max(vmax, 1e-6))
        k = unit.num_tasks
        ax.set_xticks(range(k), task, rotation=30)
        ax.set_yticks(range(k), task)
        ax.set_xlabel("source task s")
        ax.set_ylabel("target task t")
        for t in range(k):
            for s in range(k):
                value = float(norms[t, s])
                ax.text(s, t, f"{value:.2f}", ha="center", va="center",
                        color="black" if value > 0.6 * vmax else "white", fontsize=9)
        ax.set_title(f"{type(unit).__name__} {getattr(unit, 'label', name)}", fontsize=10)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="||A[t][s]||_F / sqrt(C)")
    figures.save(fig, "Mixer block norms per unit (alpha * I shows as alpha)", "mixer_blocks.png")


def _plot_sluice(figures: _Figures, sluices: list) -> None:
    if not sluices:
        return
    fig, axes = figures.grid(len(sluices), 4.4, 4.0)
    for ax, (name, unit) in zip(axes, sluices):
        task = figures.task_names(unit.num_tasks)
        labels = [f"{t}:{i + 1}" for t in task for i in range(unit.subspaces)]
        a = unit.alpha.detach()
        bound = float(a.abs().max())
        image = ax.imshow(a.numpy(), cmap="coolwarm", vmin=-bound, vmax=bound)
        ax.set_xticks(range(len(labels)), labels, rotation=45, fontsize=8)
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
        ax.set_xlabel("source task:subspace")
        ax.set_ylabel("target task:subspace")
        if len(labels) <= 8:
            for r in range(len(labels)):
                for c in range(len(labels)):
                    ax.text(c, r, f"{float(a[r, c]):.2f}", ha="center", va="center", fontsize=8,
                            color="white" if abs(float(a[r, c])) > 0.6 * bound else "black")
        ax.set_title(f"{getattr(unit, 'label', name)} (S={unit.subspaces})", fontsize=10)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="alpha")
    figures.save(fig, "Sluice mixing matrices per unit", "sluice.png")
