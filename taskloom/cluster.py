"""Grids on a cluster: every run of ``taskloom compare`` as a task of a Dask cluster.

:class:`DaskBackend` is a :mod:`taskloom.runs` backend (``submit`` / ``wait`` / ``cancel``) on
`Dask distributed <https://distributed.dask.org>`_: a local cluster on this machine that listens
on 127.0.0.1 only (``--backend dask``), an existing scheduler (``--address tcp://host:8786`` or
a scheduler file), or any :class:`distributed.Client` (``DaskBackend(client=...)``, e.g. on a
``dask_jobqueue.SLURMCluster``).

Each run is one task, with the resources asked for (``--run-resources cpus=4,gpus=0.5``, Dask's
abstract worker resources), and trains *in the task's own process*: the worker calls the same
``run(config, run_dir, resume=...)`` as ``taskloom train``, so the engine sees the run, counts its
failures and retries it. Results, checkpoints and logs go to the run directories a local compare
uses, which on a cluster must be on a filesystem every worker and the client see.

Fault handling:

* a run that raises is reported with its error (``failed LABEL seed S: ConfigError: ...``) and
  the other runs go on; it is not retried (the same config would fail the same way);
* a worker that dies while training (killed, out of memory, pre-empted) is restarted and the run
  retried by the scheduler up to its ``allowed-failures`` (``--retries``; Dask's default is 3;
  Dask counts a death against every run the worker held, queued ones too); the retry resumes
  from the run's last checkpoint (``checkpoints/last.pt``, written at every epoch end);
* cancelling (Ctrl-C) releases the queued tasks and stops the running ones at their next
  training step; finished runs are not touched and ``--resume`` continues the others.

Ray was considered and not used: a local Ray cluster (2.60) listens on every interface (and on
the machine's external address) even with ``_node_ip_address='127.0.0.1'``; a Dask
``LocalCluster(host='127.0.0.1')`` listens on loopback only.

This module imports Dask only when a backend is made, so that the base install and
``taskloom --help`` do not need it.
"""
from __future__ import annotations

import ctypes
import datetime
import logging
import math
import os
import socket
import threading
import time
import traceback
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from taskloom.errors import ConfigError, TaskloomError
from taskloom.grid import Job
from taskloom.runs import write_job_config

EXTRA = "cluster"
INSTALL = f"pip install 'taskloom[{EXTRA}]'"
LOOPBACK = "127.0.0.1"


class RunFailed(Exception):
    """A run raised on a worker; the message is ``ExceptionType: message`` (the traceback is in
    the run's ``log.txt``)."""


class RunCancelled(BaseException):
    """Raised inside a running task's thread when its task was cancelled."""


def require_dask():
    """Import :mod:`distributed`, or fail with a message naming the extra to install."""
    try:
        import distributed
    except ImportError as exc:
        raise TaskloomError(
            f"--backend dask needs Dask distributed, which is not installed ({exc}); install the "
            f"'{EXTRA}' extra: {INSTALL}") from None
    return distributed


def parse_resources(text: str | None) -> dict[str, float]:
    """``"cpus=1,gpus=0.5"`` -> ``{"cpus": 1.0, "gpus": 0.5}``."""
    out: dict[str, float] = {}
    for item in (text or "").replace(" ", "").split(","):
        if not item:
            continue
        name, sep, value = item.partition("=")
        try:
            amount = float(value)
        except ValueError:
            amount = -1.0
        if not sep or not name or not amount > 0:
            raise ConfigError(f"--run-resources: {item!r} is not NAME=AMOUNT with a positive AMOUNT "
                              f"(for example cpus=1,gpus=0.5)")
        out[name] = amount
    return out


def local_cluster(workers: int, resources: dict[str, float] | None = None, retries: int | None = None,
                  dashboard_address: str | None = f"{LOOPBACK}:8787"):
    """A :class:`distributed.LocalCluster` on this machine that listens on 127.0.0.1 only:
    ``workers`` worker processes of one thread each (one run at a time), each offering
    ``resources`` (what one run asks for); a worker that dies is restarted, and its run retried
    up to ``retries`` times (``None``: Dask's ``distributed.scheduler.allowed-failures``, 3 by
    default). Dask's own log messages are silenced (a run's errors go to its
    ``log.txt`` and to the compare's summary)."""
    import dask

    distributed = require_dask()
    # Read whenever a worker is (re)started or lost, so set for good (in this process) here:
    # worker processes may start DataLoader workers (data.num_workers > 0), so not daemonic;
    # a killed worker is restarted by its nanny, and on a busy machine that can take longer
    # than the 15 s after which the cluster would otherwise give the worker up for good.
    # The nanny's default MALLOC_TRIM_THRESHOLD_=65536 makes glibc hand freed tensor memory back to
    # the system at once, and training pays for it in page faults: a default-grid run took 1.34x
    # its time with it (measured 2026-12-02, sys time 3 s -> 17 s). None: leave glibc's default.
    dask.config.set({"distributed.worker.daemon": False, "distributed.deploy.lost-worker-timeout": "10 minutes",
                     "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None})
    return distributed.LocalCluster(
        n_workers=workers, threads_per_worker=1, processes=True, host=LOOPBACK,
        dashboard_address=dashboard_address, resources=resources or None,
        scheduler_kwargs={} if retries is None else {"allowed_failures": retries},
        silence_logs=logging.CRITICAL, preload=[__name__])


def dask_setup(worker: Any) -> None:
    """Preload of the local cluster's workers (run at every worker start, restarts included).

    Ctrl-C in a terminal sends SIGINT to every process of the foreground group, the worker
    processes included; they ignore it and leave it to the client, which cancels the runs (a
    running one stops at its next step) and then closes the cluster.
    """
    import signal

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)


class DaskBackend:
    """A :mod:`taskloom.runs` backend: each job is a task of a Dask cluster.

    Args:
        address: a scheduler address (``tcp://host:8786``) or scheduler file (``.json``);
            ``None`` with no ``client``: start :func:`local_cluster` with ``workers`` workers.
        client: an existing :class:`distributed.Client` (left open by :meth:`close`).
        workers: workers of the local cluster.
        resources: Dask resources every run asks for (``{"cpus": 1, "gpus": 0.5}``); workers
            must offer them (``dask worker --resources "cpus=8 gpus=1"``). ``cpus`` also sets
            the run's torch threads.
        retries: how many deaths of a worker holding a run the run survives (it is started
            again, from its last checkpoint): the scheduler's ``allowed-failures``, set on it
            when given (it applies to every client of that scheduler); ``None``: the
            scheduler's setting (Dask's default: 3). Dask counts a death against every run the
            worker held, queued ones included.
        dashboard_address: the local cluster's dashboard (``None``: none).
        log: where to report the cluster (a function taking one string).
    """

    resubmit = 0  # the scheduler retries runs whose worker died; a run that raises is reported

    def __init__(self, address: str | None = None, *, client: Any = None, workers: int = 1,
                 resources: dict[str, float] | None = None, retries: int | None = None,
                 dashboard_address: str | None = f"{LOOPBACK}:8787", log: Callable[[str], None] = print):
        distributed = require_dask()
        self.resources = dict(resources or {})
        self._cluster = None
        self._own_client = client is None
        self._jobs: dict[Any, Job] = {}
        self._threads: int | None = None
        if client is not None:
            self.client = client
        elif address is None:
            self._cluster = local_cluster(workers, self.resources, retries, dashboard_address)
            self.client = distributed.Client(self._cluster)
            self._threads = max(1, (os.cpu_count() or 1) // workers)
        elif Path(address).suffix == ".json" or Path(address).is_file():
            self.client = distributed.Client(scheduler_file=address, timeout="30s")
        else:
            self.client = distributed.Client(address, timeout="30s")
        try:
            if "cpus" in self.resources:
                self._threads = max(1, math.ceil(self.resources["cpus"]))
            if retries is not None and self._cluster is None:
                self.client.run_on_scheduler(_set_allowed_failures, retries)
            self.retries = self.client.run_on_scheduler(_get_allowed_failures)
            self._check_resources(log)
            link = self._dashboard()
        except BaseException:
            self.close()
            raise
        where = "local cluster on 127.0.0.1" if self._cluster is not None else "cluster"
        self.description = (f"a Dask {where} at {self.client.scheduler.address} ({self._workers()})"
                            + (f", dashboard {link}" if link else "")
                            + f"; a run is retried after up to {self.retries} death(s) of a worker holding it")

    # ------------------------------------------------------------------ the backend interface

    def submit(self, job: Job) -> Any:
        key = f"taskloom-train-{job.label}-{job.run_dir.name}-{uuid.uuid4().hex[:6]}"
        future = self.client.submit(_dask_task, job.config, str(job.run_dir.resolve()), self._threads,
                                    key=key, pure=False, resources=self.resources or None)
        self._jobs[future] = job
        return future

    def wait(self, handles: list[Any]) -> list[tuple[Any, str | None]]:
        import distributed

        try:
            distributed.wait(handles, return_when="FIRST_COMPLETED")
        except BaseException as exc:  # a cancelled future is "done" too; anything else goes on up
            if type(exc).__name__ != "FuturesCancelledError":
                raise
        return [(f, self._error(f)) for f in handles if f.done()]

    def cancel(self, handles: list[Any], grace: float = 15.0) -> None:
        """Release the tasks: queued ones never start, running ones stop at their next step
        (see :func:`_dask_task`); waits up to ``grace`` seconds for the running ones to stop."""
        if not handles:
            return
        keys = [f.key for f in handles]
        self.client.cancel(handles)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            try:
                running = self.client.run(_executing, keys, on_error="ignore")
            except Exception:
                return
            if not any(running.values()):
                return
            time.sleep(0.25)

    def close(self) -> None:
        if self._own_client:
            self.client.close()
        if self._cluster is not None:
            self._cluster.close()

    # ------------------------------------------------------------------ helpers

    def _error(self, future: Any) -> str | None:
        if future.status == "finished":
            return None
        log = self._jobs[future].run_dir / "log.txt"
        if future.status != "error":
            return f"{future.status} on the cluster (see {log})"
        exc = future.exception()
        if type(exc).__name__ == "KilledWorker":
            return (f"a worker holding it died {self.retries + 1} time(s) (KilledWorker; retries: "
                    f"{self.retries}); see {log}")
        return f"{exc if isinstance(exc, RunFailed) else f'{type(exc).__name__}: {exc}'} (see {log})"

    def _all_workers(self) -> dict[str, Any]:
        try:
            return self.client.scheduler_info(n_workers=-1)["workers"]
        except TypeError:  # distributed before 2025: every worker without asking
            return self.client.scheduler_info()["workers"]

    def _workers(self) -> str:
        workers = self._all_workers()
        threads = sum(w.get("nthreads", 0) for w in workers.values())
        return f"{len(workers)} worker(s), {threads} thread(s)"

    def _check_resources(self, log: Callable[[str], None]) -> None:
        """Fail at once when no worker offers what a run asks for (its tasks would wait forever)."""
        if not self.resources:
            return
        workers = self._all_workers()
        fits = [a for a, w in workers.items()
                if all(w.get("resources", {}).get(k, 0) >= v for k, v in self.resources.items())]
        asked = ",".join(f"{k}={v:g}" for k, v in self.resources.items())
        if not workers:
            log(f"no Dask workers yet: runs wait for workers that offer {asked} "
                f"(dask worker ADDRESS --resources \"{asked.replace(',', ' ')}\")")
        elif not fits:
            offered = sorted({",".join(f"{k}={v:g}" for k, v in w.get("resources", {}).items()) or "none"
                              for w in workers.values()})
            raise ConfigError(
                f"--run-resources {asked}: no worker of the cluster offers that (workers offer: "
                f"{'; '.join(offered)}); start workers with dask worker ADDRESS --resources "
                f"\"{asked.replace(',', ' ')}\" or ask for less")

    def _dashboard(self) -> str | None:
        try:
            return self.client.dashboard_link or None
        except Exception:  # no dashboard (bokeh missing, or disabled)
            return None


def _executing(keys: list[Any], dask_worker=None) -> list[Any]:
    """The ``keys`` whose task thread is still running on this worker (cancelled or not)."""
    tasks = dask_worker.state.tasks
    return [k for k in keys if k in tasks and tasks[k].state in ("executing", "long-running", "cancelled")]


def _set_allowed_failures(n: int, dask_scheduler=None) -> None:
    dask_scheduler.allowed_failures = n


def _get_allowed_failures(dask_scheduler=None) -> int:
    return dask_scheduler.allowed_failures


# --------------------------------------------------------------------------- the task


def _dask_task(config: dict[str, Any], run_dir: str, threads: int | None) -> str:
    """One run as a Dask task: :func:`train_here`, stopped when the task is cancelled."""
    from distributed import get_worker

    worker = get_worker()
    key = _current_key()

    def cancelled() -> bool:
        task = worker.state.tasks.get(key)
        return task is None or task.state in ("cancelled", "released", "forgotten")

    return train_here(config, run_dir, threads, where=f"dask worker {worker.address}",
                      cancelled=cancelled if key is not None else None)


def _current_key() -> Any:
    try:
        from distributed.worker import thread_state

        return thread_state.key
    except (ImportError, AttributeError):  # a distributed without it: no stop on cancel
        return None


def train_here(config: dict[str, Any], run_dir: str | Path, threads: int | None = None, *,
               where: str = "this process", cancelled: Callable[[], bool] | None = None) -> str:
    """Train one grid job in this process, as ``taskloom train job.yaml --run-dir RUN_DIR
    [--resume]`` would: writes ``job.yaml``, appends to ``log.txt``, resumes from
    ``checkpoints/last.pt`` when there is one. ``threads``: torch threads (``None``: as they
    are; ``train.threads`` in the config wins). ``cancelled`` is polled twice a second; when it
    returns True the training stops (:class:`RunCancelled`) and the last checkpoint stays.
    Returns the path of ``final.json``; an error is written to ``log.txt`` and raised as
    :class:`RunFailed`."""
    import torch

    run_dir = Path(run_dir)
    stored = write_job_config(config, run_dir)
    resume = (run_dir / "checkpoints" / "last.pt").is_file()
    log = _FileLog(run_dir / "log.txt")
    if threads:
        torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(False)  # as in a fresh process (train.deterministic sets it)
    log(f"# {datetime.datetime.now().isoformat(timespec='seconds')} on {where} (host "
        f"{socket.gethostname()}, pid {os.getpid()}, {torch.get_num_threads()} thread(s))"
        + (", resuming from checkpoints/last.pt" if resume else ""))
    try:
        with _stopped_when(cancelled):
            _run_experiment(stored, run_dir, resume=resume, log=log)
    except RunCancelled:
        log("# cancelled; the last checkpoint is kept (continue with --resume)")
        raise
    except BaseException as exc:
        log(traceback.format_exc().rstrip())
        raise RunFailed(f"{type(exc).__name__}: {exc}") from None
    return str(run_dir / "final.json")


def _run_experiment(config_path: Path, run_dir: Path, *, resume: bool, log: Callable[..., None]) -> None:
    """What ``taskloom train CONFIG --run-dir RUN_DIR [--resume]`` runs (``taskloom.cli._train``)."""
    from taskloom import config as cfg
    from taskloom.experiment import run

    run(cfg.load(config_path), run_dir, resume=resume, log=log)


class _FileLog:
    """``log(*parts)``: one line appended to a file (``print``-like, flushed at once)."""

    def __init__(self, path: Path):
        self.path = path

    def __call__(self, *parts: Any) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(" ".join(str(p) for p in parts) + "\n")


@contextmanager
def _stopped_when(cancelled: Callable[[], bool] | None, every: float = 0.5) -> Iterator[None]:
    """Raise :class:`RunCancelled` in this thread once ``cancelled()`` is true.

    Dask cannot stop a running task (it runs in a worker thread); a watcher thread polls
    ``cancelled`` and raises the exception asynchronously in the training thread, where it
    surfaces at the next Python instruction (within a training step). Checkpoints are written
    atomically, so the last one stays whole.
    """
    if cancelled is None:
        yield
        return
    target = threading.get_ident()
    lock = threading.Lock()
    done = threading.Event()
    state = {"fired": False}

    def watch() -> None:
        while not done.wait(every):
            try:
                stop = cancelled()
            except Exception:
                stop = False
            if stop:
                with lock:
                    if not done.is_set():
                        state["fired"] = True
                        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(target),
                                                                   ctypes.py_object(RunCancelled))
                return

    watcher = threading.Thread(target=watch, name="taskloom-cancel-watch", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        with lock:
            done.set()
        watcher.join()
