"""Models: the policy (frozen base + named adapters), the multi-adapter linear layer, test models,
the offline Qwen2.5 tokenizer."""

from abs_fast.model.lora import MultiLoRALinear
from abs_fast.model.policy import Policy, load_policy, resolve_target_modules
from abs_fast.model.quantize import quantize_model_, quantized_linear_bytes
from abs_fast.model.tiny import PRESETS, build_model, linear_shapes, qwen2_config
from abs_fast.model.tokenizer import load_qwen25_tokenizer

__all__ = ["PRESETS", "MultiLoRALinear", "Policy", "build_model", "linear_shapes", "load_policy",
           "load_qwen25_tokenizer", "quantize_model_", "quantized_linear_bytes", "qwen2_config",
           "resolve_target_modules"]
