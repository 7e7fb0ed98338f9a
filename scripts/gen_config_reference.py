#!/usr/bin/env python
"""Write docs/guide/configs.md from the typed config dataclasses (taskloom/config.py and the
options classes of every registry entry) and docs/guide/cli.md from the argparse parsers, so
the references never drift from the code.

    python scripts/gen_config_reference.py           # rewrite both pages
    python scripts/gen_config_reference.py --check   # exit 1 if a committed page is stale

Descriptions are the attribute docstrings (the string literal under a field) and class docstrings.
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import os
import sys
import textwrap
import typing
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
PAGE = REPO / "docs" / "guide" / "configs.md"
CLI_PAGE = REPO / "docs" / "guide" / "cli.md"
sys.path.insert(0, str(REPO))
os.environ["COLUMNS"] = "100"  # argparse wraps help text to the terminal width

from taskloom import config as cfg  # noqa: E402  (fills every registry)
from taskloom.registry import Registry  # noqa: E402


def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of ``cls`` and its bases (a string literal right after a field)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body
        for node, after in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) \
                    and isinstance(after, ast.Expr) and isinstance(getattr(after, "value", None), ast.Constant) \
                    and isinstance(after.value.value, str):
                docs[node.target.id] = " ".join(inspect.cleandoc(after.value.value).split())
    return docs


def type_name(tp) -> str:
    return cfg._type_name(tp).replace("|", "\\|")


def default_text(value) -> str:
    if value is dataclasses.MISSING:
        return "required"
    if dataclasses.is_dataclass(value):
        name = getattr(value, "name", None)
        return f"`{{name: {name}}}`" if isinstance(getattr(type(value), "registry", None), Registry) else "see below"
    text = yaml.safe_dump(value, default_flow_style=True, width=1000).strip()
    text = text.removesuffix("\n...").removesuffix("...").strip()
    return f"`{text}`".replace("|", "\\|")


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def table(cls: type, prefix: str, skip: tuple[str, ...] = (), suffix: str = "",
          defaults=None) -> tuple[list[str], list[tuple[str, type, object]]]:
    """Rows for the fields of ``cls`` and the nested (non-tagged) dataclasses to document next,
    each with the value it holds by default. ``defaults``: the instance of ``cls`` a config
    starts from where that is not ``cls()`` (a field's default factory, such as each of
    ``ParamGroups``' groups); its values are the documented defaults."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    rows = ["| key | type | default | description |", "|---|---|---|---|"]
    nested = []
    for field in dataclasses.fields(cls):
        if not field.init or field.name in skip:
            continue
        tp = hints[field.name]
        default = getattr(defaults, field.name) if defaults is not None else cfg._default(field)
        key = f"{prefix}{field.name}"
        doc = docs.get(field.name, "")
        if cfg._is_tagged(tp):
            doc = (doc + " " if doc else "") + f"One of the {tp.registry.kind} entries below (`name:` picks it)."
        else:
            inner = [a for a in (typing.get_args(tp) or (tp,)) if dataclasses.is_dataclass(a)]
            for sub in inner:
                if not cfg._is_tagged(sub):
                    nested.append((key, sub, default if type(default) is sub else None))
                    doc = (doc + " " if doc else "") + f"See [`{key}`](#{anchor(key + suffix)})."
        rows.append(f"| `{key}` | {type_name(tp)} | {default_text(default)} | {cell(doc)} |")
    return rows, nested


def anchor(title: str) -> str:
    """The heading id Python-Markdown's toc extension gives a heading (its default slugify)."""
    import re
    import unicodedata

    text = unicodedata.normalize("NFKD", title).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def section(title: str, cls: type, prefix: str, level: int, out: list[str], skip=(), defaults=None) -> None:
    out.append(f"{'#' * level} `{title}`")
    out.append("")
    doc = inspect.cleandoc(cls.__doc__ or "")
    if doc and not doc.startswith(cls.__name__ + "("):
        out += [" ".join(doc.split()), ""]
    rows, nested = table(cls, prefix, skip, defaults=defaults)
    out += rows + [""]
    for key, sub, sub_defaults in nested:
        section(key, sub, key + ".", level + 1 if level < 4 else level, out, defaults=sub_defaults)


def registry_section(title: str, base: type, prefix: str, out: list[str]) -> None:
    registry: Registry = base.registry
    out += [f"## `{title}`: {registry.kind}s", ""]
    out += [f"`{title}` takes a mapping whose `name` picks one {registry.kind} (a bare string is "
            f"shorthand for `{{name: ...}}`). Registered: "
            + ", ".join(f"`{n}`" for n in registry.names()) + ".", ""]
    common = tuple(f.name for f in dataclasses.fields(base))
    if len(common) > 1:
        out += [f"### Common to every {registry.kind}", ""]
        rows, nested = table(base, prefix, skip=("name",))
        out += rows + [""]
        for key, sub, sub_defaults in nested:
            section(key, sub, key + ".", 4, out, defaults=sub_defaults)
    for name in registry.names():
        entry = registry[name]
        out += [f"### `{title}: {name}`", ""]
        if entry.doc:
            out += [entry.doc, ""]
        rows, nested = table(entry.options, prefix, skip=common, suffix=f" ({name})")
        extra = " and the common keys above" if len(common) > 1 else ""
        out += rows + [""] if len(rows) > 2 else [f"No options besides `name`{extra}.", ""]
        for key, sub, sub_defaults in nested:
            section(f"{key} ({name})", sub, key + ".", 4, out, defaults=sub_defaults)


def render() -> str:
    out = ["# Configs reference", "",
           "<!-- Generated by scripts/gen_config_reference.py from the config dataclasses; do not edit. -->", "",
           "Every key of a config file, with its type, default and meaning. A config is YAML; "
           "`key=value` overrides on the command line use the same dotted keys (`train.lr=0.01`). "
           "Unknown keys, wrong types and bad values are errors naming the file, line and key. "
           "Regenerate this page with `python scripts/gen_config_reference.py` after changing a config class "
           "(a test fails while it is stale).", ""]
    section("top level", cfg.Config, "", 2, out)
    for title, base, prefix in (("data", cfg.DataOptions, "data."),
                                ("model.backbone", cfg.BackboneOptions, "model.backbone."),
                                ("model.architecture", cfg.ArchOptions, "model.architecture."),
                                ("model.heads.TASK", cfg.DenseHeadOptions, "model.heads.TASK."),
                                ("train.weighting", cfg.WeightingOptions, "train.weighting.")):
        registry_section(title, base, prefix, out)
    return "\n".join(out).rstrip() + "\n"


def render_cli() -> str:
    import argparse

    from taskloom import cli

    parser = cli._parser()
    parser.prog = "taskloom"
    out = ["# CLI reference", "",
           "<!-- Generated by scripts/gen_config_reference.py from the argparse parsers; do not edit. -->", "",
           "`taskloom COMMAND --help` prints the same text. Every `train` option is also a config key "
           "(see the [configs reference](configs.md)); `KEY=VALUE` overrides take dotted config keys.", "",
           "```text", parser.format_help().rstrip(), "```", ""]
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subparsers.choices.items():
        out += [f"## `taskloom {name}`", "", "```text", sub.format_help().rstrip(), "```", ""]
    return "\n".join(out).rstrip() + "\n"


def main(argv: list[str]) -> int:
    stale = []
    for page, text in ((PAGE, render()), (CLI_PAGE, render_cli())):
        if "--check" in argv:
            if not page.is_file() or page.read_text(encoding="utf-8") != text:
                stale.append(page)
        else:
            page.write_text(text, encoding="utf-8")
            print(f"wrote {page}")
    if stale:
        print(f"stale: {', '.join(map(str, stale))}; run python scripts/gen_config_reference.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
