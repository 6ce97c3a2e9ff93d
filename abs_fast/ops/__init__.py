"""Ops with a Triton kernel, a native or PyTorch fallback, and one dispatch rule (see backend.py)."""

from abs_fast.ops.logprobs import token_logprobs
from abs_fast.ops.lora import lora_linear, lora_linear_reference
from abs_fast.ops.nf4 import nf4_dequantize

__all__ = ["lora_linear", "lora_linear_reference", "nf4_dequantize", "token_logprobs"]
