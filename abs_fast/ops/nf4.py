"""NF4 dequantisation and the NF4 base product: Triton kernels with a PyTorch reference.

`nf4_dequantize` expands an `NF4Weight` to a dense tensor; `nf4_linear_reference` is the frozen-base
product y = x @ W^T that dequantises in forward and again in backward, so autograd never holds a
dense copy of W between the two passes (the reference counterpart of the fused Triton GEMM).
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

from abs_fast.ops.backend import select_backend
from abs_fast.quant.nf4 import NF4_CODE, NF4Weight

__all__ = ["NF4_PATHS", "nf4_dequantize", "nf4_linear_reference", "nf4_path"]

# How lora_linear's Triton backend multiplies by an NF4 base:
#   fused   decode each weight tile inside the GEMM's K-loop (no dense W anywhere)
#   buffer  dequantise the whole weight into one reused scratch buffer, then the dense fused GEMM
# "auto" is "fused" until GPU measurements give a shape rule (bench/RESULTS.md).
NF4_PATHS = ("auto", "fused", "buffer")


def nf4_path() -> str:
    name = os.environ.get("ABS_FAST_NF4_PATH", "auto")
    if name not in NF4_PATHS:
        raise ValueError(f"ABS_FAST_NF4_PATH must be one of {NF4_PATHS}, got {name!r}")
    return "fused" if name == "auto" else name


@functools.cache
def _code_on(device: torch.device) -> torch.Tensor:
    return NF4_CODE.to(device)


def code_table(device: torch.device) -> torch.Tensor:
    """The 16 NF4 code values (fp32) on `device`, cached."""
    return _code_on(torch.device(device))


def _check_dtype(dtype: torch.dtype) -> None:
    if dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        raise TypeError(f"NF4 dequantises to fp32/bf16/fp16/fp64, got {dtype}")


def _dequantize_triton(weight: NF4Weight, dtype: torch.dtype, out: torch.Tensor) -> torch.Tensor:
    from abs_fast.kernels import nf4 as k

    device = weight.device
    block_bytes = 1024
    numel = weight.numel
    dummy = weight.absmax
    k.nf4_dequantize_kernel[(-(-((numel + 1) // 2) // block_bytes),)](
        weight.packed, weight.absmax, code_table(device),
        weight.nested_absmax if weight.double_quant else dummy,
        weight.nested_code if weight.double_quant else dummy,
        weight.nested_offset.reshape(1) if weight.double_quant else dummy,
        out, numel,
        BLOCKSIZE_LOG2=weight.blocksize.bit_length() - 1, DOUBLE_QUANT=weight.double_quant,
        BLOCK_BYTES=block_bytes, enable_fp_fusion=False,
    )
    return out


def nf4_dequantize(weight: NF4Weight, dtype: torch.dtype | None = None, out: torch.Tensor | None = None,
                   *, backend: str | None = None) -> torch.Tensor:
    """The dense weight (fp32 products rounded once to `dtype`, bit-identical to bitsandbytes).

    `out` (contiguous, weight.numel elements of `dtype`) receives the result when given, so a caller
    can reuse one scratch buffer across layers. The Triton kernel runs on a GPU or under the
    interpreter; elsewhere `NF4Weight.dequantize` (PyTorch) does the work.
    """
    if not isinstance(weight, NF4Weight):
        raise TypeError(f"nf4_dequantize expects an NF4Weight, got {type(weight).__name__}")
    dtype = dtype or weight.dtype
    _check_dtype(dtype)
    if out is not None and (out.dtype != dtype or out.numel() != weight.numel or not out.is_contiguous()
                            or out.device != weight.device):
        raise ValueError(f"out must be a contiguous {dtype} tensor of {weight.numel} elements on "
                             f"{weight.device}, got {out.dtype} {tuple(out.shape)} on {out.device}")
    chosen = select_backend(weight.device, dtype if dtype != torch.float64 else torch.float32, backend)
    if chosen == "triton" and dtype != torch.float64:
        result = out if out is not None else torch.empty(weight.numel, device=weight.device, dtype=dtype)
        return _dequantize_triton(weight, dtype, result.view(-1)).view(weight.shape)
    dense = weight.dequantize(torch.float32).to(dtype)
    if out is None:
        return dense
    out.view(-1).copy_(dense.view(-1))
    return out.view(weight.shape)


class NF4LinearFunction(torch.autograd.Function):
    """y = x @ dequantize(W)^T (+ bias); backward dequantises again instead of keeping dense W."""

    @staticmethod
    def forward(ctx, x2d, weight: NF4Weight, bias):
        ctx.weight = weight
        return F.linear(x2d, weight.dequantize(torch.float32).to(x2d.dtype), bias)

    @staticmethod
    def backward(ctx, dy):
        dx = None
        if ctx.needs_input_grad[0]:
            dx = dy @ ctx.weight.dequantize(torch.float32).to(dy.dtype)
        return dx, None, None


def nf4_linear_reference(x2d: torch.Tensor, weight: NF4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """PyTorch x2d @ W^T (+ bias) for an NF4 W, differentiable in x2d only."""
    return NF4LinearFunction.apply(x2d, weight, bias)
