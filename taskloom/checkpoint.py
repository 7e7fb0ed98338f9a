"""Checkpoints: written atomically, read with ``torch.load(..., weights_only=True)`` only.

A checkpoint is a plain mapping of tensors, numbers, strings, lists and dicts, so loading never
executes pickled code. Saving writes a temporary file in the same folder, flushes it to disk and
renames it over the target: a crash, kill or full disk at any moment leaves either the old or
the new checkpoint, never a torn one.
"""
from __future__ import annotations

import os
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from taskloom.errors import CheckpointError

FORMAT = "taskloom-checkpoint"
VERSION = 1


def save(payload: dict[str, Any], path: str | Path) -> None:
    """Atomically write ``payload`` (plus format tags) to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save({"format": FORMAT, "version": VERSION, **payload}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise CheckpointError(
                f"could not write checkpoint {path}: {exc.strerror or exc}; the previous checkpoint "
                f"at that path (if any) is intact"
            ) from None
        raise


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _torch_load(path: Path, what: str) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, every failure a one-line
    :class:`CheckpointError` starting with ``what``. PyTorch's hint to retry with
    ``weights_only=False`` (which would execute the file's code) is never passed on."""
    if not path.is_file():
        raise CheckpointError(f"{what}: {'is a folder, not a file' if path.is_dir() else 'not found'}")
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as exc:
        raise CheckpointError(f"{what}: cannot read ({exc.strerror or exc})") from None
    if not head.startswith(b"PK") and not head.startswith(b"\x80"):  # neither a zip nor a pickle
        raise CheckpointError(f"{what}: not a checkpoint (not a file written by torch.save)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        blocked = [line for line in str(exc).splitlines() if "GLOBAL" in line or "global" in line.split(" ")[:4]]
        if blocked:
            raise CheckpointError(
                f"{what}: refused to load: the file holds Python objects other than tensors and plain data "
                f"(possibly code), which taskloom never executes ({blocked[0].strip()})"
            ) from None
        raise CheckpointError(f"{what}: not a checkpoint (corrupt, or not a file written by torch.save)") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError, KeyError, IndexError,
            TypeError, AttributeError, UnicodeDecodeError, MemoryError, OverflowError) as exc:
        detail = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{what}: not a readable checkpoint (corrupt or truncated?): {detail}") from None


def load(path: str | Path) -> dict[str, Any]:
    """Load a taskloom checkpoint safely (``weights_only=True``) onto the CPU."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint not found")
    payload = _torch_load(path, str(path))
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a taskloom checkpoint (no '{FORMAT}' tag)")
    if payload.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint version {payload.get('version')} is not supported (expected {VERSION})")
    return payload


def load_state_dict_file(path: str | Path, what: str = "model.backbone.weights") -> dict[str, torch.Tensor]:
    """A state dict saved with ``torch.save`` (pretrained weights), loaded safely onto the CPU.

    A mapping under ``state_dict`` or ``model`` (a training checkpoint) is unwrapped. Every failure
    is a one-line :class:`CheckpointError` naming ``what`` (the config key) and the file."""
    path = Path(path).expanduser()
    state = _torch_load(path, f"{what}: {path}")
    if isinstance(state, dict):
        state = state.get("state_dict", state.get("model", state))
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{what}: {path}: not a state dict (a mapping of parameter names to tensors)")
    return state
