"""The GPU record (scripts/gpu_record.py) and packed data (taskloom.data.packed): the packs hold
exactly what the loaders build, batches equal the per-sample path, the carry stays in budget, and
the whole run works end to end in --tiny mode on a CPU (so the prepared GPU script cannot rot)."""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import shared_path
from taskloom.data import build_data, packed
from taskloom.data.packed import Batch, PackedOptions
from taskloom.errors import DataError

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_record.py"
DEVICE = torch.device(os.environ.get("TASKLOOM_TEST_DEVICE", "cpu"))  # gpu_record.py's tests part: cuda


def _script():
    spec = importlib.util.spec_from_file_location("gpu_record_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)  # (puts scripts/ on sys.path: the gpurec package)
    return module


def _gpurec(name: str):
    """A piece of the script: ``gpurec.plan``, ``gpurec.probe``, ``gpurec.parts``."""
    _script()
    return importlib.import_module(f"gpurec.{name}")


def _synthetic_pack(folder: Path, n: int = 40) -> Path:
    """An MTFL-like pack of random faces (no real data needed)."""
    g = np.random.default_rng(0)

    def split(k):
        return {"images": g.integers(0, 256, (k, 1, 40, 40), dtype=np.uint8),
                "targets": {"landmarks": g.random((k, 5, 2), dtype=np.float32),
                            **{a: g.integers(0, c, k) for a, c in (("gender", 2), ("smile", 2), ("glasses", 2), ("pose", 5))}},
                "paths": [f"img{i}.jpg" for i in range(k)]}

    packed.write_pack(folder, "mtfl", {"train": split(n), "val": split(8), "test": split(8)})
    return folder


def test_codec_round_trip():
    g = np.random.default_rng(1)
    smooth = np.cumsum(g.integers(-3, 4, (6, 3, 17, 11)), axis=-1).clip(0, 255).astype(np.uint8)
    for images in (g.integers(0, 256, (5, 1, 9, 7), dtype=np.uint8), smooth, np.zeros((2, 3, 4, 4), np.uint8),
                   np.full((2, 1, 3, 3), 255, np.uint8)):
        blob = packed.encode_images(images)
        assert np.array_equal(packed.decode_images(blob, images.shape), images)
    assert len(packed.encode_images(smooth)) < smooth.size  # smooth images do compress


def test_batches_equal_samples_and_flip_rule(tmp_path):
    data = build_data(PackedOptions(root=str(_synthetic_pack(tmp_path / "p")), flip=False))
    assert [t.name for t in data.tasks] == ["landmarks", "gender", "smile", "glasses", "pose"]
    assert data.input_shape == (1, 40, 40) and len(data.train) == 40
    index = [3, 0, 7, 7]
    (batch,) = data.train.__getitems__(index)
    x, y = batch
    for row, i in enumerate(index):
        xi, yi = data.train[i]
        assert torch.equal(x[row], xi) and all(torch.equal(y[k][row], yi[k]) for k in yi)
    # flips: the same rule as mtfl.flip_sample, drawn from the CPU generator
    from taskloom.data.mtfl import ATTRIBUTES, flip_sample

    flipping = build_data(PackedOptions(root=str(tmp_path / "p"), flip=True)).train
    torch.manual_seed(5)
    (fx, fy), = flipping.__getitems__(list(range(40)))
    torch.manual_seed(5)
    mask = torch.rand(40) < 0.5
    assert 0 < int(mask.sum()) < 40
    for i in range(40):
        xi, yi = data.train[i]
        attrs = torch.stack([yi[a] for a in ATTRIBUTES])
        ex, ep, ea = flip_sample(xi, yi["landmarks"], attrs) if mask[i] else (xi, yi["landmarks"], attrs)
        assert torch.equal(fx[i], ex) and torch.allclose(fy["landmarks"][i], ep)
        assert torch.equal(torch.stack([fy[a][i] for a in ATTRIBUTES]), ea)


def test_dataloader_and_pin_memory_pass_batches_through(tmp_path):
    from torch.utils.data import DataLoader
    from torch.utils.data._utils.pin_memory import pin_memory

    data = build_data(PackedOptions(root=str(_synthetic_pack(tmp_path / "p")), flip=False))
    batches = [[0, 1, 2], [5, 6]]
    got = [(x.shape[0], y["pose"].tolist()) for x, y in DataLoader(data.train, batch_sampler=batches)]
    assert got == [(3, data.train.targets["pose"][:3].tolist()), (2, data.train.targets["pose"][5:7].tolist())]
    # tensors already on an accelerator stay where they are (a 'meta' tensor stands in for CUDA here)
    on_device = Batch(torch.empty(2, 1, 4, 4, device="meta"), {"pose": torch.empty(2, device="meta")})
    out = pin_memory(on_device)
    assert isinstance(out, Batch) and out.x is on_device.x


def test_options_are_checked(tmp_path):
    root = str(_synthetic_pack(tmp_path / "p"))
    with pytest.raises(DataError, match="data.subset"):
        build_data(PackedOptions(root=root, train_size=10))
    with pytest.raises(DataError, match="holds 40x40"):
        build_data(PackedOptions(root=root, size=32))
    with pytest.raises(DataError, match="meta.json"):
        build_data(PackedOptions(root=str(tmp_path)))
    sub = build_data(PackedOptions(root=root, subset=10)).train
    assert len(sub) == 10 and torch.equal(sub.targets["pose"],
                                          torch.from_numpy(np.load(Path(root) / "train_targets.npz")["pose"][packed.subset_index(40, 10)]))


def test_trainer_on_packed_data(tmp_path):
    """A real fit over a packed set (on the GPU when TASKLOOM_TEST_DEVICE=cuda: batches gathered
    on the device, the trainer's pin_memory DataLoader passing them through)."""
    from taskloom.config import load
    from taskloom.experiment import build_experiment
    from taskloom.train import fit

    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA")
    root = _synthetic_pack(tmp_path / "p")
    config = load(REPO / "configs" / "mtfl" / "cross_stitch.yaml",
                  [f"data={json.dumps({'name': 'packed', 'root': str(root), 'batch_size': 8, 'device': DEVICE.type})}",
                   "data.tasks=[landmarks, pose]", "train.loss_weights={pose: 0.1}", "train.epochs=1", f"train.device={DEVICE.type}", "train.progress=false",
                   "model.backbone.batch_norm=true"])
    data, model = build_experiment(config)
    assert data.train.images.device.type == DEVICE.type
    final = fit(model, data, config.train, tmp_path / "run", config=config, batch_size=8, eval_batch_size=16, log=lambda *a: None)
    assert final["tasks"]["landmarks"]["count"] == 8 and np.isfinite(final["tasks"]["landmarks"]["mean_error_iod"])


def test_schedule_and_budget_cuts():
    gr, probe_key = _gpurec("plan"), _gpurec("probe").probe_key
    assert gr.schedule([3, 3, 3], 2) == 6 and gr.schedule([], 4) == 0 and gr.schedule([1, 5, 1, 1], 2) == 5
    job = {"data": {"batch_size": 10, "tasks": None}, "model": {"architecture": "a", "backbone": "b"},
           "train": {"epochs": 30, "weighting": {"name": "fixed"}}}
    model = {"probe": {s: {probe_key(job): {"step_s": 0.01, "eval_sample_s": 1e-5}} for s in ("mtfl", "utkface")},
             "jobs": {s: [{"seed": k, "config": job, "weighting_row": False} for k in range(3)] * 4 for s in ("mtfl", "utkface")},
             "startup": 2.0, "meta": {s: {"train": 1000, "val": 100, "test": 100} for s in ("mtfl", "utkface")},
             "speedup": lambda n: min(n, 4), "compare_overhead": 5.0, "tests": 30.0, "bench": lambda s: 20.0}
    settings = {"studies": ["mtfl", "utkface"], "parts": ["tests", "bench", "mtfl", "utkface"], "seeds": 3,
                "epochs": {"mtfl": 30, "utkface": 30}, "batch": {"mtfl": 10, "utkface": 10}, "weighting": False,
                "weighting_auto": False, "jobs": 4}
    full = gr.total(gr.estimate(settings, model), 10.0)
    # 12 runs of 2 + 30 x (100 x 0.01 + 0.001) + 0.001 s, 4 at once, 4x faster than 4 alone
    assert full == pytest.approx(10 + 20 + 2 * (5 + 3 * (2 + 30 * 1.001 + 0.001)), rel=1e-6)
    fitted, cuts = gr.fit_budget(settings, model, full - 60, 10.0, lambda *a: None)
    assert cuts and gr.total(gr.estimate(fitted, model), 10.0) <= full - 60
    assert cuts[0].startswith("UTKFace 20") and fitted["epochs"]["mtfl"] == 30
    assert gr.fit_budget(settings, model, None, 10.0, print) == (settings, [])


def test_pack_round_trips_the_loaders(tmp_path):
    """pack on a small subset: within its budget, and the packs hold the loaders' arrays."""
    from taskloom.data.mtfl import MTFLOptions
    from taskloom.data.utkface import UTKFaceOptions

    shared = shared_path()
    shared_path("mtfl"), shared_path("utkface64")
    gr = _script()
    out = tmp_path / "carry"
    assert gr.main(["pack", "--data", str(shared), "--out", str(out), "--limit", "40", "--budget-mib", "0.3",
                    "--no-site"]) == 0
    manifest = json.loads((out / "MANIFEST.json").read_text())
    assert manifest["bytes"] <= 0.3 * 2**20
    n_utk = manifest["utkface_train"]["packed"]
    assert 0 < n_utk < manifest["utkface_train"]["of"]  # the budget forced a subsample

    mtfl = build_data(MTFLOptions(root=str(shared / "mtfl"), limit=40, val_size=8, flip=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        utk = build_data(UTKFaceOptions(root=str(shared / "utkface64"), size=32, limit=160, flip=False, train_size=n_utk))
    for name, original in (("mtfl", mtfl), ("utkface", utk)):
        pk = build_data(PackedOptions(root=str(out / "data"), pack=name, flip=False))
        assert [t.name for t in pk.tasks] == [t.name for t in original.tasks] and pk.input_shape == original.input_shape
        for split in ("train", "val", "test"):
            ref, got = original.split(split), pk.split(split)
            assert len(ref) == len(got) > 0
            (x, y), = got.__getitems__(list(range(len(got))))
            for i in range(len(ref)):
                xi, yi = ref[i]
                assert torch.equal(x[i], xi), (name, split, i)
                for k, v in yi.items():
                    assert torch.equal(y[k][i], torch.as_tensor(v)), (name, split, i, k)
    # the utkface options of the record's config (ordinal age) give the same tasks as the loader's
    ordinal = build_data(PackedOptions(root=str(out / "data"), pack="utkface", age_task="ordinal_expectation"))
    assert type(ordinal.tasks[0]).__name__ == "OrdinalExpectationTask"
    # unpack: the same arrays as .npy
    dest = packed.unpack(out / "data" / "utkface", tmp_path / "raw")
    again = build_data(PackedOptions(root=str(dest), flip=False))
    assert torch.equal(again.train.images, build_data(PackedOptions(root=str(out / "data"), pack="utkface")).train.images)


@pytest.mark.slow
def test_tiny_end_to_end(tmp_path):
    """pack --limit, run --tiny (every part a few steps, on CPU), bundle, report."""
    shared = shared_path()
    shared_path("mtfl"), shared_path("utkface64")
    carry, out = tmp_path / "carry", tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, str(SCRIPT), "pack", "--data", str(shared), "--out", str(carry),
                           "--limit", "60"], capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (carry / "site.zip").is_file() and "MiB in all" in done.stdout
    bundle = tmp_path / "b" / "gpu_record.tgz"
    done = subprocess.run([sys.executable, str(SCRIPT), "run", "--tiny", "--carry", str(carry), "--out", str(out),
                           "--jobs", "2", "--bundle", str(bundle)], capture_output=True, text=True, timeout=900,
                          env=env, cwd=REPO)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    for study in ("mtfl", "utkface"):
        rows = (out / "record" / study / "results.csv").read_text().splitlines()
        assert len(rows) == 4, rows  # 2 single-task runs + 1 grid entry, one seed
        assert (out / "record" / study / "wall_seconds.txt").is_file()
    for tag in ("fp32", "bf16", "bf16_cl"):
        assert "rows" in json.loads((out / "bench" / f"gpu_{tag}.json").read_text())
    assert json.loads((out / "bench" / "gpu_fp32.json").read_text())["rows"]
    reads = json.loads((out / "bench" / "gpu_trainer_reads.json").read_text())["rows"]
    assert [r["sync_every"] for r in reads] == [1, 50] and reads[0]["ratio_to_every_step"] == 1.0
    assert "passed" in (out / "tests" / "pytest.log").read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["parts"]) == {"tests", "bench", "mtfl", "utkface"}
    assert json.loads((out / "machine.json").read_text())["device"] == "cpu"
    with tarfile.open(bundle) as tar:
        names = tar.getnames()
    assert any(n.endswith("record/mtfl/results.csv") for n in names)
    assert not any("checkpoints" in n or n.endswith(".npy") for n in names)
    # scripts/record.py report turns the output into tables (here into a temporary docs folder)
    docs = tmp_path / "docs"
    assert _script().main(["report", "--runs", str(out), "--docs", str(docs)]) == 0
    page = (docs / "README.md").read_text()
    assert "| single-task |" in page and "| cross_stitch |" in page and "| nddr |" in page
    assert (docs / "mtfl" / "results.csv").is_file() and (docs / "mtfl" / "summary.json").is_file() and (docs / "utkface" / "machine.json").is_file()


@pytest.mark.slow
def test_plan_prints_estimates(tmp_path):
    """--plan: the probe (per-architecture step times and 1 vs 2 processes at once), each part's
    estimate, the budget's cuts and the flags; nothing is trained beyond the probe."""
    shared = shared_path()
    carry, out = tmp_path / "carry", tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    assert _script().main(["pack", "--data", str(shared), "--out", str(carry), "--limit", "40", "--no-site"]) == 0
    done = subprocess.run([sys.executable, str(SCRIPT), "run", "--tiny", "--plan", "--carry", str(carry), "--out", str(out),
                           "--budget", "1"], capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    for text in ("probe concurrency:  1 at once", "probe concurrency:  2 at once", "| mtfl |", "| utkface |",
                 "| **total** |", "cuts: no benchmark", "flags: --mtfl-epochs"):
        assert text in done.stdout, text
    plan = json.loads((out / "plan.json").read_text())
    assert plan["concurrency"]["jobs"] in (1, 2) and plan["cuts"] and plan["total_estimate_s"] > 0
    assert not (out / "record").exists()


def test_probe_from_an_earlier_plan_and_rows(tmp_path):
    """--probe-from: a rerun takes the step times, start-up and runs-at-once of an earlier
    plan.json instead of probing again; --rows keeps only the named grid rows (the single-task
    baselines always run) and names the known rows when a label is not one of them."""
    shared = shared_path()
    gr = _script()
    carry, out = tmp_path / "carry", tmp_path / "out"
    assert gr.main(["pack", "--data", str(shared), "--out", str(carry), "--limit", "40", "--no-site"]) == 0
    earlier = {"probe": {s: {"any": {"step_s": 0.5, "eval_sample_s": 1e-3}} for s in ("mtfl", "utkface")},
               "concurrency": {"jobs": 3, "speedup": {"1": 1.0, "3": 2.0}}, "startup_s": 7.0}
    (tmp_path / "plan.json").write_text(json.dumps(earlier))
    common = ["run", "--tiny", "--plan", "--carry", str(carry), "--out", str(out), "--probe-from", str(tmp_path / "plan.json")]
    assert gr.main([*common, "--rows", "cross_stitch", "nddr"]) == 0
    plan = json.loads((out / "plan.json").read_text())
    assert plan["concurrency"] == earlier["concurrency"] and plan["startup_s"] == 7.0 and plan["settings"]["jobs"] == 3
    assert not (out / "probe" / "probe").exists()  # nothing trained
    assert "not measured again" in (out / "gpu_record.log").read_text()
    # one tiny run of 1 epoch: 7 s start-up + the probe's 0.5 s per step, 3 at once at 2x
    assert plan["estimate_s"]["mtfl"] > 7.0
    settings = {"studies": ["mtfl", "utkface"], "seeds": 1, "epochs": {"mtfl": 1, "utkface": 1},
                "batch": {"mtfl": 8, "utkface": 8}, "weighting": True}
    probe = _gpurec("probe")
    grids = probe.make_grids(argparse.Namespace(tiny=False, rows=["hard", "nddr", "hard/dwa"]), tmp_path / "data",
                             tmp_path / "grids", settings)
    labels = {s: [probe._label(e) for e in yaml.safe_load(g.read_text())["architectures"]] for s, g in grids.items()}
    assert labels == {"mtfl": ["hard", "nddr", "hard/dwa"], "utkface": ["nddr"]}
    assert gr.main([*common, "--rows", "cross_stitch", "nope"]) == 2
    assert "--rows: 'nope' is not a row of mtfl (" in (out / "gpu_record.log").read_text()
    # --set: overrides for every run, last in each grid (so they win), checked before anything runs
    assert gr.main([*common, "--rows", "cross_stitch", "nddr", "--set", "model.batched_towers=packed", "train.sync_every=25"]) == 0
    for study in ("mtfl", "utkface"):
        grid = yaml.safe_load((out / "grids" / f"{study}.yaml").read_text())
        assert grid["overrides"][-2:] == ["model.batched_towers=packed", "train.sync_every=25"]
    assert json.loads((out / "plan.json").read_text())["settings"]["set"][0] == "model.batched_towers=packed"
    assert gr.main([*common, "--set", "model.batched_towers=fast"]) == 2
    log = (out / "gpu_record.log").read_text()
    assert "--set: " in log and "batched_towers" in log and "'fast'" in log


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_parts_stop_with_the_script(tmp_path):
    """The studies and tests run in their own process groups (so that a deadline stops a whole
    group); when the script stops (SIGTERM, Ctrl-C: an exception in the thread waiting for a
    part) the part must stop too, not run on as an orphan."""
    gr = _gpurec("parts")
    pid_file = tmp_path / "pid"
    sleeper = [sys.executable, "-c", f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(120)"]

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 3.0)
        with pytest.raises(KeyboardInterrupt):
            gr.run_logged(sleeper, tmp_path / "part.log", dict(os.environ), None, lambda *a: None)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    pid = int(pid_file.read_text())
    deadline = time.monotonic() + 20
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(pid) and not gr.CHILDREN
    # a part waited on in another thread (the tests part) is stopped by stop_children
    result = {}
    thread = threading.Thread(target=lambda: result.update(
        gr.run_logged(sleeper, tmp_path / "part2.log", dict(os.environ), None, lambda *a: None)))
    thread.start()
    while not gr.CHILDREN and time.monotonic() < deadline + 20:
        time.sleep(0.05)
    gr.stop_children()
    thread.join(30)
    assert not thread.is_alive() and result["returncode"] == -signal.SIGTERM


def test_report_merge_keeps_the_rows_a_later_run_lacks(tmp_path):
    """report --merge: a run of some rows (``--rows``) replaces those labels' rows in the
    committed tables and keeps the others (here: the committed GPU MTFL table as the earlier
    run, and a later run that has only cross-stitch, with a changed value)."""
    from taskloom.summary import read_csv, write_csv

    committed = REPO / "docs" / "results" / "gpu" / "mtfl"
    if not (committed / "results.csv").is_file():
        pytest.skip("no committed GPU MTFL table")
    gr = _script()
    docs, run = tmp_path / "docs", tmp_path / "run"
    (docs / "mtfl").mkdir(parents=True)
    (run / "record" / "mtfl").mkdir(parents=True)
    old = read_csv(committed / "results.csv")
    (docs / "mtfl" / "results.csv").write_bytes((committed / "results.csv").read_bytes())
    (docs / "mtfl" / "wall_seconds.txt").write_text("400\n")
    later = [dict(r, **{"landmarks/mean_error_iod": 0.05}) for r in old if r["label"] in ("single-task", "cross_stitch")]
    write_csv([{k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in r.items()} for r in later],
              run / "record" / "mtfl" / "results.csv")
    (run / "record" / "mtfl" / "wall_seconds.txt").write_text("100\n")
    (run / "summary.json").write_text("{}")
    assert gr.main(["report", "--runs", str(run), "--docs", str(docs), "--merge"]) == 0
    merged = read_csv(docs / "mtfl" / "results.csv")
    assert [r["label"] for r in merged] == [r["label"] for r in old]  # every label kept, in order
    for r, before in zip(merged, old):
        expected = 0.05 if r["label"] in ("single-task", "cross_stitch") else before["landmarks/mean_error_iod"]
        assert r["landmarks/mean_error_iod"] == expected and r["seed"] == before["seed"]
    assert (docs / "mtfl" / "wall_seconds.txt").read_text() == "500\n"
    assert (docs / "mtfl" / "summary-run.json").is_file()
    assert "| hard[+gender] |" in (docs / "README.md").read_text()
