"""Rollout engines: generation for the self-play waves (embedded here; SGLang on big GPUs)."""

from abs_fast.rollout.base import RolloutEngine, RolloutRequest, RolloutResult, SamplingParams
from abs_fast.rollout.embedded import EmbeddedEngine

__all__ = ["EmbeddedEngine", "RolloutEngine", "RolloutRequest", "RolloutResult", "SamplingParams"]
