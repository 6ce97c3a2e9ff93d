"""Quantised frozen weights: NF4 in bitsandbytes' format, quantised bit-identically to it (CPU)."""

from abs_fast.quant.nf4 import NF4_CODE, NF4Weight, dynamic_code

__all__ = ["NF4_CODE", "NF4Weight", "dynamic_code"]
