"""RMSNorm, SwiGLU and RoPE of the decoder layers: Liger-Kernel's fused Triton ops on CUDA when
liger-kernel is installed (`pip install abs-fast[gpu]`), exact PyTorch elsewhere.

The PyTorch versions compute the forward exactly as Hugging Face's Qwen2/Llama/Mistral layers do
(bit for bit), and save only what their backward needs: RMSNorm keeps its input in the model dtype
and one fp32 inverse RMS per token (not an fp32 copy of the input), SwiGLU keeps the gate and up
projections (not silu(gate) and the product as well). `ABS_FAST_LAYER_KERNELS` (auto | liger |
torch) overrides the choice, which is made once per model (`layer_kernels`).
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch
import torch.nn.functional as F

from abs_fast.ops.backend import triton_runs_on

__all__ = ["LAYER_KERNELS", "layer_kernels", "liger_available", "rms_norm", "rotary", "swiglu"]

LAYER_KERNELS = ("auto", "liger", "torch")
SWIGLU_CHUNK_ELEMENTS = 1 << 24  # rows per step of the PyTorch SwiGLU backward: its fp32 temporaries


@functools.cache
def liger_available() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def layer_kernels(device: torch.device) -> str:
    """"liger" or "torch" for a model on `device` (liger on CUDA when it is installed)."""
    name = os.environ.get("ABS_FAST_LAYER_KERNELS", "auto")
    if name not in LAYER_KERNELS:
        raise ValueError(f"ABS_FAST_LAYER_KERNELS must be one of {', '.join(LAYER_KERNELS)}, got {name!r}")
    if name == "liger" and not (liger_available() and triton_runs_on(device)):
        raise RuntimeError("ABS_FAST_LAYER_KERNELS=liger needs liger-kernel (pip install abs-fast[gpu]) and a CUDA "
                           "device (or TRITON_INTERPRET=1, fp32 only)")
    if name == "auto":
        return "liger" if device.type == "cuda" and liger_available() else "torch"
    return name


# --- RMSNorm ---------------------------------------------------------------------------------


class _RMSNorm(torch.autograd.Function):
    """y = weight * (x_fp32 * rsqrt(mean(x_fp32^2) + eps)).to(x.dtype); the weight is frozen."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        x32 = x.float()
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (x32 * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        normed = x.float() * rstd
        dnormed = dy.float() * weight.float()
        dx = rstd * (dnormed - normed * (dnormed * normed).mean(-1, keepdim=True))
        return dx.to(x.dtype), None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, kernels: str = "torch") -> torch.Tensor:
    if kernels == "liger":
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction

        shape = x.shape
        return LigerRMSNormFunction.apply(x.reshape(-1, shape[-1]), weight, eps, 0.0, "llama", True).view(shape)
    if x.requires_grad and torch.is_grad_enabled():
        return _RMSNorm.apply(x, weight, eps)
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


# --- SwiGLU ----------------------------------------------------------------------------------


class _SiLUMul(torch.autograd.Function):
    """silu(gate) * up, saving gate and up only (silu is recomputed in backward, in fp32)."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        dgate, dup = torch.empty_like(gate), torch.empty_like(up)
        rows = max(1, SWIGLU_CHUNK_ELEMENTS // max(gate.shape[-1], 1))  # fp32 temporaries of a few chunks only
        g_all, u_all, d_all = (t.reshape(-1, t.shape[-1]) for t in (gate, up, dy))
        for start in range(0, g_all.shape[0], rows):
            part = slice(start, start + rows)
            g, u, d = g_all[part].float(), u_all[part].float(), d_all[part].float()
            sigmoid = torch.sigmoid(g)
            dgate.view(-1, g.shape[-1])[part] = d * u * sigmoid * (1 + g * (1 - sigmoid))
            dup.view(-1, g.shape[-1])[part] = d * g * sigmoid
        return dgate, dup


def swiglu(gate: torch.Tensor, up: torch.Tensor, kernels: str = "torch") -> torch.Tensor:
    if kernels == "liger":
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction

        return LigerSiLUMulFunction.apply(gate, up)
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return _SiLUMul.apply(gate, up)
    return F.silu(gate) * up


# --- RoPE ------------------------------------------------------------------------------------


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
           kernels: str = "torch") -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, H, D], k [T, KVH, D]; cos/sin [T, D] (Hugging Face's rotate-half convention)."""
    if kernels == "liger":
        from liger_kernel.ops.rope import LigerRopeFunction

        T = q.shape[0]
        q4 = q.reshape(1, T, q.shape[1], q.shape[2]).transpose(1, 2)  # the layout liger reads: [1, H, T, D]
        k4 = k.reshape(1, T, k.shape[1], k.shape[2]).transpose(1, 2)
        q4, k4 = LigerRopeFunction.apply(q4, k4, cos[None], sin[None])
        return q4.transpose(1, 2)[0], k4.transpose(1, 2)[0]
    cos, sin = cos[:, None, :], sin[:, None, :]
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
