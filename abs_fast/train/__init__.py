"""Training: configuration, the self-play loop, the RL update, checkpoints, metrics."""

from abs_fast.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from abs_fast.train.config import MODES, TRAIN_PRESETS, TrainConfig, apply_overrides, config_from_file, preset_config
from abs_fast.train.loop import SeedStream, Trainer, role_adapters
from abs_fast.train.metrics import MetricsLog, plot_metrics, read_metrics, summary_table
from abs_fast.train.update import Sample, UpdateSettings, micro_batches, packed_logprobs, policy_update

__all__ = ["MODES", "TRAIN_PRESETS", "MetricsLog", "Sample", "SeedStream", "TrainConfig", "Trainer",
           "UpdateSettings", "apply_overrides", "config_from_file", "latest_checkpoint", "load_checkpoint",
           "micro_batches", "packed_logprobs", "plot_metrics", "policy_update", "preset_config", "read_metrics",
           "role_adapters", "save_checkpoint", "summary_table"]
