"""Reading YAML config files and parsing ``KEY=VALUE`` overrides, with errors that say where.

A config file is read with ``yaml.safe_load`` after a check for duplicate keys (an error naming
both lines: YAML would silently keep the last). An override's value is parsed as YAML; a plain
value that is not valid YAML (``*.jpg``, ``@w.pt``) stays a string, but a value that opens a
flow collection or a quoted string (``{``, ``[``, ``"``, ``'``) and does not parse is an error.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

from taskloom.architectures import ArchOptions
from taskloom.backbones import BackboneOptions
from taskloom.data import DataOptions
from taskloom.errors import ConfigError


def _line_map(text: str) -> dict[str, int]:
    """Dotted key path -> 1-based line number, for error messages."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return {}
    lines: dict[str, int] = {}
    _walk(root, "", lines, [])
    return lines


def _walk(node: yaml.Node | None, path: str, lines: dict[str, int], duplicates: list[tuple[str, int, int]]) -> None:
    """Fill ``lines`` (dotted key -> line) and ``duplicates`` ((key, first line, second line))."""
    if isinstance(node, yaml.MappingNode):
        for key, child in node.value:
            sub = f"{path}.{key.value}" if path else str(key.value)
            line = key.start_mark.line + 1
            if sub in lines and key.value != "<<":
                duplicates.append((sub, lines[sub], line))
            lines[sub] = line
            _walk(child, sub, lines, duplicates)
    elif isinstance(node, yaml.SequenceNode):
        for i, child in enumerate(node.value):
            lines[f"{path}.{i}"] = child.start_mark.line + 1
            _walk(child, f"{path}.{i}", lines, duplicates)


def _yaml_error(source: str, exc: yaml.YAMLError) -> ConfigError:
    mark = getattr(exc, "problem_mark", None)
    where = f", line {mark.line + 1}" if mark is not None else ""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return ConfigError(f"{source}{where}: not valid YAML ({problem})")


def read_yaml(path: str | Path) -> tuple[dict[str, Any], dict[str, int]]:
    """Read a YAML mapping safely; returns it with its key -> line map.

    Duplicate keys are an error naming both lines; an empty file gives ``{}`` with a warning on
    stderr (the built-in defaults are then used)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, not a config file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc})") from None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        lines: dict[str, int] = {}
        duplicates: list[tuple[str, int, int]] = []
        _walk(root, "", lines, duplicates)
        if duplicates:
            key, first, second = duplicates[0]
            raise ConfigError(f"{path}, line {second}: duplicate key {key!r} (first set on line {first}); "
                              f"YAML would silently keep the last: remove one")
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise _yaml_error(str(path), exc) from None
    except (ValueError, TypeError, RecursionError) as exc:  # e.g. a huge or malformed timestamp
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if data is None:
        print(f"taskloom: warning: {path} is empty; using the built-in default config", file=sys.stderr)
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys at the top level")
    return data, lines


def parse_value(override: str, raw: str) -> Any:
    """An override's value: YAML, or the raw string when it is a plain value YAML cannot parse."""
    if not raw.strip():
        return None
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        if raw.lstrip()[:1] in ("{", "[", '"', "'"):
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ConfigError(f"override {override!r}: malformed YAML value ({problem})") from None
        return raw
    except (ValueError, TypeError, RecursionError):
        return raw


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply one ``dotted.key=value`` override in place; the value is parsed as YAML."""
    key, sep, raw = override.partition("=")
    parts = key.strip().split(".")
    if not sep or not key.strip() or not all(p.strip() for p in parts):
        raise ConfigError(f"override {override!r}: expected KEY=VALUE, for example train.lr=0.1")
    value = parse_value(override, raw)
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif isinstance(child, str):
            # A tagged shorthand ("split@2") being refined: expand it to its mapping first.
            child = node[part] = _expand_shorthand(parts[: i + 1], child)
        elif not isinstance(child, dict):
            raise ConfigError(
                f"override {override!r}: {'.'.join(parts[: i + 1])} is {child!r}, not a mapping"
            )
        node = child
    node[parts[-1]] = value


def _expand_shorthand(path: list[str], value: str) -> dict[str, Any]:
    tagged = {("data",): DataOptions, ("model", "backbone"): BackboneOptions,
              ("model", "architecture"): ArchOptions}
    base = tagged.get(tuple(path))
    return base.registry.expand(value) if base else {"name": value}
