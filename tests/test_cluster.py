"""``taskloom compare --backend dask``: a grid on a Dask cluster.

The cluster is started here (2 worker processes of 1 thread, each offering ``cpus=1``) and, like
the one ``taskloom compare --backend dask`` starts, listens on 127.0.0.1 only: a sampler watches
every socket of this process and its children while the module runs, and the last test checks
that none was on another address. Needs the ``cluster`` extra (``pip install -e '.[cluster]'``),
which CI installs. The tests that start a cluster are marked slow (``.ci/run`` runs them).
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from taskloom import summary
from taskloom.cli import main

TINY = ["train.epochs=1", "data.train_pairs=256", "data.val_pairs=64", "data.test_pairs=64",
        "model.backbone.channels=[4,8]", "model.backbone.hidden=16", "train.progress=false", "train.threads=1"]
BROKEN = {"label": "broken", "architecture": "split@1", "overrides": ["train.select=left/nope"]}  # fails in fit


def _grid(path: Path, architectures: list) -> Path:
    path.write_text(yaml.safe_dump({"base": None, "overrides": TINY, "seeds": 1, "architectures": architectures}))
    return path


def _is_loopback(ip: str) -> bool:
    return ip.startswith("127.") or ip in ("::1", "localhost") or ip.startswith("::ffff:127.")


class SocketSampler:
    """Every 0.2 s: the listening sockets and remote ends of this process and its children."""

    def __init__(self):
        import psutil

        self.psutil = psutil
        self.listening: set[tuple[int, str, int]] = set()
        self.remote: set[tuple[int, str, int]] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def sample(self) -> None:
        me = self.psutil.Process()
        for proc in [me, *me.children(recursive=True)]:
            try:
                connections = proc.net_connections(kind="inet")
            except (self.psutil.NoSuchProcess, self.psutil.AccessDenied, self.psutil.ZombieProcess):
                continue
            for c in connections:
                if c.status == self.psutil.CONN_LISTEN or (c.laddr and not c.raddr and c.type == socket.SOCK_DGRAM):
                    self.listening.add((proc.pid, c.laddr.ip, c.laddr.port))
                if c.raddr:
                    self.remote.add((proc.pid, c.raddr.ip, c.raddr.port))

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self.sample()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture(scope="module")
def sockets():
    pytest.importorskip("psutil", reason="psutil comes with the 'cluster' extra (pip install -e '.[cluster]')")
    sampler = SocketSampler()
    yield sampler
    sampler.stop()


@pytest.fixture(scope="module")
def cluster(sockets):
    """A loopback-only local cluster: 2 workers x 1 thread, cpus=1 each, a dead worker's run retried once."""
    pytest.importorskip("distributed", reason="the 'cluster' extra is not installed (pip install -e '.[cluster]')")
    from distributed import Client

    from taskloom.cluster import local_cluster

    cluster = local_cluster(2, {"cpus": 1}, retries=1, dashboard_address="127.0.0.1:0")
    client = Client(cluster)
    sockets.sample()
    yield cluster, client
    sockets.sample()
    client.close()
    cluster.close()


def _address(cluster) -> str:
    return cluster[0].scheduler_address


def _log(out: Path, label: str) -> Path:
    found = list(out.glob(f"{label}/*/log.txt"))
    return found[0] if found else out / label / "none" / "log.txt"


def _attempts(text: str) -> list[int]:
    """The worker pids of a run's attempts (the ``# ... pid N`` header of each)."""
    return [int(m) for m in re.findall(r"^# .* pid (\d+),", text, flags=re.M)]


def _rows(path: Path) -> dict[tuple, dict]:
    return {(r["label"], r["seed"], r["task"]): r for r in summary.read_csv(path)}


# --------------------------------------------------------------------------- without the extra


def test_without_the_extra_the_cluster_backend_fails_at_once_naming_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "distributed", None)  # as if not installed: import raises ImportError
    grid = _grid(tmp_path / "grid.yaml", ["split@1"])
    assert main(["compare", str(grid), "--backend", "dask", "--run-root", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "pip install 'taskloom[cluster]'" in err and "cluster" in err
    assert not (tmp_path / "out").exists()


def test_flags_of_the_cluster_backend_need_it(tmp_path, capsys):
    grid = _grid(tmp_path / "grid.yaml", ["split@1"])
    assert main(["compare", str(grid), "--run-resources", "cpus=1", "--run-root", str(tmp_path / "o")]) == 2
    assert "--run-resources need --backend dask" in capsys.readouterr().err


def test_run_resources_are_parsed():
    from taskloom.cluster import parse_resources
    from taskloom.errors import ConfigError

    assert parse_resources("cpus=1, gpus=0.5") == {"cpus": 1.0, "gpus": 0.5}
    assert parse_resources(None) == {}
    for bad in ("cpus", "cpus=0", "gpus=x", "=1"):
        with pytest.raises(ConfigError, match="NAME=AMOUNT"):
            parse_resources(bad)


# --------------------------------------------------------------------------- same results, failures


@pytest.fixture(scope="module")
def compared(cluster, tmp_path_factory):
    """The same grid (4 runs and one that raises) with the local backend and on the cluster."""
    root = tmp_path_factory.mktemp("cluster-cmp")
    grid = _grid(root / "grid.yaml", ["split@1", "cross_stitch", BROKEN])
    local = main(["compare", str(_grid(root / "local.yaml", ["split@1", "cross_stitch"])),
                  "--run-root", str(root / "local"), "--jobs", "2"])
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        on_cluster = main(["compare", str(grid), "--run-root", str(root / "dask"), "--backend", "dask",
                           "--address", _address(cluster), "--run-resources", "cpus=1"])
    return root, local, on_cluster, out.getvalue(), err.getvalue()


@pytest.mark.slow
def test_the_cluster_gives_the_rows_of_the_local_backend(compared):
    root = compared[0]
    a, b = _rows(root / "local" / "results.csv"), _rows(root / "dask" / "results.csv")
    assert sorted(a) == sorted(b) == [("cross_stitch", 0, None), ("single-task", 0, "left"),
                                      ("single-task", 0, "right"), ("split@1", 0, None)]
    for key in a:
        assert set(a[key]) == set(b[key])
        for column, value in a[key].items():
            if column in ("run_dir", "seconds"):
                continue
            if isinstance(value, float):
                assert math.isclose(value, b[key][column], rel_tol=1e-6, abs_tol=1e-9), (key, column)
            else:
                assert value == b[key][column], (key, column)
    # the same run directories (names) on both backends, so --resume works across them
    assert sorted(p.relative_to(root / "local") for p in (root / "local").glob("*/*/final.json")) == \
        sorted(p.relative_to(root / "dask") for p in (root / "dask").glob("*/*/final.json"))
    assert (root / "dask" / "results.md").is_file() and (root / "dask" / "relative_change.png").is_file()


@pytest.mark.slow
def test_a_run_that_raises_is_reported_and_the_others_go_on(compared):
    root, local, on_cluster, out, err = compared
    assert local == 0 and on_cluster == 1  # one run failed; every other one finished
    assert len(list((root / "dask").glob("*/*/final.json"))) == 4
    log = _log(root / "dask", "broken").read_text()
    assert len(_attempts(log)) == 1  # an error is reported, not retried
    assert "ConfigError: train.select: 'left/nope'" in log  # the traceback is in the run's log
    # progress: the cluster and its dashboard, one line per finished run, the failure with its error
    assert "5 runs, 0 already finished, 5 to run on a Dask cluster at tcp://127.0.0.1:" in out
    assert "(2 worker(s), 2 thread(s)), dashboard http://127.0.0.1:" in out
    assert [int(n) for n in re.findall(r"^done   \[(\d)/5\] ", out, flags=re.M)] == [1, 2, 3, 4]
    assert "failed broken seed 0: ConfigError: train.select: 'left/nope' is not one of" in out
    assert "1 run(s) failed:\n  broken seed 0 (" in err and "ConfigError" in err


@pytest.mark.slow
def test_runs_asking_for_resources_no_worker_offers_fail_at_once(cluster, tmp_path, capsys):
    grid = _grid(tmp_path / "grid.yaml", ["split@1"])
    assert main(["compare", str(grid), "--run-root", str(tmp_path / "out"), "--backend", "dask",
                 "--address", _address(cluster), "--run-resources", "cpus=1,gpus=1"]) == 2
    err = capsys.readouterr().err
    assert "no worker of the cluster offers that" in err and "cpus=1" in err


# --------------------------------------------------------------------------- dead workers


def _kill_attempts(log, times: int, after: str = "", stop: threading.Event | None = None) -> list[int]:
    """In a thread: SIGKILL the worker of each of a run's first ``times`` attempts (read from the
    headers of its ``log.txt``), once ``after`` appears in that attempt's log. Returns the pids
    killed (filled in as it goes)."""
    import psutil

    killed: list[int] = []

    def kill() -> None:
        while len(killed) < times and not stop.wait(0.05):
            path = log() if callable(log) else log
            if not path.is_file():
                continue
            text = path.read_text()
            pids = _attempts(text)
            if len(pids) <= len(killed) or after not in text.rsplit("\n# ", 1)[-1]:
                continue
            pid = pids[-1]
            assert pid in {p.pid for p in psutil.Process().children(recursive=True)}  # one of our workers
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    threading.Thread(target=kill, daemon=True).start()
    return killed


@pytest.mark.slow
def test_a_killed_worker_is_retried_and_its_run_resumes_from_its_checkpoint(cluster, tmp_path, capsys):
    """The worker training ``victim`` is killed (SIGKILL) after its first epoch: Dask restarts the
    worker and retries the run, which resumes from its checkpoint (epoch 2), not from scratch."""
    grid = _grid(tmp_path / "grid.yaml", [
        {"label": "victim", "architecture": "split@1", "overrides": ["train.epochs=4", "data.train_pairs=1024"]}])
    out = tmp_path / "out"
    stop = threading.Event()
    killed = _kill_attempts(lambda: _log(out, "victim"), 1, after="epoch 1/4", stop=stop)
    try:
        code = main(["compare", str(grid), "--run-root", str(out), "--backend", "dask",
                     "--address", _address(cluster), "--retries", "1"])
    finally:
        stop.set()
    captured = capsys.readouterr()
    assert code == 0 and len(killed) == 1, captured.out + captured.err
    victim = _log(out, "victim").parent
    log = (victim / "log.txt").read_text()
    assert _attempts(log)[0] == killed[0] and len(_attempts(log)) == 2
    first, second = log.split("resuming from checkpoints/last.pt", 1)
    epochs_before = len(re.findall(r"^epoch \d/4", first, flags=re.M))
    restart = int(re.search(r"resuming .* at epoch (\d+), step 0", second).group(1))
    assert restart >= 2 and restart - 1 in (epochs_before, epochs_before + 1)  # its checkpoint, not epoch 1
    epochs = [json.loads(line)["epoch"] for line in (victim / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3, 4] and (victim / "final.json").is_file()
    assert ("victim", 0, None) in _rows(out / "results.csv")


@pytest.mark.slow
def test_a_run_whose_worker_keeps_dying_is_reported_at_the_retry_limit(cluster, tmp_path):
    """With retries=1, the second death of the worker training a run fails it (KilledWorker)."""
    from taskloom.cluster import DaskBackend
    from taskloom.grid import expand, load_grid
    from taskloom.runs import run_jobs

    grid = _grid(tmp_path / "grid.yaml", [{"label": "doomed", "architecture": "split@1",
                                           "overrides": ["train.epochs=4", "data.train_pairs=1024"]}])
    job = next(j for j in expand(load_grid(grid), 1, tmp_path / "out") if j.label == "doomed")
    stop = threading.Event()
    killed = _kill_attempts(job.run_dir / "log.txt", 2, stop=stop)
    lines: list[str] = []
    try:
        failed = run_jobs([job], resume=False, log=lines.append,
                          backend=lambda: DaskBackend(client=cluster[1], retries=1, log=lines.append))
    finally:
        stop.set()
    assert len(killed) == 2 and len(_attempts((job.run_dir / "log.txt").read_text())) == 2
    assert [f.job for f in failed] == [job]
    assert "KilledWorker" in failed[0].error and "retries: 1" in failed[0].error
    assert any(line.startswith("failed doomed seed 0: a worker holding it died 2 time(s)") for line in lines)


# --------------------------------------------------------------------------- Ctrl-C, --resume


@pytest.mark.slow
def test_ctrl_c_cancels_outstanding_runs_and_resume_skips_finished_ones(cluster, tmp_path, capsys):
    """SIGINT to the process group of ``taskloom compare --backend dask`` (its own local cluster,
    as Ctrl-C in a terminal): the running run stops at its checkpoint, queued runs never start,
    every process exits; ``--resume`` (here on the test's cluster) skips the finished runs."""
    import psutil

    grid = _grid(tmp_path / "grid.yaml", [
        {"label": "long", "architecture": "split@1", "overrides": ["train.epochs=8", "data.train_pairs=1024"]},
        "cross_stitch"])
    out = tmp_path / "out"
    with open(tmp_path / "compare.log", "w") as stdout:
        proc = subprocess.Popen([sys.executable, "-m", "taskloom", "compare", str(grid), "--run-root", str(out),
                                 "--backend", "dask", "--jobs", "2"], stdout=stdout, stderr=subprocess.STDOUT,
                                start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                # default SIGINT, as in a terminal (a shell's background job inherits it ignored)
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 240
        while "epoch 1/8" not in (_log(out, "long").read_text() if _log(out, "long").is_file() else ""):
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "compare.log").read_text()
            time.sleep(0.1)
        children = psutil.Process(proc.pid).children(recursive=True)
        finished = {p: p.stat().st_mtime_ns for p in out.glob("*/*/final.json")}
        started = {p.parent for p in out.glob("*/*/log.txt")}
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=120) == 130
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    output = (tmp_path / "compare.log").read_text()
    assert "stopped: cancelled" in output and "taskloom: interrupted" in output
    assert "Traceback" not in output  # the workers leave Ctrl-C to the client
    psutil.wait_procs(children, timeout=30)
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    long_log = _log(out, "long").read_text()
    assert long_log.rstrip().endswith("# cancelled; the last checkpoint is kept (continue with --resume)")
    assert not (_log(out, "long").parent / "final.json").exists()
    after = {p: p.stat().st_mtime_ns for p in out.glob("*/*/final.json")}
    assert all(after.get(p) == t for p, t in finished.items())  # the finished runs are intact
    # A run already past its last step at the signal (in its test pass) may still finish; a queued
    # run never starts, so only runs that had started can have been added.
    assert {p.parent for p in after} - {p.parent for p in finished} <= started
    finished = after

    assert main(["compare", str(grid), "--run-root", str(out), "--backend", "dask", "--address", _address(cluster),
                 "--resume"]) == 0
    captured = capsys.readouterr().out
    assert f"4 runs, {len(finished)} already finished, {4 - len(finished)} to run" in captured
    assert all(p.stat().st_mtime_ns == t for p, t in finished.items())
    resumed = _log(out, "long").read_text()
    assert "resuming from checkpoints/last.pt" in resumed.split("# cancelled", 1)[1]
    assert len(list(out.glob("*/*/final.json"))) == 4


@pytest.mark.slow
def test_the_local_clusters_workers_keep_glibcs_memory_trimming_default(cluster):
    """Dask's nanny sets MALLOC_TRIM_THRESHOLD_=65536 in its workers by default, which cost a
    training run 1.34x its time (docs/scaling.md); taskloom's local cluster leaves it unset."""
    _, client = cluster
    seen = client.run(os.environ.get, "MALLOC_TRIM_THRESHOLD_")
    assert len(seen) == 2 and set(seen.values()) == {None}


# --------------------------------------------------------------------------- loopback only


@pytest.mark.slow
def test_every_socket_was_on_loopback(sockets, cluster):
    """Runs last in this module: every socket this process and its children (the cluster's
    workers, and the compare subprocess with its own cluster) listened on or connected to while
    the module ran was on 127.0.0.1."""
    sockets.sample()
    assert any(port == int(_address(cluster).rsplit(":", 1)[1]) for _, _, port in sockets.listening)
    assert len({pid for pid, _, _ in sockets.listening}) >= 3  # this process and both workers
    assert [s for s in sockets.listening if not _is_loopback(s[1])] == []
    assert [s for s in sockets.remote if not _is_loopback(s[1])] == []
