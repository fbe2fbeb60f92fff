"""Iterative Patch Selection (IPS) for very large images and whole slides."""

from ips.aggregation import CrossAttentionPool, sinusoidal_1d, sinusoidal_2d
from ips.config import (
    AugmentConfig,
    Config,
    DataConfig,
    GridConfig,
    ModelConfig,
    SelectionConfig,
    TaskSpec,
    TrainConfig,
    config_from_dict,
    config_to_dict,
    load_config,
)
from ips.encoders import create_encoder, list_encoders, register_encoder
from ips.heads import TaskHeads, compute_loss, predictions, probabilities
from ips.model import (
    IPSModel,
    IPSOutput,
    create_model,
    load_checkpoint,
    load_model,
    save_checkpoint,
)
from ips.predict import Prediction, predict
from ips.selection import Selection, eval_mode, gather_patches, select_patches
from ips.version import __version__

__all__ = [
    "__version__",
    "AugmentConfig",
    "Config",
    "CrossAttentionPool",
    "DataConfig",
    "GridConfig",
    "IPSModel",
    "IPSOutput",
    "ModelConfig",
    "Prediction",
    "Selection",
    "SelectionConfig",
    "TaskHeads",
    "TaskSpec",
    "TrainConfig",
    "compute_loss",
    "config_from_dict",
    "config_to_dict",
    "create_encoder",
    "create_model",
    "eval_mode",
    "gather_patches",
    "list_encoders",
    "load_checkpoint",
    "load_config",
    "load_model",
    "predict",
    "predictions",
    "probabilities",
    "register_encoder",
    "save_checkpoint",
    "select_patches",
    "sinusoidal_1d",
    "sinusoidal_2d",
]
