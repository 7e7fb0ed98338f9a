"""The GPU record: CUDA tests, step-time benchmark and the full-budget MTFL / UTKFace studies in
one prepared run on one GPU (GitHub issue: "On a GPU: the CUDA checks, and the results of record
at the papers' budgets").

On the device machine (one GPU, 16 cores, its own torch, no network), after ``pack`` here::

    run(command="PYTHONUNBUFFERED=1 python3 scripts/gpu_record.py run --carry .gpu-carry --out runs/gpu_record --budget 280 --bundle $OUT/gpu_record.tgz 2>&1 | tee $OUT/gpu_record.log",
        carry=[".gpu-carry"], timeout_s=420)

then here: ``tar xzf /work/.device/.../gpu_record.tgz -C runs/`` and
``python scripts/gpu_record.py report --runs runs/gpu_record`` (tables in docs/results/gpu/).

Subcommands:

* ``pack``: writes the carry folder (default ``.gpu-carry/``, git-ignored): ``data/mtfl`` (all of
  MTFL at 40x40 grey), ``data/utkface`` (UTKFace at 32x32 RGB: validation and test complete, as
  many training faces as fit under ``--budget-mib``) as lossless compressed packs
  (:mod:`taskloom.data.packed`), and ``site.zip``, the pure-Python packages taskloom needs at run
  time (extracted there only for those the machine lacks). Prints every size and the total.
* ``run``: on the machine with the GPU. Parts, in this order: ``setup`` (machine info, unpack the
  data), ``probe`` (per-architecture step time through the real trainer, and how many runs at
  once the GPU serves best: aggregate steps/s of 1..16 concurrent training processes), ``bench``
  (``benchmarks/step_time.py``, sections ``batched`` (towers looped / vmapped: off, on, conv,
  auto) and ``fusion``, in fp32, bf16 autocast and bf16 + channels_last), then ``mtfl`` and
  ``utkface`` (``taskloom compare`` over the CPU record's grids with the full budget, data cached
  on the GPU, N runs at once) while ``tests`` (the CUDA half of the suite:
  ``TASKLOOM_TEST_DEVICE=cuda`` batched-towers, checkpointing and packed-data tests) runs beside
  them. ``--plan`` stops after the probe and prints each part's estimate; ``--budget SECONDS``
  cuts (in this order) the MTFL loss-weighting rows, UTKFace epochs, seeds, the benchmark, MTFL
  epochs until the estimate fits, and stops a study at its deadline keeping the finished runs.
  ``--probe-from PLAN_JSON`` reuses an earlier run's probe; ``--rows`` keeps only some grid rows;
  ``--resume`` continues an output folder's studies. ``--tiny``: a few steps of every part (CI,
  on CPU). Measured on an H200 (benchmarks/README.md, "GPU record"): the full defaults do not fit
  5 minutes; the tables of the first two calls are in docs/results/gpu/.
* ``report``: the output's ``record/`` through ``scripts/record.py report`` into
  ``docs/results/gpu/`` (next to the CPU tables).

Schedule of the full budget (defaults): MTFL all 9,000 training faces (1,000 validation, 2,995
test), 30 epochs of batch 64 (4,230 steps), Adam 1e-3 with a cosine schedule, BatchNorm towers;
UTKFace every packed training face (validation 2,384, test 2,391), 30 epochs of batch 128; 3 seeds;
otherwise exactly the CPU record's configs and grids (``configs/record/{mtfl,utkface}.yaml``).

Output (``--out``): ``machine.json``, ``plan.json``, ``summary.json``, ``gpu_record.log``,
``tests/pytest.log``, ``bench/gpu_{fp32,bf16,bf16_cl}.{json,log}``, ``grids/``,
``record/{mtfl,utkface}/`` (``taskloom compare`` run roots: ``results.csv``, ``results.md``, plots,
``wall_seconds.txt``, one folder per run). ``--bundle FILE.tgz`` packs all of it without
checkpoints and data.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # scripts/: the gpurec package

from gpurec.common import (  # noqa: E402
    CARRY, Log, PARTS, REPO, SHARED, STUDIES, STUDY_NAMES, child_env, fallback_site, load_script, machine_info,
)
from gpurec.pack import pack  # noqa: E402
from gpurec.parts import BENCH_MODES, bench_worker, bundle, part_bench, part_study, part_tests, stop_children  # noqa: E402
from gpurec.plan import fit_budget, print_plan, total  # noqa: E402
from gpurec.probe import grid_jobs, make_grids, probe_concurrency, probe_steps, unknown_rows, worker  # noqa: E402


# --------------------------------------------------------------------------- run


def run(args) -> int:
    t_start = time.perf_counter()
    out = Path(args.out).resolve()
    if out.exists() and not args.resume:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    log = Log(out / "gpu_record.log")
    carry = Path(args.carry).resolve()
    summary: dict[str, Any] = {"argv": sys.argv[1:], "parts": {}}
    fixed: dict[str, float] = {}

    # setup: packages, machine, data
    t = time.perf_counter()
    extra = fallback_site(carry, out, log)
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.tiny and not args.allow_cpu:
        log("no CUDA device: run with --tiny (or --allow-cpu) on a CPU")
        return 2
    info = machine_info(device)
    (out / "machine.json").write_text(json.dumps(info, indent=1) + "\n")
    log(f"machine: {info.get('gpu', 'CPU')} | torch {info['torch']} | CUDA {info['cuda']} | {info['cpus']} CPUs | "
        f"{info.get('nvidia_smi', '')}")
    env = child_env(extra)
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = env["CUBLAS_WORKSPACE_CONFIG"]
    from taskloom.data import packed

    studies = [s for s in STUDY_NAMES if s in args.parts or args.plan]
    if args.rows and (error := unknown_rows(args.rows, studies)):
        log(error)
        return 2
    data_root = out / "data"
    metas = {}
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(STUDY_NAMES)) as pool:  # (LZMA and numpy release the GIL)
        list(pool.map(lambda name: packed.unpack(carry / "data" / STUDIES[name].pack, data_root / STUDIES[name].pack),
                      [n for n in studies if not (data_root / STUDIES[n].pack / "meta.json").is_file()]))
    for name in studies:
        m = packed.read_meta(data_root / STUDIES[name].pack)
        metas[name] = {s: m["splits"][s]["count"] for s in ("train", "val", "test")}
    fixed["setup"] = time.perf_counter() - t
    log(f"setup: data unpacked to {data_root} ({', '.join(f'{k} {v}' for k, v in metas.items())}) in {fixed['setup']:.1f} s")

    settings = {"studies": studies, "parts": list(args.parts), "seeds": 1 if args.tiny else args.seeds,
                "epochs": {"mtfl": 1 if args.tiny else args.mtfl_epochs, "utkface": 1 if args.tiny else args.utk_epochs},
                "batch": {"mtfl": 16 if args.tiny else args.mtfl_batch, "utkface": 16 if args.tiny else args.utk_batch},
                "weighting": args.weighting != "off" and not args.tiny, "weighting_auto": args.weighting == "auto",
                "jobs": args.jobs or 1, "set": list(args.set or [])}
    grids = make_grids(args, data_root, out / "grids", settings)
    if args.set and (error := bad_overrides(args.set, grids)):
        log(error)
        return 2

    # probe
    t = time.perf_counter()
    steps = 2 if args.tiny else args.probe_steps
    earlier = json.loads(Path(args.probe_from).read_text()) if args.probe_from else None
    if not studies:
        log("no study among --parts: nothing to probe")
    if earlier is not None:  # a rerun on the same kind of machine: its seconds are known
        probe = {study: earlier["probe"].get(study, {}) for study in grids}
        log(f"probe: the step times, start-up and runs-at-once of {args.probe_from}, not measured again")
    else:
        probe = probe_steps(grids, out / "probe", steps, log, max_keys=1 if args.tiny else None)
    jobs_model = {}
    for study, grid in grids.items():
        jobs_model[study] = [{"seed": j.seed, "config": j.config, "weighting_row": "/" in j.label}
                             for j in grid_jobs(grid, settings["seeds"], out / "probe" / "jobs")]
    concurrency = earlier.get("concurrency") if earlier else None
    startup = earlier["startup_s"] if earlier else 3.0 if device == "cuda" else 4.0
    if earlier is not None:
        settings["jobs"] = args.jobs or (concurrency or {}).get("jobs") or settings["jobs"]
    elif args.jobs is None and studies:
        cap = min(args.max_jobs, os.cpu_count() or 1)
        levels = sorted({lv for lv in ([1, 2] if args.tiny else [1, 2, 4, 8, 12, 16, 24]) if lv <= cap} | {cap})
        candidates = grid_jobs(grids[studies[0]], 1, out / "probe" / "jobs")
        rep = next((j for j in candidates if j.label == "cross_stitch"), candidates[-1])  # a 5-tower run
        try:
            concurrency = probe_concurrency(rep.config, out / "probe" / "workers", levels, steps if args.tiny else
                                            args.probe_steps * 4, env, log, device)
            settings["jobs"] = concurrency["jobs"]
            startup = concurrency["startup_s"]
        except Exception as exc:  # keep going with a guess
            settings["jobs"] = min(8, cap)
            log(f"probe concurrency failed ({type(exc).__name__}: {exc}); running {settings['jobs']} at once")
    fixed["probe"] = time.perf_counter() - t
    speedups = {int(k): v for k, v in (concurrency or {"speedup": {"1": 1.0}})["speedup"].items()}

    def speedup(n: int) -> float:
        if n in speedups:
            return speedups[n]
        known = sorted(speedups)
        lower = max([k for k in known if k <= n], default=1)
        return speedups.get(lower, 1.0) if concurrency else min(n, 4) ** 0.75

    cs_step = max([v.get("step_s", 0) for v in probe[studies[0]].values()] if studies else [0.005]) or 0.005
    model = {"probe": probe, "jobs": jobs_model, "startup": startup, "meta": metas, "speedup": speedup,
             "compare_overhead": startup + (4.0 if device == "cuda" else 8.0),
             "tests": args.tests_estimate if not args.tiny else 10.0,
             # one process; per precision about 48 x (rounds + warm-up) + 80 steps of these small
             # networks (batch 32, no trainer overhead: ~0.6 x a probed training step) and model set-up
             # then trainer_reads.py: 2 settings x (rounds + warm-up) x 20 full trainer steps
             "bench": lambda s: startup + len(BENCH_MODES) * (2.0 + (6 if args.tiny else 48 * (args.bench_rounds + 3) + 80)
                                                             * cs_step * 0.6)
                                + 2 * (3 if args.tiny else (args.bench_rounds + 3) * 20) * cs_step}
    settings, cuts = fit_budget(settings, model, args.budget, sum(fixed.values()), log)
    parts_estimate = print_plan(settings, model, fixed, log, cuts, args.budget)
    plan = {"settings": settings, "cuts": cuts, "estimate_s": parts_estimate, "fixed_s": fixed,
            "total_estimate_s": total(parts_estimate, sum(fixed.values())), "probe": probe,
            "concurrency": concurrency, "startup_s": startup, "budget_s": args.budget}
    (out / "plan.json").write_text(json.dumps(plan, indent=1, default=str) + "\n")
    if args.plan:
        log(f"plan written to {out / 'plan.json'} ({time.perf_counter() - t_start:.0f} s)")
        return 0
    grids = make_grids(args, data_root, out / "grids", settings)  # with the cuts

    # the parts
    budget_end = t_start + args.budget if args.budget else math.inf
    summary["settings"] = settings
    if "bench" in settings["parts"]:
        bench_deadline = min(budget_end - sum(parts_estimate.get(s, 0) for s in STUDY_NAMES), time.perf_counter() + 600)
        summary["parts"]["bench"] = part_bench(args, out, env, device, log, bench_deadline)
    tests_thread = None
    if "tests" in settings["parts"]:
        tests_timeout = min(args.tests_timeout if not args.tiny else 120,
                            max(budget_end - time.perf_counter() - 10, 30))

        def tests_job() -> None:
            summary["parts"]["tests"] = part_tests(args, out, env, device, tests_timeout, log)

        tests_thread = threading.Thread(target=tests_job)
        tests_thread.start()
    todo = [s for s in STUDY_NAMES if s in settings["parts"]]
    for i, study in enumerate(todo):
        later = sum(parts_estimate.get(s, 0) for s in todo[i + 1:])
        deadline = budget_end - later - 5 if args.budget else time.perf_counter() + 3600 * 6
        summary["parts"][study] = part_study(study, grids[study], out, settings, env, deadline, log)
    if tests_thread is not None:
        tests_thread.join()
    summary["wall_s"] = round(time.perf_counter() - t_start, 1)
    summary["estimate_s"] = plan["total_estimate_s"]
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    log(f"done in {summary['wall_s']:.0f} s (estimate {plan['total_estimate_s']:.0f} s); output {out}")
    if args.bundle:
        bundle(out, Path(args.bundle), log)
    failed = [k for k, v in summary["parts"].items() if isinstance(v, dict) and v.get("returncode") not in (0, None)]
    if failed:
        log(f"failed parts: {', '.join(failed)}")
    return 1 if failed else 0


# --------------------------------------------------------------------------- report

PAGE = """# Results of record on a GPU

The full-budget studies of `scripts/gpu_record.py` (see its docstring and benchmarks/README.md,
"GPU record"), next to the CPU record in [../README.md](../README.md). Machine, schedule and
cuts: `machine.json`, `plan.json` and `summary.json` in each study's folder (of the run that
produced its table).

## MTFL

<!-- record:mtfl -->
<!-- /record:mtfl -->

## UTKFace

<!-- record:utkface -->
<!-- /record:utkface -->
"""
WEIGHTING_PAGE = """# Loss weighting on MTFL, GPU record

<!-- record:weighting -->
<!-- /record:weighting -->
"""


def report(args) -> int:
    """``scripts/record.py report`` over ``RUNS/record`` with its output folder moved to ``--docs``."""
    record = load_script(REPO / "scripts" / "record.py", "taskloom_record_script")
    docs = Path(args.docs)
    docs.mkdir(parents=True, exist_ok=True)
    record.DOCS = docs
    runs = Path(args.runs)
    record_root = runs / "record" if (runs / "record").is_dir() else runs
    mtfl_csv = record_root / "mtfl" / "results.csv"
    weighting = mtfl_csv.is_file() and any("/" in r["label"] for r in record.read_csv(mtfl_csv))
    for name, text, wanted in (("README.md", PAGE, True), ("weighting_mtfl.md", WEIGHTING_PAGE, weighting)):
        if wanted and not (docs / name).is_file():
            (docs / name).write_text(text, encoding="utf-8")
    studies = [s for s in STUDY_NAMES if (record_root / s / "results.csv").is_file()]
    with tempfile.TemporaryDirectory() as tmp:
        if args.merge:
            record_root = merged_record(record, record_root, docs, studies, Path(tmp))
        record.report(argparse.Namespace(runs=str(record_root)))
    # A study's tables come from the run that has it (a later run may redo one study only): its
    # machine, plan and summary go beside them (with --merge, beside the earlier run's, by name).
    for study in studies:
        for name in ("machine.json", "plan.json", "summary.json", "gpu_record.log", "tests/pytest.log"):
            if (runs / name).is_file():
                path = Path(name)
                shutil.copy2(runs / name, docs / study / (f"{path.stem}-{runs.name}{path.suffix}" if args.merge else path.name))
    return 0


def merged_record(record, root: Path, docs: Path, studies: list[str], tmp: Path) -> Path:
    """A record root under ``tmp`` whose studies' results.csv hold the run's rows and, for labels
    the run does not have, the rows already in ``docs`` (a run that adds or redoes some rows of
    an earlier one: ``--rows``); wall times add up."""
    for study in studies:
        dest = tmp / study
        dest.mkdir(parents=True)
        fresh: dict[str, list[dict]] = {}
        for row in record.read_csv(root / study / "results.csv"):
            fresh.setdefault(row["label"], []).append(row)
        old_csv = docs / study / "results.csv"
        record.write_csv(record.merge_rows(record.read_csv(old_csv) if old_csv.is_file() else [], fresh),
                         dest / "results.csv")
        if (root / study / "class_counts.json").is_file():
            shutil.copy2(root / study / "class_counts.json", dest / "class_counts.json")
        wall = [d / study / "wall_seconds.txt" for d in (docs, root)]
        (dest / "wall_seconds.txt").write_text(f"{sum(float(w.read_text()) for w in wall if w.is_file()):.0f}\n")
    return tmp


def bad_overrides(overrides: list[str], grids: dict[str, Path]) -> str | None:
    """The error of the first study whose base config does not take ``--set``'s overrides."""
    from taskloom import config
    from taskloom.errors import ConfigError

    for name, grid in grids.items():
        try:
            config.load(grid.parent / f"{name}_base.yaml", overrides)
        except (ConfigError, ValueError) as exc:
            return f"--set: {exc}"
    return None


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="write the carry folder (data packs + pure-Python packages)")
    p.add_argument("--out", default=str(CARRY))
    p.add_argument("--data", default=str(SHARED), help="folder holding mtfl/ and utkface64/")
    p.add_argument("--budget-mib", type=float, default=56.0,
                   help="size limit of the carry folder (the device takes 64 MiB with the working tree)")
    p.add_argument("--utk-train", type=int, help="at most this many UTKFace training faces")
    p.add_argument("--limit", type=int, help="only the first lines / files (tests)")
    p.add_argument("--no-site", action="store_true", help="without site.zip")
    p.set_defaults(fn=pack)

    p = sub.add_parser("run", help="tests, benchmark and studies on this machine's GPU")
    p.add_argument("--carry", default=str(CARRY))
    p.add_argument("--out", default="runs/gpu_record")
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    p.add_argument("--plan", action="store_true", help="probe, print the estimates and flags, stop")
    p.add_argument("--tiny", action="store_true", help="a few steps of every part (CPU, CI)")
    p.add_argument("--allow-cpu", action="store_true", help="run the full parts without a GPU")
    p.add_argument("--budget", type=float, help="seconds for the whole run: cut settings to fit, stop studies at their deadline")
    p.add_argument("--mtfl-epochs", type=int, default=STUDIES["mtfl"].epochs)
    p.add_argument("--utk-epochs", type=int, default=STUDIES["utkface"].epochs)
    p.add_argument("--mtfl-batch", type=int, default=STUDIES["mtfl"].batch)
    p.add_argument("--utk-batch", type=int, default=STUDIES["utkface"].batch)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--weighting", choices=["auto", "on", "off"], default="auto",
                   help="the MTFL loss-weighting rows (auto: if they fit the budget)")
    p.add_argument("--jobs", type=int, help="runs at once (default: the probe's choice)")
    p.add_argument("--max-jobs", type=int, default=24)
    p.add_argument("--probe-steps", type=int, default=10)
    p.add_argument("--probe-from", metavar="PLAN_JSON",
                   help="take the probe (step times, start-up, runs at once) from an earlier run's plan.json "
                        "on the same kind of machine instead of measuring it (saves its minute or two)")
    p.add_argument("--rows", nargs="+", metavar="LABEL",
                   help="only these rows of the grids (labels as in configs/record/*.yaml); the single-task "
                        "baselines always run")
    p.add_argument("--set", nargs="+", metavar="KEY=VALUE",
                   help="config overrides for every run of the studies, e.g. model.batched_towers=packed "
                        "(checked against each study's base config before anything runs)")
    p.add_argument("--bench-rounds", type=int, default=10)
    p.add_argument("--tests-timeout", type=float, default=240)
    p.add_argument("--tests-estimate", type=float, default=60)
    p.add_argument("--bundle", help="write the output (no checkpoints) to this .tgz")
    p.add_argument("--resume", action="store_true", help="keep an existing --out (resume its studies)")
    p.set_defaults(fn=run)

    p = sub.add_parser("report", help="tables of a GPU record next to the CPU ones (scripts/record.py report)")
    p.add_argument("--runs", default="runs/gpu_record")
    p.add_argument("--docs", default=str(REPO / "docs" / "results" / "gpu"))
    p.add_argument("--merge", action="store_true",
                   help="keep the rows already in --docs of labels this run does not have (a run of some rows)")
    p.set_defaults(fn=report)

    p = sub.add_parser("_bench")
    p.add_argument("--out", required=True)
    p.add_argument("--common", required=True, help="step_time.py arguments, as JSON")
    p.add_argument("--tags", nargs="+", default=list(BENCH_MODES))
    p.add_argument("--sections", nargs="+", required=True)
    p.add_argument("--trainer-steps", type=int, default=20, help="benchmarks/trainer_reads.py --steps")
    p.set_defaults(fn=bench_worker)

    p = sub.add_parser("_worker")
    p.add_argument("--config", required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--dir", required=True)
    p.add_argument("--t0", type=float, required=True)
    p.set_defaults(fn=worker)
    args = parser.parse_args(argv)
    if args.fn is not run:
        return args.fn(args)
    # stopped (a device command's time limit, Ctrl-C): the studies and tests it started stop too
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        return run(args)
    finally:
        stop_children()
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
