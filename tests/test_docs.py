"""The docs: generated reference pages are up to date, and the site builds in strict mode."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_generated_reference_pages_are_current():
    """docs/guide/configs.md and cli.md equal what scripts/gen_config_reference.py generates
    (in a fresh process: only the built-in registry entries)."""
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "gen_config_reference.py"), "--check"],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr + "\nregenerate with: python scripts/gen_config_reference.py"


def test_config_reference_lists_every_key():
    import dataclasses

    from taskloom.config import TrainConfig
    from taskloom.data import DATASETS

    text = (REPO / "docs" / "guide" / "configs.md").read_text()
    for field in dataclasses.fields(TrainConfig):
        assert f"`train.{field.name}`" in text
    for name in ("manifest", "mix", "mtfl", "multimnist"):
        assert name in DATASETS.names() and f"### `data: {name}`" in text


def test_config_reference_shows_each_parameter_groups_own_defaults():
    """The groups' defaults come from ParamGroups' default factories (fusion: x100, no decay),
    not from GroupOptions' class defaults."""
    import re

    import yaml

    from taskloom.config import ParamGroups

    text = (REPO / "docs" / "guide" / "configs.md").read_text()
    defaults = ParamGroups()
    for group in ("backbone", "fusion", "head", "weighting", "regularizer"):
        for key in ("lr_mult", "weight_decay"):
            row = re.search(rf"^\| `train\.groups\.{group}\.{key}` \|[^|]*\| `([^`]*)` \|", text, re.M)
            assert row, f"no row for train.groups.{group}.{key}"
            assert yaml.safe_load(row.group(1)) == getattr(getattr(defaults, group), key), (group, key)


# A repository path cited in prose: a token starting with one of these top-level folders (not
# inside a longer path such as ``runs/x/configs/...`` or ``../shared/data``), made of path
# characters, with a trailing full stop dropped. URLs are removed first; tokens with ``<...>``,
# ``{...}`` or ``...`` are placeholders and skipped; a token with ``*`` must match a file (glob).
# Paths under other folders (``runs/...``, ``RUN_DIR/...``) are outputs, not repository files.
_CITED = re.compile(r"(?<![\w./-])((?:configs|docs|taskloom|scripts|benchmarks|examples)/[\w./*<>{}-]*)")


def _cited_paths(text: str) -> list[str]:
    text = re.sub(r"[a-z][a-z0-9+.-]*://\S+", " ", text)
    tokens = (m.group(1) for m in _CITED.finditer(text))
    return [t.rstrip(".") for t in tokens if not re.search(r"[<>{}]|\.\.\.", t)]


def _help_texts() -> dict[str, str]:
    """``--help`` of ``taskloom`` and of every subcommand, at any depth (``taskloom data check``)."""
    import argparse

    from taskloom import cli

    texts, todo = {}, [cli._parser()]
    while todo:
        parser = todo.pop()
        texts[f"{parser.prog} --help"] = parser.format_help()
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                todo += action.choices.values()
    return texts


def test_every_repository_path_cited_in_the_docs_and_help_exists():
    sources = {str(p.relative_to(REPO)): p.read_text(encoding="utf-8")
               for p in [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]}
    sources.update(_help_texts())
    assert any(name.startswith("taskloom data check") for name in sources)  # nested subcommands too
    missing, checked = [], 0
    for source, text in sources.items():
        for path in _cited_paths(text):
            checked += 1
            if not (any(REPO.glob(path)) if "*" in path else (REPO / path).exists()):
                missing.append(f"{source}: {path}")
    assert checked > 50  # the rule still finds the citations
    assert not missing, "cited paths that do not exist:\n" + "\n".join(missing)


def test_cited_path_rule():
    text = ("see configs/a.yaml, `docs/guide/cli.md`. runs/x/configs/b.yaml ../shared/data/mtfl "
            "configs/multimnist/<file>.yaml https://github.com/o/r/blob/main/docs/x.md taskloom/{a,b}.py "
            "configs/multimnist/nddr*.yaml scripts/...")
    assert _cited_paths(text) == ["configs/a.yaml", "docs/guide/cli.md", "configs/multimnist/nddr*.yaml"]


def test_readme_links_into_the_guide():
    readme = (REPO / "README.md").read_text()
    assert "docs/guide/" in readme and "## Documentation" in readme


def _mkdocs() -> list[str]:
    pytest.importorskip("mkdocs", reason="mkdocs is not installed (pip install -e '.[docs]')")
    pytest.importorskip("mkdocstrings", reason="mkdocstrings is not installed (pip install -e '.[docs]')")
    return [sys.executable, "-m", "mkdocs", "build", "--strict"]


def test_site_builds_strict(tmp_path):
    done = subprocess.run(_mkdocs() + ["-d", str(tmp_path / "site")], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "site" / "api" / "index.html").read_text().count('id="taskloom.train.fit"') == 1


def test_strict_build_fails_on_a_broken_link(tmp_path):
    command = _mkdocs()
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "index.md").write_text("# x\n\nSee [the guide](guide/nope.md).\n")
    shutil.copy(REPO / "mkdocs.yml", tmp_path / "mkdocs.yml")
    config = (tmp_path / "mkdocs.yml").read_text()
    config = config.split("nav:")[0] + "validation:" + config.split("validation:")[1]  # no nav, no API plugin
    (tmp_path / "mkdocs.yml").write_text(config)
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "nope.md" in done.stdout + done.stderr
