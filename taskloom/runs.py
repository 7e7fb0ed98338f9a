"""Running a grid's jobs: an execution backend, retries, and resume against stored configs.

:func:`run_jobs` hands each unfinished :class:`~taskloom.grid.Job` to a *backend*, reports one
line per finished run, and returns the runs that failed (with their errors) once every other
run is done. A backend has three methods and two attributes:

* ``submit(job) -> handle``: start the job (train ``job.config`` into ``job.run_dir``, resuming
  from ``job.run_dir/checkpoints/last.pt`` when there is one);
* ``wait(handles) -> [(handle, error), ...]``: block until at least one of ``handles`` has
  finished, and return the finished ones; ``error`` is ``None`` for a run that succeeded, else
  one line saying why it failed;
* ``cancel(handles)``: stop the given jobs (started or queued); finished runs are not touched;
* ``resubmit``: how many times :func:`run_jobs` submits a failed job again (a backend whose
  engine retries by itself says 0);
* ``description``: where the jobs run, for the first line of the log.

``close()``, when a backend has it, is called once :func:`run_jobs` is done with a backend it
created. :class:`LocalBackend` runs jobs as ``taskloom train`` subprocesses on this machine;
:class:`taskloom.cluster.DaskBackend` runs each job as a task of a Dask cluster.
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from pathlib import Path
from typing import Any, Callable, NamedTuple, Protocol, Union

import yaml

from taskloom.errors import ConfigError
from taskloom.grid import Job


class Backend(Protocol):
    resubmit: int
    description: str

    def submit(self, job: Job) -> Any: ...

    def wait(self, handles: list[Any]) -> list[tuple[Any, str | None]]: ...

    def cancel(self, handles: list[Any]) -> None: ...


class Failed(NamedTuple):
    """A run that failed for good: its job and the last error."""

    job: Job
    error: str


class LocalBackend:
    """Jobs as ``taskloom train`` subprocesses on this machine, ``workers`` at a time, the CPU
    threads split evenly among them; a failed job is submitted again ``retries`` times (it
    resumes from its last checkpoint). A handle is a :class:`concurrent.futures.Future` of the
    exit status."""

    def __init__(self, workers: int = 1, threads: int | None = None, retries: int = 1):
        self.threads = threads or max(1, (os.cpu_count() or 1) // workers)
        self.resubmit = retries
        self.description = f"{workers} local process(es) of {self.threads} thread(s)"
        self._pool = ThreadPoolExecutor(max_workers=workers)
        self._jobs: dict[Future, Job] = {}
        self._procs: dict[Path, subprocess.Popen] = {}
        self._cancelled: set[Path] = set()
        self._lock = threading.Lock()

    def submit(self, job: Job) -> Future:
        handle = self._pool.submit(launch, job, self.threads, self._started)
        self._jobs[handle] = job
        return handle

    def wait(self, handles: list[Future]) -> list[tuple[Future, str | None]]:
        done, _ = wait_futures(handles, return_when=FIRST_COMPLETED)
        return [(h, self._error(h)) for h in handles if h in done]

    def _error(self, handle: Future) -> str | None:
        if handle.cancelled():
            return "cancelled"
        code = handle.result()
        if code == 0:
            return None
        log = self._jobs[handle].run_dir / "log.txt"
        return f"exit {code}" + (f": {_last_line(log)}" if _last_line(log) else "") + f" (see {log})"

    def cancel(self, handles: list[Future]) -> None:
        with self._lock:
            for handle in handles:
                if not handle.cancel():  # already running: stop its process (it saves a checkpoint)
                    self._cancelled.add(self._jobs[handle].run_dir)
                    proc = self._procs.get(self._jobs[handle].run_dir)
                    if proc is not None:
                        proc.terminate()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _started(self, job: Job, proc: subprocess.Popen | None) -> None:
        with self._lock:
            if proc is None:
                self._procs.pop(job.run_dir, None)
                return
            self._procs[job.run_dir] = proc
            if job.run_dir in self._cancelled:
                proc.terminate()


def _last_line(path: Path) -> str:
    """The last non-empty line of a log file ('' if there is none)."""
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return ""
    return next((line.strip() for line in reversed(lines) if line.strip()), "")


def launch(job: Job, threads: int, started: Callable[[Job, Any], None] = lambda job, proc: None) -> int:
    """Train one job in a subprocess (resuming from its last checkpoint if it has one); return
    the exit status. Writes ``job.yaml`` (the resolved config) and appends to ``log.txt``."""
    write_job_config(job.config, job.run_dir)
    cmd = [sys.executable, "-m", "taskloom", "train", str(job.stored_config), "--run-dir", str(job.run_dir)]
    if (job.run_dir / "checkpoints" / "last.pt").is_file():
        cmd.append("--resume")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    with open(job.run_dir / "log.txt", "a", encoding="utf-8") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        started(job, proc)
        try:
            return proc.wait()
        finally:
            started(job, None)


def write_job_config(config: dict[str, Any], run_dir: Path) -> Path:
    """Create ``run_dir`` and write the job's resolved config to ``run_dir/job.yaml``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "job.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


BackendSpec = Union[Backend, Callable[[], Backend], None]


def run_jobs(jobs: list[Job], workers: int = 1, resume: bool = False, log=print,
             backend: BackendSpec = None) -> list[Failed]:
    """Run the unfinished jobs on ``backend`` and return the runs that failed for good.

    ``backend``: a backend, a function that makes one (called only when something is left to
    run; the backend is closed at the end), or ``None`` for a :class:`LocalBackend` with
    ``workers``. A failed job is submitted again ``backend.resubmit`` times (it resumes from its
    last checkpoint); a run that still fails is logged with its error and the others go on.
    On an interrupt (Ctrl-C) the outstanding jobs are cancelled and finished runs stay as they
    are. Without ``resume``, a run root that already holds runs of these jobs is refused.
    """
    todo = [j for j in jobs if not j.final.is_file()]
    if not resume and (len(todo) < len(jobs) or any(j.run_dir.exists() for j in todo)):
        raise ConfigError(
            f"{jobs[0].run_dir.parent.parent} already holds runs of this grid; pass --resume to skip "
            f"finished runs and continue the others, or choose another --run-root"
        )
    finished = len(jobs) - len(todo)
    if not todo:
        log(f"{len(jobs)} runs, {finished} already finished, 0 to run")
        return []
    own = backend is None or not hasattr(backend, "submit")
    backend = LocalBackend(workers) if backend is None else backend if not own else backend()
    failed: list[Failed] = []
    pending: dict[Any, tuple[Job, int]] = {}
    try:
        log(f"{len(jobs)} runs, {finished} already finished, {len(todo)} to run on {backend.description}")
        for job in todo:
            pending[backend.submit(job)] = (job, 0)
        while pending:
            for handle, error in backend.wait(list(pending)):
                job, attempt = pending.pop(handle)
                if error is None and not job.final.is_file():
                    error = f"finished without writing {job.final}"
                if error is None:
                    finished += 1
                    log(f"done   [{finished}/{len(jobs)}] {job.label} seed {job.seed} ({job.run_dir})")
                    continue
                again = attempt < backend.resubmit
                log(f"failed {job.label} seed {job.seed}: {error}"
                    + ("; retrying from its last checkpoint" if again else ""))
                if again:
                    pending[backend.submit(job)] = (job, attempt + 1)
                else:
                    failed.append(Failed(job, error))
    except BaseException:
        if pending:
            backend.cancel(list(pending))
            log(f"stopped: cancelled {len(pending)} outstanding run(s); finished runs are kept "
                f"(continue with --resume)")
        raise
    finally:
        if own and hasattr(backend, "close"):
            backend.close()
    return failed


# --------------------------------------------------------------------------- resume


CHANGED_POLICIES = ("stop", "keep", "rerun")


def changed_keys(stored: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[tuple[str, Any, Any]]:
    """``(dotted key, stored value, new value)`` for every key present in both configs whose
    value differs. Keys only one side has (an option added or removed since) do not count."""
    out = []
    for key in [k for k in stored if k in new]:
        a, b, path = stored[key], new[key], f"{prefix}.{key}" if prefix else str(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += changed_keys(a, b, path)
        elif a != b:
            out.append((path, a, b))
    return out


def reconcile_stored_configs(jobs: list[Job], policy: str = "stop", log=print) -> list[Job]:
    """Compare each started run's stored config (``job.yaml``) with the newly resolved one.

    The fingerprint ignores default values, so a run that relied on a default which has changed
    since keeps its directory. Such runs are never silently reused nor silently rerun:

    * ``stop``: raise :class:`~taskloom.errors.ConfigError` listing the runs and changed keys;
    * ``keep``: keep them as they are (finished results are reused; an interrupted run continues
      with its stored config), and say so;
    * ``rerun``: move each aside (to ``<run dir>.replaced``, ``.replaced-2``, ...) and run it again.

    Returns the jobs whose stored config differs.
    """
    if policy not in CHANGED_POLICIES:
        raise ConfigError(f"unknown policy {policy!r} for runs with a changed config; choose one of {CHANGED_POLICIES}")
    changed = []
    for job in jobs:
        if not job.stored_config.is_file():
            continue
        stored = yaml.safe_load(job.stored_config.read_text(encoding="utf-8")) or {}
        keys = changed_keys(stored, job.config)
        if keys:
            changed.append((job, stored, keys))
    lines = [f"  {job.label} seed {job.seed} ({job.run_dir}): "
             + "; ".join(f"{k} {a!r} -> {b!r}" for k, a, b in keys) for job, _, keys in changed]
    if changed and policy == "stop":
        raise ConfigError(
            f"{len(changed)} run(s) were started with a config that differs from what the grid resolves to "
            "now (a changed default?):\n" + "\n".join(lines) + "\npass --changed keep to use them as they are "
            "(stored config), or --changed rerun to move them aside and run them again")
    for (job, stored, _), line in zip(changed, lines):
        if policy == "keep":
            job.config = stored
            log(f"kept (stored config) {line.strip()}")
        else:
            aside = _free_name(job.run_dir.with_name(job.run_dir.name + ".replaced"))
            job.run_dir.rename(aside)
            log(f"rerun (old run moved to {aside}) {line.strip()}")
    return [job for job, _, _ in changed]


def _free_name(path: Path) -> Path:
    n, candidate = 1, path
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    return candidate
