"""Settings, the log, machine facts and the environment of the GPU record's child processes."""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "gpu_record.py"  # the entry point, also of its worker subcommands
if str(REPO) not in sys.path:
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


def load_script(path: Path, name: str):
    """The repository's script at ``path`` imported as module ``name`` (scripts and benchmarks
    are not a package); registered in ``sys.modules`` so that its dataclasses and pickles work."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


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
