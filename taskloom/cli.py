"""Command-line interface: ``taskloom train`` and ``taskloom eval``."""
from __future__ import annotations

import argparse
import importlib
import json
import signal
import sys
from pathlib import Path

from taskloom.errors import ConfigError, TaskloomError

EPILOG = """\
examples:
  taskloom train                                   # embedded MultiMNIST, cross-stitch, under 5 min on 2 cores
  taskloom train configs/multimnist/split_2.yaml train.lr=0.002 --epochs 3
  taskloom train --run-dir runs/cs --resume        # continue an interrupted run
  taskloom eval runs/cs/checkpoints/best.pt --split val
"""


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line, ``taskloom: error: ...``, like every other error."""

    def error(self, message: str):
        command = self.prog.partition(" ")[2]
        print(f"taskloom: error: {command + ': ' if command else ''}{message} "
              f"(see: taskloom {command + ' ' if command else ''}--help)", file=sys.stderr)
        sys.exit(2)


def _parser() -> argparse.ArgumentParser:
    from taskloom import __version__

    parser = _Parser(
        prog="taskloom", description="Multi-task deep learning with learned cross-task feature sharing.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"taskloom {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    train = sub.add_parser(
        "train", help="train a model from a config file (default: embedded MultiMNIST cross-stitch)",
        description="Train a multi-task model. The config file is YAML; KEY=VALUE overrides (dotted keys, "
                    "YAML values) and flags are applied on top, flags last.",
    )
    train.add_argument("config", nargs="?", help="YAML config file (omit for the built-in default)")
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                       help="config overrides, e.g. train.lr=0.01 model.architecture=split@2")
    train.add_argument("--epochs", type=int, help="number of epochs (train.epochs)")
    train.add_argument("--seed", type=int, help="training seed (seed)")
    train.add_argument("--data-root", help="folder of the dataset's files (data.root)")
    train.add_argument("--run-dir", help="output folder (default: runs/<dataset>-<architecture>-s<seed>)")
    train.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], help="train.device")
    train.add_argument("--resume", action="store_true", help="continue from RUN_DIR/checkpoints/last.pt")
    train.add_argument("--force", action="store_true", help="resume even if the config changed")

    ev = sub.add_parser("eval", help="evaluate a checkpoint on the test or validation split",
                        description="Evaluate a checkpoint; prints a table and writes a final.json-style record.")
    ev.add_argument("checkpoint", help="a checkpoint written by taskloom train (best.pt or last.pt)")
    ev.add_argument("--split", choices=["test", "val"], default="test", help="split to evaluate (default: test)")
    ev.add_argument("--data-root", help="folder of the dataset's files (overrides the saved data.root)")
    ev.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto", help="device")
    ev.add_argument("--output", help="where to write the JSON record (default: RUN_DIR/eval_<split>.json)")
    train.set_defaults(func=_train)
    ev.set_defaults(func=_eval)
    for name in EXTENSIONS:
        importlib.import_module(name).register_cli(sub)
    return parser


# Modules that add subcommands: each defines ``register_cli(subparsers)``, which adds its parser
# and sets ``func`` (called with the parsed args, returning the exit status). Modules import
# their heavy dependencies inside ``func`` so that ``taskloom --help`` stays fast.
EXTENSIONS = ("taskloom.inspection", "taskloom.data.check", "taskloom.compare")


def _train(args: argparse.Namespace) -> int:
    from taskloom import config as cfg
    from taskloom.distributed import is_main_process
    from taskloom.experiment import run

    overrides = list(args.overrides)
    if args.config and "=" in args.config and not Path(args.config).exists():
        overrides.insert(0, args.config)  # `taskloom train key=value` without a config file
        args.config = None
    for flag, key in (("epochs", "train.epochs"), ("seed", "seed"), ("data_root", "data.root"), ("device", "train.device")):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{key}={json.dumps(value)}")
    config = cfg.load(args.config, overrides)
    run_dir = Path(args.run_dir or f"runs/{config.data.name}-{config.model.architecture.name}-s{config.seed}")
    final = run(config, run_dir, resume=args.resume, force=args.force)
    if is_main_process():  # under torchrun only rank 0 reports
        _print_final(final)
        print(f"results: {run_dir / 'final.json'}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    import torch

    from taskloom.experiment import load_run
    from taskloom.train import count_parameters, evaluate, resolve_device

    path = Path(args.checkpoint)
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    out = Path(args.output) if args.output else run_dir / f"eval_{args.split}.json"
    _check_output(out)  # before the work, not after it
    model, config, payload, data = load_run(path, args.data_root)
    device = resolve_device(args.device)
    model.to(device)
    with torch.no_grad():
        results, _ = evaluate(model, data.split(args.split), data.tasks, batch_size=config.data.eval_batch_size,
                              num_workers=config.data.num_workers, device=device)
    final = {"tasks": results, "params": count_parameters(model), "seconds": payload["state"].get("seconds"),
             "config": str(run_dir / "config.yaml"), "split": args.split, "checkpoint": str(path)}
    _print_final(final)  # the results are shown even if writing them fails
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(final, indent=2) + "\n", encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"--output {out}: cannot write ({exc.strerror or exc}); the results are printed above") from None
    print(f"results: {out}")
    return 0


def _check_output(out: Path) -> None:
    """An output file's path is usable: not a folder, its parent a folder (created if missing)."""
    if out.is_dir():
        raise ConfigError(f"--output {out}: is a folder; give a file name, e.g. {out / 'eval.json'}")
    parent = next((p for p in [out.parent, *out.parent.parents] if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise ConfigError(f"--output {out}: {parent} is a file, not a folder")


def _print_final(final: dict) -> None:
    from taskloom.tables import metrics_table

    print(metrics_table(final["tasks"]))
    print(f"parameters: {final['params']:,}   split: {final['split']}")
    if final.get("scored_on_val"):  # tasks without test labels: the same checkpoint on validation
        print(metrics_table(final["scored_on_val"]))
        print(f"split: val ({', '.join(final['scored_on_val'])}: no labels in the test split)")


_sigints: list[int] = []


def _on_sigint(signum: int, frame) -> None:
    _sigints.append(signum)
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    # Ctrl-C at any moment, imports included, exits quietly with 130. (The package imports
    # torch lazily, so the console script gets here within a fraction of a second.)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # Python's own: keep its behaviour, and note it
        signal.signal(signal.SIGINT, _on_sigint)
    try:
        return _main(argv)
    except TaskloomError as exc:
        print(f"taskloom: error: {exc}", file=sys.stderr)
        return 130 if type(exc).__name__ == "Interrupted" else 2
    except KeyboardInterrupt:
        print("taskloom: interrupted", file=sys.stderr)
        return 130
    except Exception:
        # A Ctrl-C can land in an import that swallows the KeyboardInterrupt and fails later
        # instead, half imported (numpy under scipy under torchmetrics: "module 'numpy._core' has
        # no attribute '_multiarray_umath'"; seen in CI on 2026-12-04): still an interrupt.
        if _sigints:
            print("taskloom: interrupted", file=sys.stderr)
            return 130
        raise


def _main(argv: list[str] | None) -> int:
    parser = _parser()
    # Overrides may come after flags (`train cfg.yaml --epochs 3 train.lr=0.1`): argparse stops
    # collecting positionals at the first flag, so pick up the KEY=VALUE leftovers here.
    args, extra = parser.parse_known_args(argv)
    if args.command is None:
        print(_commands(parser), file=sys.stderr)
        return 2
    stray = [a for a in extra if a.startswith("-") or "=" not in a or args.command != "train"]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args.func(args)


def _commands(parser: argparse.ArgumentParser) -> str:
    """What ``taskloom`` with no command prints: the commands, a line each."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    width = max(len(c.dest) for c in sub._choices_actions)
    lines = [f"  {c.dest:<{width}}  {c.help}" for c in sub._choices_actions]
    return "\n".join(["taskloom: error: no command given; choose one of:", *lines,
                      "see: taskloom COMMAND --help, taskloom --version"])


if __name__ == "__main__":
    sys.exit(main())
