"""FLARE training: mesh and sharding rules, optimizer, train step, checkpoints, metrics, loop."""

from flare_jax.train.config import (
    TrainConfigError,
    apply_overrides,
    default_config,
    load_config_file,
    validate,
)
from flare_jax.train.loop import TrainResult, export_checkpoint, train

__all__ = [
    "TrainConfigError",
    "TrainResult",
    "apply_overrides",
    "default_config",
    "export_checkpoint",
    "load_config_file",
    "train",
    "validate",
]
