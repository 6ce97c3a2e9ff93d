"""Differentiable ops with dispatch: Triton on a GPU (or under the interpreter), PyTorch reference otherwise."""

from abs_fast.ops.lora import lora_linear, lora_linear_reference

__all__ = ["lora_linear", "lora_linear_reference"]
