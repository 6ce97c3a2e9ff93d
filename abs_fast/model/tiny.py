"""Qwen2-architecture causal LMs from a config with seeded random weights: a CPU test size, and the
exact Qwen2.5-3B/7B/14B shapes for benchmarks (on the meta device on CPU, real on a GPU).

Nothing is downloaded: performance needs no trained weights, and tests need a model whose every
number is reproducible from a seed.
"""

from __future__ import annotations

import torch

__all__ = ["PRESETS", "build_model", "linear_shapes", "qwen2_config"]

_QWEN25_COMMON = dict(
    hidden_act="silu", rms_norm_eps=1e-6, rope_theta=1_000_000.0, max_position_embeddings=32768,
    bos_token_id=151643, eos_token_id=151645, attention_dropout=0.0, use_sliding_window=False,
    initializer_range=0.02,
)

# Shapes of the released Qwen2.5-*-Instruct configs; "tiny" keeps the real vocabulary so the real
# tokenizer's ids are valid, and is small everywhere else.
PRESETS: dict[str, dict] = {
    "tiny": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=4096),
    "qwen2.5-3b": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                       num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
    "qwen2.5-14b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=48, num_attention_heads=40,
                        num_key_value_heads=8, vocab_size=152064, tie_word_embeddings=False),
}


def qwen2_config(preset: str = "tiny", **overrides):
    """A transformers Qwen2Config for a preset name, with any field overridden."""
    from transformers import Qwen2Config

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    fields = {**_QWEN25_COMMON, **PRESETS[preset], **overrides}
    config = Qwen2Config(**fields)
    config._attn_implementation = "sdpa"
    return config


def linear_shapes(preset: str) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of each target linear of one decoder layer."""
    p = {**_QWEN25_COMMON, **PRESETS[preset]}
    h, inter = p["hidden_size"], p["intermediate_size"]
    kv = h // p["num_attention_heads"] * p["num_key_value_heads"]
    return {"q_proj": (h, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, h),
            "gate_proj": (inter, h), "up_proj": (inter, h), "down_proj": (h, inter)}


def build_model(preset: str = "tiny", seed: int = 0, device: torch.device | str | None = None,
                dtype: torch.dtype | None = None, **overrides):
    """A Qwen2ForCausalLM with random weights drawn from `seed` (global RNG state left untouched).

    Default device: the GPU when there is one; otherwise the CPU for "tiny" and the meta device
    (shapes only, no memory) for the full-size presets.
    """
    from transformers import Qwen2ForCausalLM

    config = qwen2_config(preset, **overrides)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else ("cpu" if preset == "tiny" else "meta")
    device = torch.device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with device:
                model = Qwen2ForCausalLM(config)
        finally:
            torch.set_default_dtype(previous)
    return model.eval()
