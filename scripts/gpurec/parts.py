"""The parts of a run that start processes: tests, benchmark, studies; and the bundle."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

from gpurec.common import Log, REPO, SCRIPT, load_script, mib
from gpurec.probe import grid_jobs


# Process groups of the parts running now: stopped with the script (they run in their own
# sessions, so that a deadline can stop a whole group, and would not see its SIGTERM otherwise).
CHILDREN: set[int] = set()


def stop_children() -> None:
    for pgid in list(CHILDREN):
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            pass


def run_logged(cmd: list[str], log_path: Path, env: dict[str, str], timeout: float | None, log: Log) -> dict[str, Any]:
    """Run a command in its own process group, output to ``log_path``; stop the group at the
    timeout (SIGTERM, then SIGKILL after 15 s)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    log(f"$ {' '.join(cmd)}  (> {log_path.name}{f', {timeout:.0f} s at most' if timeout else ''})")
    with open(log_path, "a", encoding="utf-8") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)
        CHILDREN.add(proc.pid)
        timed_out = False
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                code = proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                code = proc.wait()
        except BaseException:  # the script is stopping (SIGTERM, Ctrl-C): so does the part
            stop_children()
            raise
        finally:
            CHILDREN.discard(proc.pid)
    return {"returncode": code, "seconds": round(time.perf_counter() - started, 1), "timed_out": timed_out,
            "log": str(log_path)}


def part_tests(args, out: Path, env: dict[str, str], device: str, timeout: float, log: Log) -> dict[str, Any]:
    tests = (["tests/test_batched_towers.py::test_off_is_default_and_bad_value", "tests/test_gpu_record.py::test_codec_round_trip"]
             if args.tiny else ["tests/test_batched_towers.py", "tests/test_packed_towers.py", "tests/test_checkpointing.py",
                                  "tests/test_epoch_sums.py", "tests/test_gpu_record.py"])
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests,
           "--junitxml", str(out / "tests" / "junit.xml")]
    result = run_logged(cmd, out / "tests" / "pytest.log", dict(env, TASKLOOM_TEST_DEVICE=device), timeout, log)
    tail = (out / "tests" / "pytest.log").read_text(errors="replace").strip().splitlines()[-1:]
    result["summary"] = tail[0] if tail else ""
    log(f"tests: {result['summary']} (exit {result['returncode']}, {result['seconds']} s)")
    return result


BENCH_MODES = {"fp32": [], "bf16": ["--bf16"], "bf16_cl": ["--bf16", "--channels-last"]}


def bench_args(args, device: str) -> tuple[list[str], list[str]]:
    """Common arguments of benchmarks/step_time.py and its sections (one call per section)."""
    if args.tiny:
        return (["--device", device, "--threads", "1", "--rounds", "1", "--warmup", "0", "--backbones", "lenet",
                 "--ks", "3", "--plot", ""], ["batched"])
    return (["--device", device, "--threads", "4", "--rounds", str(args.bench_rounds), "--warmup", "3",
             "--backbones", "lenet", "tcdcn", "tcdcn_bn", "--ks", "3", "5", "--memory", "--plot", ""], ["batched", "fusion"])


def bench_worker(args) -> int:
    """Every precision and section of benchmarks/step_time.py in this one process (one start-up);
    a section that fails is recorded as an error row instead of losing the rest."""
    import traceback

    step_time = load_script(REPO / "benchmarks" / "step_time.py", "taskloom_step_time")
    original = step_time.make
    common = json.loads(args.common)
    out = Path(args.out)
    failed = 0
    for tag in args.tags:
        merged: dict[str, Any] = {"rows": [], "errors": []}
        for section in args.sections:
            path = out / f"gpu_{tag}_{section}.json"
            argv = [*common, *BENCH_MODES[tag], "--sections", section, "--json", str(path)]
            print(f"== {tag} {section}: step_time.py {' '.join(argv)}", flush=True)
            started = time.perf_counter()
            try:
                step_time.main(argv)
                part = json.loads(path.read_text())
                merged["machine"] = part["machine"]
                merged["rows"] += part["rows"]
            except Exception as exc:  # e.g. vmapped towers under bf16 autocast
                failed += 1
                traceback.print_exc()
                merged["errors"].append({"section": section, "error": f"{type(exc).__name__}: {exc}"})
            finally:
                step_time.make = original
                path.unlink(missing_ok=True)
            print(f"== {tag} {section}: {time.perf_counter() - started:.1f} s", flush=True)
        merged.setdefault("machine", {"argv": common + BENCH_MODES[tag]})
        (out / f"gpu_{tag}.json").write_text(json.dumps(merged, indent=1) + "\n")
    failed += trainer_reads(common, out, args.trainer_steps)
    print(f"bench: {failed} section(s) failed", flush=True)
    return 0


def trainer_reads(common: list[str], out: Path, steps: int) -> int:
    """benchmarks/trainer_reads.py with step_time's device, threads, rounds and warmup: the
    trainer's steps reading the device every step against every 50. Returns 1 if it failed."""
    import traceback

    module = load_script(REPO / "benchmarks" / "trainer_reads.py", "taskloom_trainer_reads")
    argv = ["--json", str(out / "gpu_trainer_reads.json"), "--steps", str(steps)]
    for key in ("--device", "--threads", "--rounds", "--warmup"):
        if key in common:
            argv += [key, common[common.index(key) + 1]]
    print(f"== trainer_reads.py {' '.join(argv)}", flush=True)
    started = time.perf_counter()
    try:
        module.main(argv)
        return 0
    except Exception:
        traceback.print_exc()
        return 1
    finally:
        print(f"== trainer_reads: {time.perf_counter() - started:.1f} s", flush=True)


def part_bench(args, out: Path, env: dict[str, str], device: str, log: Log, deadline: float) -> dict[str, Any]:
    common, sections = bench_args(args, device)
    (out / "bench").mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(SCRIPT), "_bench", "--out", str(out / "bench"), "--common",
           json.dumps(common), "--tags", *BENCH_MODES, "--sections", *sections,
           "--trainer-steps", "3" if args.tiny else "20"]
    result = run_logged(cmd, out / "bench" / "bench.log", env, max(deadline - time.perf_counter(), 20), log)
    errors = {}
    for tag in BENCH_MODES:
        path = out / "bench" / f"gpu_{tag}.json"
        if path.is_file():
            errors[tag] = [f"{e['section']}: {e['error']}" for e in json.loads(path.read_text())["errors"]]
    result["errors"] = errors
    log(f"bench: exit {result['returncode']} in {result['seconds']} s"
        + "".join(f"; {tag} failed: {'; '.join(e)}" for tag, e in errors.items() if e))
    return result


def part_study(study: str, grid: Path, out: Path, settings: dict[str, Any], env: dict[str, str], deadline: float,
               log: Log) -> dict[str, Any]:
    root = out / "record" / study
    root.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "taskloom", "compare", str(grid), "--jobs", str(settings["jobs"]),
           "--run-root", str(root), "--resume"]
    result = run_logged(cmd, root / "compare.log", env, max(deadline - time.perf_counter(), 30), log)
    wall = root / "wall_seconds.txt"
    before = float(wall.read_text()) if wall.is_file() else 0.0
    wall.write_text(f"{before + result['seconds']:.0f}\n")
    if result["timed_out"] or not (root / "results.csv").is_file():
        # stopped at its deadline (or failed): tabulate the runs that finished
        try:
            from taskloom.compare import write_results
            from taskloom.summary import collect

            rows = collect(grid_jobs(grid, settings["seeds"], root))
            if rows:
                write_results(root, rows, title=f"GPU record (partial): {study}")
            result["partial_rows"] = len(rows)
        except Exception as exc:  # keep the other parts going
            result["partial_error"] = f"{type(exc).__name__}: {exc}"
    rows = (root / "results.csv").read_text().count("\n") - 1 if (root / "results.csv").is_file() else 0
    result["rows"] = rows
    log(f"{study}: exit {result['returncode']}{' (stopped at its deadline)' if result['timed_out'] else ''}, "
        f"{rows} runs tabulated, {result['seconds']:.0f} s")
    return result


def bundle(out: Path, dest: Path, log: Log) -> None:
    """``out`` as a .tgz without checkpoints, unpacked data and the probe's run folders."""
    skip = {"checkpoints", "data", "site", "probe", "workers"}

    def keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        parts = Path(info.name).parts
        return None if any(p in skip for p in parts[1:]) else info

    dest.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(dest, "w:gz") as tar:
        tar.add(out, arcname=out.name, filter=keep)
    log(f"bundle: {dest} ({mib(dest.stat().st_size)})")
