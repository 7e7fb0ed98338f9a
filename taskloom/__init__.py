"""taskloom: multi-task deep learning with learned cross-task feature sharing.

The names below are imported on first use (PEP 562), so that ``import taskloom`` -- which the
``taskloom`` console script does before ``main()`` runs -- does not import torch: the CLI
answers ``--help`` quickly and handles Ctrl-C during the imports like any other moment.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "taskloom.architectures": ("ARCHITECTURES", "CrossStitchOptions", "EnsembleOptions", "NDDROptions",
                               "NDDRShortcutOptions", "SingleOptions", "SluiceOptions", "SplitOptions",
                               "XResNetOptions", "build_model"),
    "taskloom.backbones": ("BACKBONES", "Backbone", "BackboneOptions", "LeNetOptions", "SmallResNetOptions",
                           "TCDCNOptions"),
    "taskloom.blocks": ("CrossResidual",),
    "taskloom.config": ("Config", "GroupOptions", "ModelConfig", "ParamGroups", "ScheduleOptions", "TrainConfig"),
    "taskloom.data": ("DATASETS", "DataBundle", "DataOptions", "build_data"),
    "taskloom.data.multimnist": ("MultiMNISTOptions",),
    "taskloom.errors": ("CheckpointError", "ConfigError", "DataError", "TaskloomError"),
    "taskloom.experiment": ("run",),
    "taskloom.gated": ("ExpertStage", "GatedMixer", "MTANStage"),
    "taskloom.gated_architectures": ("AdaTTOptions", "CGCOptions", "GatedOptions", "MMoEOptions", "MTANOptions",
                                     "PLEOptions"),
    "taskloom.jd": ("JDOptions", "JDWeighting"),
    "taskloom.mixers": ("NDDR", "CrossShortcut", "CrossStitch", "Mixer", "Sluice"),
    "taskloom.models": ("MultiTaskModel", "MultiTaskNet"),
    "taskloom.tasks": ("ClassificationTask", "Task"),
    "taskloom.train": ("evaluate", "fit"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'taskloom' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
