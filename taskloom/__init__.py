"""taskloom: multi-task deep learning with learned cross-task feature sharing."""
from taskloom.backbones import BACKBONES, Backbone, BackboneOptions, LeNetOptions, TCDCNOptions
from taskloom.config import Config, GroupOptions, ModelConfig, ParamGroups, ScheduleOptions, TrainConfig
from taskloom.data import DATASETS, DataBundle, DataOptions, build_data
from taskloom.data.multimnist import MultiMNISTOptions
from taskloom.errors import CheckpointError, ConfigError, DataError, TaskloomError
from taskloom.mixers import NDDR, CrossShortcut, CrossStitch, Mixer, Sluice
from taskloom.models import (
    ARCHITECTURES, CrossStitchOptions, EnsembleOptions, MultiTaskNet, SingleOptions, SplitOptions, build_model,
)
from taskloom.models import CrossResidual, NDDROptions, NDDRShortcutOptions, SluiceOptions, XResNetOptions
from taskloom.backbones import SmallResNetOptions
from taskloom.tasks import ClassificationTask, Task
from taskloom.train import evaluate, fit, run

__version__ = "0.1.0"
