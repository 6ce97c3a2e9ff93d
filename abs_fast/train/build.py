"""The tokenizer, policy and judge a TrainConfig names (shared by training, evaluation,
cross-play and exploitability runs, so all of them load a model the same way)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from abs_fast.game import HeuristicJudge, Judge, WildGuardJudge
from abs_fast.train.config import TrainConfig

__all__ = ["load_judge", "load_policy_for", "load_tokenizer_for", "stop_token_ids", "target_modules_of"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_tokenizer_for(config: TrainConfig):
    """config.tokenizer, else the model directory's tokenizer; the offline Qwen2.5 one for presets."""
    from abs_fast.model import PRESETS, load_qwen25_tokenizer

    source = config.tokenizer or config.model
    if source in PRESETS or source == "qwen2.5":
        return load_qwen25_tokenizer()
    from transformers import AutoTokenizer

    if not (Path(source) / "tokenizer_config.json").is_file() and not (Path(source) / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{source}: no tokenizer files (tokenizer.json / tokenizer_config.json); set "
                                "tokenizer=DIR, or tokenizer=qwen2.5 for the offline Qwen2.5 tokenizer")
    return AutoTokenizer.from_pretrained(source, local_files_only=True, trust_remote_code=False)


def _device(config: TrainConfig, device: str | None) -> str | None:
    if device is not None:
        return device
    return None if config.device == "auto" else config.device


def target_modules_of(config: TrainConfig) -> str | list[str]:
    """config.target_modules as load_policy takes it: "all-linear" or a list of projection names."""
    if config.target_modules == "all-linear":
        return "all-linear"
    return [t.strip() for t in config.target_modules.split(",")]


def load_policy_for(config: TrainConfig, adapters: Sequence[str] = (), log: Callable[[str], None] | None = None,
                    device: str | None = None):
    """The base model of `config` (seeded random weights for presets) with fresh adapters `adapters`.
    device: overrides config.device (a data-parallel rank's own GPU)."""
    from abs_fast.model import PRESETS, load_policy

    if config.model in PRESETS and config.model != "tiny" and log is not None:
        log(f"model={config.model} is a preset with RANDOM weights (for benchmarks); pass --model DIR to use a real "
            "checkpoint")
    device = _device(config, device)
    return load_policy(config.model, quantize=None if config.quantize == "none" else config.quantize,
                       adapters=tuple(adapters), rank=config.lora_rank, alpha=config.lora_alpha,
                       target_modules=target_modules_of(config), device=device, dtype=_DTYPES.get(config.dtype),
                       seed=config.seed)


def load_judge(config: TrainConfig, device: str | None = None) -> Judge:
    if config.judge == "heuristic":
        return HeuristicJudge()
    return WildGuardJudge.from_pretrained(config.judge_model, device=_device(config, device),
                                          max_batch=config.judge_max_batch, max_seq_len=config.judge_max_seq_len)


def stop_token_ids(tokenizer, policy) -> tuple[int, ...]:
    """Ids that end a turn: the tokenizer's EOS and the model's generation_config EOS ids."""
    return tuple(sorted(i for i in {tokenizer.eos_token_id, *policy.config.eos_token_ids} if i is not None))
