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
import copy
import dataclasses
import heapq
import importlib.util
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CARRY = REPO / ".gpu-carry"
SHARED = REPO.parent / "shared" / "data"
# Pure-Python packages taskloom imports at run time (train / compare / tests), with their needs.
SITE_PACKAGES = ("yaml", "tqdm", "torchmetrics", "lightning_utilities", "packaging", "typing_extensions",
                 "mlxtend", "pytest", "_pytest", "pluggy", "iniconfig")
CARRY_LIMIT_MIB = 64.0
STUDY_NAMES = ("mtfl", "utkface")
PARTS = ("tests", "bench", "mtfl", "utkface")


@dataclasses.dataclass
class Study:
    name: str
    grid: str  # the CPU record's grid, relative to the repository
    pack: str
    epochs: int
    batch: int
    tiny_tasks: list[str]
    tiny_labels: list[str]
    drop_overrides: tuple[str, ...] = ("data.train_size", "data.batch_size", "train.epochs")


STUDIES = {
    "mtfl": Study("mtfl", "configs/record/mtfl.yaml", "mtfl", 30, 64, ["landmarks", "gender"], ["cross_stitch"]),
    "utkface": Study("utkface", "configs/record/utkface.yaml", "utkface", 30, 128, ["age", "gender"], ["nddr"]),
}


class Log:
    """Print and append to a log file."""

    def __init__(self, path: Path | None = None):
        self.path = path
        self.lock = threading.Lock()

    def __call__(self, *parts: Any) -> None:
        line = " ".join(str(p) for p in parts)
        with self.lock:
            print(line, flush=True)
            if self.path is not None:
                with open(self.path, "a", encoding="utf-8") as f:
                    f.write(line + "\n")


def mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


# --------------------------------------------------------------------------- pack


def pack(args) -> int:
    import warnings

    from taskloom.data import build_data, packed
    from taskloom.data.mtfl import MTFLOptions
    from taskloom.data.utkface import UTKFaceOptions

    out, shared = Path(args.out), Path(args.data)
    budget = args.budget_mib * 2**20
    started = time.perf_counter()
    if out.exists():
        shutil.rmtree(out)
    (out / "data").mkdir(parents=True)
    manifest: dict[str, Any] = {"written": time.strftime("%Y-%m-%d %H:%M:%S"), "budget_mib": args.budget_mib,
                                "source": str(shared.resolve()), "limit": args.limit}
    if not args.no_site:
        manifest["site"] = write_site(out / "site.zip")
        print(f"site.zip: {', '.join(manifest['site']['packages'])} ({mib((out / 'site.zip').stat().st_size)})")
    # MTFL: everything, 40x40 grey (the CPU record's crop and size)
    mopts = MTFLOptions(root=str(shared / "mtfl"), limit=args.limit, val_size=1000 if args.limit is None else
                        max(4, args.limit // 5))
    mtfl = packed.bundle_arrays(build_data(mopts))
    packed.write_pack(out / "data" / "mtfl", "mtfl", mtfl, source={"dataset": "mtfl", "size": mopts.size,
                      "crop_scale": mopts.crop_scale, "val_size": mopts.val_size, "limit": args.limit})
    print(packed.describe(out / "data" / "mtfl"))
    # UTKFace at 32x32 RGB (the CPU record's size): validation and test complete, then as many
    # training faces (the data.train_size draw) as the remaining budget holds
    uopts = UTKFaceOptions(root=str(shared / "utkface64"), size=32, limit=args.limit if args.limit is None else 4 * args.limit)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the 3 malformed names are skipped, as in the CPU record
        utk = packed.bundle_arrays(build_data(uopts))
    source = {"dataset": "utkface", "size": 32, "limit": uopts.limit}
    folder = out / "data" / "utkface"
    n_train = len(utk["train"]["images"])
    size = n_train if args.utk_train is None else min(args.utk_train, n_train)
    while True:
        packed.write_pack(folder, "utkface", utk, source=source, train_size=size)
        total = folder_bytes(out)
        if total <= budget or size <= 1:
            break
        train_bytes = (folder / "train_images.med.xz").stat().st_size
        per_face = train_bytes / size
        new = max(1, int(size - (total - budget) / per_face * 1.02) - 1)
        print(f"utkface: {size} training faces make {mib(total)} > {args.budget_mib} MiB; trying {new}")
        size = new
    print(packed.describe(folder))
    total = folder_bytes(out)
    manifest["bytes"] = total
    manifest["utkface_train"] = {"packed": size, "of": n_train}
    (out / "MANIFEST.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"{out}: {mib(total)} in all (budget {args.budget_mib} MiB; the device takes {CARRY_LIMIT_MIB:.0f} MiB "
          f"with the working tree), {time.perf_counter() - started:.0f} s")
    if total > budget:
        print(f"over budget: {mib(total)} > {args.budget_mib} MiB", file=sys.stderr)
        return 1
    return 0


def write_site(path: Path) -> dict[str, Any]:
    """Zip the pure-Python files of SITE_PACKAGES from this interpreter's site-packages."""
    import importlib.metadata as md

    names, versions = [], {}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for name in SITE_PACKAGES:
            spec = importlib.util.find_spec(name)
            if spec is None or spec.origin is None and not spec.submodule_search_locations:
                print(f"site.zip: {name} is not installed here; skipped")
                continue
            if spec.submodule_search_locations:
                root = Path(list(spec.submodule_search_locations)[0])
                files = [p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts
                         and p.suffix not in (".so", ".pyd", ".pyc")]
                for p in files:
                    zf.write(p, f"{name}/{p.relative_to(root).as_posix()}")
            else:
                zf.write(spec.origin, Path(spec.origin).name)
            names.append(name)
            dist = {"yaml": "pyyaml", "_pytest": "pytest", "typing_extensions": "typing_extensions",
                    "lightning_utilities": "lightning-utilities"}.get(name, name)
            try:
                versions[name] = md.version(dist)
            except md.PackageNotFoundError:
                versions[name] = None
    return {"packages": names, "versions": versions}


# --------------------------------------------------------------------------- run: setup


def machine_info(device: str) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "platform": platform.platform(),
                            "python": sys.version.split()[0], "cpus": os.cpu_count(), "torch": torch.__version__,
                            "cuda": torch.version.cuda, "device": device}
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), capability=f"{p.major}.{p.minor}",
                    multiprocessors=p.multi_processor_count, cudnn=torch.backends.cudnn.version())
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            q = subprocess.run([smi, "--query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit",
                                "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
            info["nvidia_smi"] = q.stdout.strip() or q.stderr.strip()
        except (OSError, subprocess.SubprocessError) as exc:
            info["nvidia_smi"] = f"failed: {exc}"
    return info


def fallback_site(carry: Path, work: Path, log: Log) -> str | None:
    """Extract from the carried site.zip the packages this interpreter lacks; their folder
    (to put on PYTHONPATH) or None when nothing is missing."""
    zpath = carry / "site.zip"
    if not zpath.is_file():
        return None
    with zipfile.ZipFile(zpath) as zf:
        tops = sorted({n.split("/")[0] for n in zf.namelist()})
        missing = [t for t in tops if importlib.util.find_spec(t.removesuffix(".py")) is None]
        if not missing:
            return None
        dest = work / "site"
        for n in zf.namelist():
            if n.split("/")[0] in missing:
                zf.extract(n, dest)
    log(f"site: this Python lacks {', '.join(missing)}; using the carried copies ({dest})")
    sys.path.insert(0, str(dest))
    return str(dest)


def child_env(extra_path: str | None) -> dict[str, str]:
    paths = [str(REPO)] + ([extra_path] if extra_path else []) + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
    return dict(os.environ, PYTHONPATH=os.pathsep.join(paths), PYTHONUNBUFFERED="1",
                CUBLAS_WORKSPACE_CONFIG=os.environ.get("CUBLAS_WORKSPACE_CONFIG", ":4096:8"))


# --------------------------------------------------------------------------- grids


def make_grids(args, data_root: Path, grids_dir: Path, settings: dict[str, Any]) -> dict[str, Path]:
    """The GPU grids: the CPU record's bases and architectures on the packed data with the
    full budget (or the tiny one)."""
    import yaml

    grids_dir.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in settings["studies"]:
        study = STUDIES[name]
        cpu_grid = REPO / study.grid
        grid = yaml.safe_load(cpu_grid.read_text())
        base = yaml.safe_load((cpu_grid.parent / grid["base"]).resolve().read_text())
        data = {k: v for k, v in base["data"].items() if k not in ("name", "root")}
        data.update(name="packed", root=str(data_root), pack=study.pack, device="auto",
                    batch_size=settings["batch"][name])
        base["data"] = data
        (grids_dir / f"{name}_base.yaml").write_text(yaml.safe_dump(base, sort_keys=False))
        overrides = [o for o in grid.get("overrides", []) if not o.startswith(study.drop_overrides)]
        overrides.append(f"train.epochs={settings['epochs'][name]}")
        entries = grid["architectures"]
        if args.tiny:
            overrides += [f"data.tasks=[{', '.join(study.tiny_tasks)}]", "data.eval_batch_size=64"]
            entries = [e for e in entries if _label(e) in study.tiny_labels]
        elif name == "mtfl" and not settings["weighting"]:
            entries = [e for e in entries if "/" not in _label(e)]
        if getattr(args, "rows", None):
            entries = [e for e in entries if _label(e) in args.rows]
        text = yaml.safe_dump({"base": f"{name}_base.yaml", "overrides": overrides, "seeds": settings["seeds"],
                               "architectures": entries}, sort_keys=False)
        path = grids_dir / f"{name}.yaml"
        path.write_text(f"# GPU record, generated by scripts/gpu_record.py from {study.grid}\n{text}")
        out[name] = path
    return out


def unknown_rows(rows: list[str], studies: list[str]) -> str | None:
    """The error for ``--rows`` labels that no selected study's CPU grid has, or None."""
    import yaml

    known = {name: [_label(e) for e in yaml.safe_load((REPO / STUDIES[name].grid).read_text())["architectures"]]
             for name in studies}
    missing = [r for r in rows if not any(r in labels for labels in known.values())]
    if not missing:
        return None
    return (f"--rows: {', '.join(map(repr, missing))} is not a row of "
            + "; ".join(f"{n} ({', '.join(labels)})" for n, labels in known.items()))


def _label(entry: Any) -> str:
    if isinstance(entry, str):
        return entry
    arch = entry["architecture"]
    return str(entry.get("label") or (arch if isinstance(arch, str) else arch.get("name")))


def grid_jobs(grid: Path, seeds: int, run_root: Path):
    from taskloom.grid import expand, load_grid

    return expand(load_grid(grid), seeds, run_root)


# --------------------------------------------------------------------------- probe


def probe_key(config: dict[str, Any]) -> str:
    """Runs that cost the same per step: architecture, backbone, number of tasks, loss
    weighting and regulariser (seeds, task names and loss weights do not matter)."""
    tasks = config["data"].get("tasks")
    reg = config["model"].get("regularizer") or {}
    return json.dumps([config["model"]["architecture"], config["model"]["backbone"], len(tasks) if tasks else "all",
                       config["train"]["weighting"]["name"], reg.get("kind")], sort_keys=True)


def probe_steps(grids: dict[str, Path], work: Path, steps: int, log: Log, max_keys: int | None = None) -> dict[str, Any]:
    """Per study and probe key: seconds per training step and per evaluated sample, through the
    real trainer (``taskloom.train.run``: 2 epochs of ``steps`` steps; the second is timed)."""
    from taskloom.config import from_dict
    from taskloom.experiment import run as train_run

    out: dict[str, Any] = {}
    for study, grid in grids.items():
        jobs = grid_jobs(grid, 1, work / "probe" / study)
        seen: dict[str, Any] = {}
        for job in jobs:
            key = probe_key(job.config)
            if key in seen or (max_keys is not None and len(seen) >= max_keys):
                continue
            cfg = copy.deepcopy(job.config)
            batch = cfg["data"]["batch_size"]
            cfg["train"]["epochs"] = 2
            cfg["data"]["subset"] = steps * batch
            run_dir = work / "probe" / study / f"{len(seen):02d}"
            shutil.rmtree(run_dir, ignore_errors=True)
            marks: list[float] = []
            t0 = time.perf_counter()
            try:
                train_run(from_dict(cfg), run_dir, log=lambda *a: marks.append(time.perf_counter()))
            except Exception as exc:  # a probe that fails: its runs will fail too; say so, go on
                log(f"probe {study} {job.label}: failed ({type(exc).__name__}: {exc})")
                seen[key] = {"label": job.label, "error": str(exc)}
                continue
            t_end = time.perf_counter()
            final = json.loads((run_dir / "final.json").read_text())
            n_test = next(iter(final["tasks"].values()))["count"]
            meta = json.loads((Path(cfg["data"]["root"]) / cfg["data"]["pack"] / "meta.json").read_text())
            n_val = meta["splits"]["val"]["count"]
            eval_s = (t_end - marks[-1]) / max(n_test, 1)  # best.pt load + test evaluation, per sample
            epoch = marks[-1] - marks[-2]
            step = max(epoch - eval_s * n_val, 0.2 * epoch) / steps
            seen[key] = {"label": job.label, "step_s": step, "eval_sample_s": eval_s, "build_s": marks[0] - t0,
                         "epoch2_s": epoch}
            log(f"probe {study:8s} {job.label:28s} {step * 1e3:7.2f} ms/step  eval {eval_s * 1e6:6.1f} us/sample")
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        out[study] = seen
    return out


def probe_concurrency(job_config: dict[str, Any], work: Path, levels: list[int], steps: int, env: dict[str, str],
                      log: Log, device: str, limit: float = 180.0) -> dict[str, Any]:
    """Aggregate training steps/s of L processes at once on the one GPU, for each L in
    ``levels``: L worker processes (``_worker``: the real trainer, 2 epochs of ``steps`` steps,
    the second timed) are started together by a line on their stdin."""
    import yaml

    work.mkdir(parents=True, exist_ok=True)
    cfg_path = work / "job.yaml"
    cfg_path.write_text(yaml.safe_dump(job_config, sort_keys=False))
    n = max(levels)
    free_before = _gpu_free() if device == "cuda" else None
    started = time.time()
    procs = [subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "_worker", "--config", str(cfg_path),
                               "--steps", str(steps), "--dir", str(work / f"w{i}"), "--t0", str(started)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=dict(env, OMP_NUM_THREADS="1"), bufsize=1) for i in range(n)]
    result: dict[str, Any] = {"levels": {}, "steps": steps}

    def read(p: subprocess.Popen, expect: str) -> list[str]:
        while True:
            line = p.stdout.readline()
            if not line:
                raise RuntimeError(f"worker exited ({p.wait()}) before '{expect}'")
            parts = line.split()
            if parts and parts[0] == expect:
                return parts[1:]

    def kill_all() -> None:
        for p in procs:
            if p.poll() is None:
                p.kill()

    watchdog = threading.Timer(limit, kill_all)  # a hung worker ends the probe, not the run
    watchdog.start()
    try:
        ready = [read(p, "ready") for p in procs]
        result["startup_s"] = sorted(float(r[0]) for r in ready)[len(ready) // 2]
        if device == "cuda":  # what one more training process takes on the GPU (context, data, model)
            result["process_gpu_mib"] = gpu_process_mib([p.pid for p in procs]) or {}
            result["process_gpu_mib"]["free_drop_per_process_mib"] = (free_before - _gpu_free()) / n / 2**20
            result["process_gpu_mib"]["gpu_total_mib"] = _gpu_free(total=True) / 2**20
        for level in levels:
            for p in procs[:level]:
                p.stdin.write("go\n")
                p.stdin.flush()
            seconds = [float(read(p, "done")[0]) for p in procs[:level]]
            rate = sum(steps / s for s in seconds)
            result["levels"][str(level)] = {"steps_per_s": rate, "epoch_s": seconds}
            if level == levels[0] and result.get("process_gpu_mib"):
                m = result["process_gpu_mib"]
                log(f"probe concurrency: one training process takes {m['free_drop_per_process_mib']:.0f} MiB of the GPU's "
                    f"{m['gpu_total_mib']:.0f} MiB: about {int(0.9 * m['gpu_total_mib'] / max(m['free_drop_per_process_mib'], 1))} fit")
            log(f"probe concurrency: {level:2d} at once: {rate:8.1f} steps/s in all "
                f"({rate / result['levels']['1']['steps_per_s']:.2f}x one)")
    finally:
        watchdog.cancel()
        for p in procs:
            try:
                p.stdin.write("quit\n")
                p.stdin.flush()
            except (BrokenPipeError, ValueError, OSError):
                pass
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
    base = result["levels"]["1"]["steps_per_s"]
    result["speedup"] = {k: v["steps_per_s"] / base for k, v in result["levels"].items()}
    best = max(result["speedup"].values())
    # the smallest level within 5% of the best aggregate rate
    result["jobs"] = min(int(k) for k, v in result["speedup"].items() if v >= 0.95 * best)
    return result


def _gpu_free(total: bool = False) -> int:
    import torch

    free, all_ = torch.cuda.mem_get_info()
    return all_ if total else free


def gpu_process_mib(pids: list[int]) -> dict[str, Any] | None:
    smi = shutil.which("nvidia-smi")
    if not smi:
        return None
    try:
        q = subprocess.run([smi, "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                           capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    used = {}
    for line in q.stdout.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0].isdigit() and int(parts[0]) in pids:
            used[int(parts[0])] = float(parts[1]) if parts[1].replace(".", "").isdigit() else None
    values = [v for v in used.values() if v]
    return {"per_process_mib": max(values) if values else None, "seen": len(used)}


def worker(args) -> int:
    """One probe worker: builds the run once, then per 'go' trains 2 epochs of ``--steps`` steps
    (tiny validation and test) and answers 'done SECONDS_OF_EPOCH_2'."""
    from taskloom.config import load
    from taskloom.data import DataBundle
    from taskloom.experiment import build_experiment
    from taskloom.train import fit

    config = load(args.config)
    data, model = build_experiment(config)
    b = config.data.batch_size
    small = data.val.subset(list(range(min(len(data.val), b))))
    bundle = DataBundle(data.train.subset(list(range(min(len(data.train), args.steps * b)))), small,
                        data.test.subset(list(range(min(len(data.test), b)))), data.tasks, data.input_shape)
    train = dataclasses.replace(config.train, epochs=2)
    runs = [0]

    def once() -> float:
        marks: list[float] = []
        runs[0] += 1
        fit(model, bundle, train, Path(args.dir) / f"r{runs[0]}", seed=config.seed, batch_size=b,
            eval_batch_size=b, log=lambda *a: marks.append(time.perf_counter()))
        return marks[-1] - marks[-2]

    startup = time.time() - args.t0
    once()  # warm-up (allocator, cuDNN, lazy initialisation)
    print(f"ready {startup:.3f}", flush=True)
    for line in sys.stdin:
        if line.strip() == "go":
            print(f"done {once():.6f}", flush=True)
        elif line.strip() == "quit":
            break
    return 0


# --------------------------------------------------------------------------- plan


def run_seconds(study: str, job_cfg: dict[str, Any], probe: dict[str, Any], startup: float, meta: dict[str, Any]) -> float:
    """Estimated seconds of one run alone: start-up + epochs x (steps x step + validation) + test."""
    p = probe[study].get(probe_key(job_cfg))
    if p is None or "error" in p:
        p = max((v for v in probe[study].values() if "error" not in v), key=lambda v: v["step_s"])
    n_train = job_cfg["data"].get("subset") or meta["train"]
    steps = math.ceil(n_train / job_cfg["data"]["batch_size"])
    epochs = job_cfg["train"]["epochs"]
    return startup + epochs * (steps * p["step_s"] + meta["val"] * p["eval_sample_s"]) + meta["test"] * p["eval_sample_s"]


def schedule(durations: list[float], slots: int) -> float:
    """Wall time of ``taskloom compare --jobs slots``: jobs start in order as slots free up."""
    free = [0.0] * max(1, slots)
    for d in durations:
        start = heapq.heappop(free)
        heapq.heappush(free, start + d)
    return max(free) if durations else 0.0


def estimate(settings: dict[str, Any], model: dict[str, Any]) -> dict[str, float]:
    """Seconds of every part for these settings (from the probe in ``model``)."""
    jobs = settings["jobs"]
    slowdown = jobs / model["speedup"](jobs)
    parts: dict[str, float] = {}
    for study in settings["studies"]:
        if study not in settings["parts"]:
            continue
        durations = []
        for cfg in model["jobs"][study]:
            if cfg["seed"] >= settings["seeds"]:
                continue
            if study == "mtfl" and not settings["weighting"] and cfg["weighting_row"]:
                continue
            c = copy.deepcopy(cfg["config"])
            c["train"]["epochs"] = settings["epochs"][study]
            # (the start-up was measured with every slot starting at once: it takes no slowdown)
            alone = run_seconds(study, c, model["probe"], model["startup"], model["meta"][study])
            durations.append(model["startup"] + (alone - model["startup"]) * slowdown)
        parts[study] = model["compare_overhead"] + schedule(durations, jobs)
    if "bench" in settings["parts"]:
        parts["bench"] = model["bench"](settings)
    if "tests" in settings["parts"]:
        parts["tests"] = model["tests"]
    return parts


def total(parts: dict[str, float], fixed: float) -> float:
    """Tests run beside the studies: they add to the total only where they outlast them."""
    studies = sum(v for k, v in parts.items() if k in STUDY_NAMES)
    return fixed + parts.get("bench", 0.0) + max(studies, parts.get("tests", 0.0))


def fit_budget(settings: dict[str, Any], model: dict[str, Any], budget: float | None, fixed: float,
               log: Log) -> tuple[dict[str, Any], list[str]]:
    """Cut the settings until the estimate fits ``budget``: the MTFL loss-weighting rows (when
    'auto'), UTKFace epochs to 20, seeds to 2, UTKFace epochs to 12, the benchmark, seeds to 1,
    MTFL epochs to 20 then 10 (below the issue's floor of 30), UTKFace epochs to 6."""
    cuts: list[str] = []
    if budget is None:
        return settings, cuts
    steps = []
    if settings["weighting_auto"] and settings["weighting"]:
        steps.append(("MTFL loss-weighting rows off", lambda s: s.update(weighting=False)))
    for e in (20,):
        steps.append((f"UTKFace {e} epochs", lambda s, e=e: s["epochs"].update(utkface=min(e, s["epochs"]["utkface"]))))
    steps.append(("2 seeds", lambda s: s.update(seeds=min(2, s["seeds"]))))
    steps.append(("UTKFace 12 epochs", lambda s: s["epochs"].update(utkface=min(12, s["epochs"]["utkface"]))))
    steps.append(("no benchmark", lambda s: s.update(parts=[p for p in s["parts"] if p != "bench"])))
    steps.append(("1 seed", lambda s: s.update(seeds=1)))
    for e in (20, 10):
        steps.append((f"MTFL {e} epochs (below the floor of 30)",
                      lambda s, e=e: s["epochs"].update(mtfl=min(e, s["epochs"]["mtfl"]))))
    steps.append(("UTKFace 6 epochs", lambda s: s["epochs"].update(utkface=min(6, s["epochs"]["utkface"]))))
    s = copy.deepcopy(settings)
    for name, cut in steps:
        if total(estimate(s, model), fixed) <= budget:
            break
        before = json.dumps(s, sort_keys=True)
        cut(s)
        if json.dumps(s, sort_keys=True) != before:
            cuts.append(name)
    over = total(estimate(s, model), fixed)
    if over > budget:
        log(f"budget: even with every cut the estimate is {over:.0f} s > {budget:.0f} s; running what fits by deadline")
    return s, cuts


def print_plan(settings: dict[str, Any], model: dict[str, Any], fixed_parts: dict[str, float], log: Log,
               cuts: list[str], budget: float | None) -> dict[str, float]:
    parts = estimate(settings, model)
    fixed = sum(fixed_parts.values())
    log("")
    log("| part | estimate s | what |")
    log("|---|---|---|")
    for name, sec in fixed_parts.items():
        log(f"| {name} | {sec:.0f} | measured |")
    if "bench" in parts:
        log(f"| bench | {parts['bench']:.0f} | step_time.py batched + fusion, fp32 / bf16 / bf16+channels_last |")
    for study in STUDY_NAMES:
        if study in parts:
            n = sum(1 for c in model["jobs"][study] if c["seed"] < settings["seeds"]
                    and (settings["weighting"] or not c["weighting_row"]))
            log(f"| {study} | {parts[study]:.0f} | {n} runs, {settings['epochs'][study]} epochs of batch "
                f"{settings['batch'][study]} on {model['meta'][study]['train']} faces, {settings['seeds']} seeds, "
                f"{settings['jobs']} at once ({model['speedup'](settings['jobs']):.1f}x one) |")
    if "tests" in parts:
        log(f"| tests | {parts['tests']:.0f} | beside the studies (a guess, not probed) |")
    log(f"| **total** | **{total(parts, fixed):.0f}** | budget {budget if budget is not None else 'none'}"
        f"{'; cuts: ' + ', '.join(cuts) if cuts else ''} |")
    flags = (f"--mtfl-epochs {settings['epochs']['mtfl']} --utk-epochs {settings['epochs']['utkface']} "
             f"--seeds {settings['seeds']} --jobs {settings['jobs']} --weighting {'on' if settings['weighting'] else 'off'} "
             f"--parts {' '.join(settings['parts'])}")
    log(f"flags: {flags}")
    return parts


# --------------------------------------------------------------------------- run: parts


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
             if args.tiny else ["tests/test_batched_towers.py", "tests/test_checkpointing.py", "tests/test_gpu_record.py"])
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
             "--backbones", "lenet", "tcdcn", "--ks", "3", "5", "--memory", "--plot", ""], ["batched", "fusion"])


def bench_worker(args) -> int:
    """Every precision and section of benchmarks/step_time.py in this one process (one start-up);
    a section that fails is recorded as an error row instead of losing the rest."""
    import traceback

    spec = importlib.util.spec_from_file_location("taskloom_step_time", REPO / "benchmarks" / "step_time.py")
    step_time = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = step_time
    spec.loader.exec_module(step_time)
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
    print(f"bench: {failed} section(s) failed", flush=True)
    return 0


def part_bench(args, out: Path, env: dict[str, str], device: str, log: Log, deadline: float) -> dict[str, Any]:
    common, sections = bench_args(args, device)
    (out / "bench").mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "_bench", "--out", str(out / "bench"), "--common",
           json.dumps(common), "--tags", *BENCH_MODES, "--sections", *sections]
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
                "jobs": args.jobs or 1}
    grids = make_grids(args, data_root, out / "grids", settings)

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
             "bench": lambda s: startup + len(BENCH_MODES) * (2.0 + (6 if args.tiny else 48 * (args.bench_rounds + 3) + 80)
                                                             * cs_step * 0.6)}
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
    import importlib.util as iu

    spec = iu.spec_from_file_location("taskloom_record_script", REPO / "scripts" / "record.py")
    record = iu.module_from_spec(spec)
    sys.modules[spec.name] = record
    spec.loader.exec_module(record)
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
    record.report(argparse.Namespace(runs=str(record_root)))
    # A study's tables come from the run that has it (a later run may redo one study only): its
    # machine, plan and summary go beside them.
    for study in STUDY_NAMES:
        if (record_root / study / "results.csv").is_file():
            for name in ("machine.json", "plan.json", "summary.json", "gpu_record.log", "tests/pytest.log"):
                if (runs / name).is_file():
                    shutil.copy2(runs / name, docs / study / Path(name).name)
    return 0


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
    p.add_argument("--bench-rounds", type=int, default=10)
    p.add_argument("--tests-timeout", type=float, default=240)
    p.add_argument("--tests-estimate", type=float, default=60)
    p.add_argument("--bundle", help="write the output (no checkpoints) to this .tgz")
    p.add_argument("--resume", action="store_true", help="keep an existing --out (resume its studies)")
    p.set_defaults(fn=run)

    p = sub.add_parser("report", help="tables of a GPU record next to the CPU ones (scripts/record.py report)")
    p.add_argument("--runs", default="runs/gpu_record")
    p.add_argument("--docs", default=str(REPO / "docs" / "results" / "gpu"))
    p.set_defaults(fn=report)

    p = sub.add_parser("_bench")
    p.add_argument("--out", required=True)
    p.add_argument("--common", required=True, help="step_time.py arguments, as JSON")
    p.add_argument("--tags", nargs="+", default=list(BENCH_MODES))
    p.add_argument("--sections", nargs="+", required=True)
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
