"""Training: configuration, the self-play loop, the RL update, checkpoints, metrics."""

from abs_fast.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from abs_fast.train.config import (
    MODES,
    TRAIN_PRESETS,
    TrainConfig,
    apply_overrides,
    config_from_file,
    preset_config,
    role_adapters,
)
from abs_fast.train.loop import NonFiniteTrainingError, Trainer, TrainingInterrupted
from abs_fast.train.metrics import MetricsLog, plot_metrics, read_metrics, summary_table
from abs_fast.train.update import Sample, UpdateSettings, policy_update

__all__ = [
    "MODES",
    "TRAIN_PRESETS",
    "MetricsLog",
    "NonFiniteTrainingError",
    "Sample",
    "TrainConfig",
    "Trainer",
    "TrainingInterrupted",
    "UpdateSettings",
    "apply_overrides",
    "config_from_file",
    "latest_checkpoint",
    "load_checkpoint",
    "plot_metrics",
    "policy_update",
    "preset_config",
    "read_metrics",
    "role_adapters",
    "save_checkpoint",
    "summary_table",
]
