"""taskloom: multi-task deep learning with learned cross-task feature sharing."""
from taskloom.architectures import (
    ARCHITECTURES, CrossStitchOptions, EnsembleOptions, NDDROptions, NDDRShortcutOptions, SingleOptions, SluiceOptions,
    SplitOptions, XResNetOptions, build_model,
)
from taskloom.backbones import BACKBONES, Backbone, BackboneOptions, LeNetOptions, SmallResNetOptions, TCDCNOptions
from taskloom.blocks import CrossResidual
from taskloom.config import Config, GroupOptions, ModelConfig, ParamGroups, ScheduleOptions, TrainConfig
from taskloom.data import DATASETS, DataBundle, DataOptions, build_data
from taskloom.data.multimnist import MultiMNISTOptions
from taskloom.errors import CheckpointError, ConfigError, DataError, TaskloomError
from taskloom.experiment import run
from taskloom.gated import ExpertStage, GatedMixer, MTANStage
from taskloom.gated_architectures import (  # importing it registers the gated architectures
    AdaTTOptions, CGCOptions, GatedOptions, MMoEOptions, MTANOptions, PLEOptions,
)
from taskloom.jd import JDOptions, JDWeighting  # registers the 'jd' weighting
from taskloom.mixers import NDDR, CrossShortcut, CrossStitch, Mixer, Sluice
from taskloom.models import MultiTaskModel, MultiTaskNet
from taskloom.tasks import ClassificationTask, Task
from taskloom.train import evaluate, fit

__version__ = "0.1.0"
