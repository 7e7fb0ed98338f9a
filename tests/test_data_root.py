import pytest

from taskloom.data import DATA_ENV, DataOptions, resolve_root
from taskloom.errors import DataError


def test_resolution_order(tmp_path, monkeypatch):
    flag, env, home = tmp_path / "flag", tmp_path / "env", tmp_path / "home"
    for folder in (flag, env / "mtfl", home / "taskloom" / "mtfl"):
        folder.mkdir(parents=True)
    monkeypatch.setenv("XDG_DATA_HOME", str(home))
    monkeypatch.setenv(DATA_ENV, str(env))
    options = DataOptions(name="mtfl", root=str(flag))
    assert resolve_root(options, "mtfl", "") == flag
    options.root = None
    assert resolve_root(options, "mtfl", "") == env / "mtfl"
    monkeypatch.delenv(DATA_ENV)
    assert resolve_root(options, "mtfl", "") == home / "taskloom" / "mtfl"


def test_missing_everywhere_says_what_and_where(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    monkeypatch.delenv(DATA_ENV, raising=False)
    with pytest.raises(DataError, match=rf"no data folder given and {tmp_path}/taskloom/mtfl does not exist.*"
                                        rf"--data-root.*{DATA_ENV}.*Get it from the MTFL page"):
        resolve_root(DataOptions(name="mtfl"), "mtfl", "Get it from the MTFL page.")
