"""Checkpoints: written atomically, read with ``torch.load(..., weights_only=True)`` only.

A checkpoint is a plain mapping of tensors, numbers, strings, lists and dicts, so loading never
executes pickled code. Saving writes a temporary file in the same folder, flushes it to disk and
renames it over the target: a crash, kill or full disk at any moment leaves either the old or
the new checkpoint, never a torn one.
"""
from __future__ import annotations

import os
import pickle
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


def load(path: str | Path) -> dict[str, Any]:
    """Load a taskloom checkpoint safely (``weights_only=True``) onto the CPU."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path}: refused to load: the file holds objects other than tensors and plain data "
            f"(possibly code), which weights_only loading does not execute ({str(exc).splitlines()[0]})"
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable checkpoint (corrupt or truncated?): {exc}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a taskloom checkpoint (no '{FORMAT}' tag)")
    if payload.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint version {payload.get('version')} is not supported (expected {VERSION})")
    return payload
