"""Attention for the model's two kinds of batch, decided once where the batch is assembled.

- Packed tokens (training, scoring, rollout prefill): T tokens cut into causal documents, each
  attending only to itself (`Documents`: lengths on the host, cumulative lengths on the device).
  No [S, S] mask and no K/V copied per query head, on any device:
    torch-varlen  CUDA: torch.nn.attention.varlen.varlen_attn (FlashAttention varlen; native GQA,
                  sliding windows), where the installed torch has it;
    sdpa          anywhere: one scaled_dot_product_attention per document (causal, GQA without
                  copies via enable_gqa; a sliding window shorter than the document is a band mask
                  of that document's size).
- Decode (one new token per row reading the KV cache; `DecodeBatch`): the G query heads of a GQA
  group read their shared K/V in place:
    triton        CUDA (or the interpreter): a split-K flash-decoding kernel (kernels/attention.py)
                  reading per-row lengths from the device, so a step has no host sync and can be
                  captured in a CUDA graph;
    sdpa          anywhere: the G heads of a group laid out as G query positions against the group's
                  K/V slice of the cache (a view), with a key mask from the row lengths.

`ABS_FAST_ATTENTION` (auto | sdpa | torch-varlen) and `ABS_FAST_DECODE_ATTENTION` (auto | sdpa |
triton) override the automatic choice; `abs-fast info` shows what runs.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import itertools
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from abs_fast.ops.backend import triton_runs_on

__all__ = ["DECODE_BACKENDS", "PACKED_BACKENDS", "CacheWrite", "DecodeBatch", "Documents", "KVCache", "PackedBatch",
           "decode_attention", "decode_backend", "describe_attention", "packed_attention", "packed_backend"]

PACKED_BACKENDS = ("auto", "sdpa", "torch-varlen")
DECODE_BACKENDS = ("auto", "sdpa", "triton")


# ---------------------------------------------------------------------------------------------
# Which implementation runs
# ---------------------------------------------------------------------------------------------


@functools.cache
def _torch_varlen():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


@functools.cache
def _varlen_parameters() -> frozenset[str]:
    """The keyword parameters of the installed torch's varlen_attn: `enable_gqa` came with torch 2.13
    (which refuses Hq != Hkv without it), `window_size` with 2.11 (2.10 has `is_causal`)."""
    return frozenset(inspect.signature(_torch_varlen()).parameters)


def _requested(variable: str, choices: Sequence[str]) -> str:
    name = os.environ.get(variable, "auto")
    if name not in choices:
        raise ValueError(f"{variable} must be one of {', '.join(choices)}, got {name!r}")
    return name


def packed_backend(device: torch.device, dtype: torch.dtype) -> str:
    """The packed-attention implementation for tensors of `device` and `dtype`."""
    name = _requested("ABS_FAST_ATTENTION", PACKED_BACKENDS)
    varlen_ok = device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and _torch_varlen() is not None
    if name == "torch-varlen" and not varlen_ok:
        raise RuntimeError("ABS_FAST_ATTENTION=torch-varlen needs a CUDA device, fp16/bf16 and a torch with "
                           "torch.nn.attention.varlen")
    if name == "auto":
        return "torch-varlen" if varlen_ok else "sdpa"
    return name


def decode_backend(device: torch.device, head_dim: int = 128) -> str:
    """The decode-attention implementation for a KV cache on `device` (the Triton kernel needs a
    power-of-two head_dim >= 16, as Qwen2.5, Llama and Mistral have)."""
    name = _requested("ABS_FAST_DECODE_ATTENTION", DECODE_BACKENDS)
    kernel_ok = triton_runs_on(device) and head_dim >= 16 and head_dim & (head_dim - 1) == 0
    if name == "triton" and not kernel_ok:
        raise RuntimeError("ABS_FAST_DECODE_ATTENTION=triton needs a CUDA device (or TRITON_INTERPRET=1 on CPU) and "
                           f"a power-of-two head_dim >= 16 (this model's is {head_dim})")
    if name == "auto":
        return "triton" if device.type == "cuda" and kernel_ok else "sdpa"
    return name


def describe_attention() -> dict[str, str]:
    """What `abs-fast info` shows: the attention implementations per device."""
    out = {}
    for device in ("cpu", "cuda"):
        if device == "cuda" and not torch.cuda.is_available():
            out[device] = "no CUDA device"
            continue
        try:
            dev = torch.device(device)
            packed = packed_backend(dev, torch.bfloat16 if device == "cuda" else torch.float32)
            out[device] = f"packed: {packed}, decode: {decode_backend(dev)}"
        except (RuntimeError, ValueError) as err:
            out[device] = f"error: {err}"
    if not torch.cuda.is_available():
        out["torch-varlen"] = "available" if _torch_varlen() is not None else "not in this torch"
    return out


# ---------------------------------------------------------------------------------------------
# The batch descriptions
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Documents:
    """T packed tokens cut into consecutive causal documents of `lengths` (host ints, sum = T);
    `cu_seqlens` [docs + 1] int32 on the device."""

    lengths: tuple[int, ...]
    cu_seqlens: torch.Tensor

    @classmethod
    def from_lengths(cls, lengths: Sequence[int], device: torch.device | str) -> Documents:
        lengths = tuple(int(n) for n in lengths)
        if any(n < 1 for n in lengths):
            raise ValueError(f"document lengths must be >= 1, got {lengths}")
        bounds = [0]
        for n in lengths:
            bounds.append(bounds[-1] + n)
        return cls(lengths, torch.tensor(bounds, dtype=torch.int32, device=device))

    @classmethod
    def from_positions(cls, position_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> Documents:
        """Documents of the flattened [B, S] tokens: a new one starts at each row start and wherever
        a position restarts at 0 (packed rows). With an attention mask (1 = token), every padding
        token is a document of its own, so no token attends to padding; padding must sit at the
        start or the end of its row. Reads the positions on the host (one sync, at assembly)."""
        positions = position_ids.reshape(position_ids.shape[0] if position_ids.dim() > 1 else 1, -1).cpu()
        B, S = positions.shape
        starts = positions == 0
        starts[:, 0] = True
        if attention_mask is not None:
            pad = ~attention_mask.reshape(B, S).cpu().bool()
            starts |= pad
            starts[:, 1:] |= pad[:, :-1]  # a token after padding starts a new document
        bounds = [*starts.reshape(-1).nonzero().flatten().tolist(), B * S]
        return cls.from_lengths([b - a for a, b in itertools.pairwise(bounds)], position_ids.device)

    @property
    def num_tokens(self) -> int:
        return sum(self.lengths)

    @property
    def max_len(self) -> int:
        return max(self.lengths, default=0)


class KVCache:
    """Preallocated keys and values: [layers, rows, kv_heads, max_len, head_dim] each.

    Row r of the cache belongs to one sequence at a time; its first `length` positions are valid.
    The engine keeps live rows in slots 0..n-1 (see `move_row`), so decode reads a slice, not a gather.
    """

    def __init__(self, num_layers: int, rows: int, num_kv_heads: int, max_len: int, head_dim: int,
                 device: torch.device, dtype: torch.dtype):
        shape = (num_layers, rows, num_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.rows, self.max_len = rows, max_len

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def move_row(self, src: int, dst: int, length: int) -> None:
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]


@dataclass(frozen=True, eq=False)
class CacheWrite:
    """Where a packed forward (prefill) writes each token's keys and values: cache row `slots[t]`,
    position `positions[t]` (both [T] int64 on the device)."""

    cache: KVCache
    slots: torch.Tensor
    positions: torch.Tensor


@dataclass(frozen=True, eq=False)
class PackedBatch:
    """A packed forward: the documents, and optionally where their keys and values go in a KV cache."""

    documents: Documents
    cache_write: CacheWrite | None = None


@dataclass(frozen=True, eq=False)
class DecodeBatch:
    """One new token for each of the first B cache rows. `seq_lens` [B] int32 (device): keys each row
    attends to, the new token's included (it is written at position seq_lens - 1). `max_len`: a host
    upper bound of seq_lens (the sdpa path reads that many cache positions). `backend`: decided once
    per engine."""

    cache: KVCache
    seq_lens: torch.Tensor
    max_len: int
    backend: str = "sdpa"


# ---------------------------------------------------------------------------------------------
# Packed attention
# ---------------------------------------------------------------------------------------------


def _band_mask(n: int, window: int, device: torch.device) -> torch.Tensor:
    """[n, n] bool: key j visible to query i when j <= i and i - j < window (the family's sliding window)."""
    i = torch.arange(n, device=device)
    distance = i[:, None] - i[None, :]
    return (distance >= 0) & (distance < window)


def _sdpa_documents(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: Sequence[int],
                    window: int | None, scale: float) -> torch.Tensor:
    """One causal SDPA per document; q [T, H, D], k/v [T, KVH, D] -> [T, H, D]."""
    gqa = q.shape[1] != k.shape[1]
    outputs, start = [], 0
    for n in lengths:
        qd, kd, vd = (t[start:start + n].transpose(0, 1)[None] for t in (q, k, v))
        mask = _band_mask(n, window, q.device) if window is not None and window < n else None
        out = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask, is_causal=mask is None, scale=scale,
                                             enable_gqa=gqa)
        outputs.append(out[0].transpose(0, 1))
        start += n
    return torch.cat(outputs) if outputs else q.new_empty(q.shape)


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, documents: Documents, window: int | None,
                     backend: str, deterministic: bool = False) -> torch.Tensor:
    """Causal attention within each document: q [T, H, D], k/v [T, KVH, D] -> [T, H, D].
    deterministic: FlashAttention's backward (torch-varlen) sums dq in a fixed order, not with atomics."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    if backend == "torch-varlen":
        options = _varlen_options(q.shape[1] != k.shape[1], window)
        if options is not None:
            cu = documents.cu_seqlens

            def attend(q, k, v):
                return _torch_varlen()(q, k, v, cu, cu, documents.max_len, documents.max_len, scale=scale, **options)
            if deterministic and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
                return _DeterministicBackward.apply(q, k, v, attend)
            return attend(q, k, v)
    return _sdpa_documents(q, k, v, documents.lengths, window, scale)


@contextlib.contextmanager
def deterministic_algorithms():
    """torch's deterministic mode for the ops run inside (restored after, with its warn-only setting)."""
    mode = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(mode, warn_only=warn_only)


class _DeterministicBackward(torch.autograd.Function):
    """`attend(q, k, v)` whose backward runs in torch's deterministic mode: ATen's FlashAttention
    backward then accumulates dq without atomics (it reads that mode; nothing else runs inside). The
    forward keeps its own graph, as a plain call would, and the backward differentiates it."""

    @staticmethod
    def forward(ctx, q, k, v, attend):
        with torch.enable_grad():
            inputs = tuple(t.detach().requires_grad_(t.requires_grad) for t in (q, k, v))
            out = attend(*inputs)
        ctx.inputs, ctx.out = inputs, out
        return out.detach()

    @staticmethod
    def backward(ctx, grad_out):
        inputs, out = ctx.inputs, ctx.out
        wanted = [t for t in inputs if t.requires_grad]
        with deterministic_algorithms():
            grads = iter(torch.autograd.grad(out, wanted, grad_out))
        del ctx.inputs, ctx.out
        return (*(next(grads) if t.requires_grad else None for t in inputs), None)


def _varlen_options(gqa: bool, window: int | None) -> dict | None:
    """varlen_attn's keyword options for causal attention (within `window`) that the installed torch
    takes, or None when it cannot express the call (grouped heads without `enable_gqa`, a sliding
    window without `window_size`): the caller then takes the SDPA path."""
    parameters = _varlen_parameters()
    options: dict = {}
    if "window_size" in parameters:
        options["window_size"] = (-1, 0) if window is None else (window - 1, 0)
    elif window is None and "is_causal" in parameters:
        options["is_causal"] = True
    else:
        return None
    if gqa:
        if "enable_gqa" not in parameters:
            return None
        options["enable_gqa"] = True
    return options


# ---------------------------------------------------------------------------------------------
# Decode attention
# ---------------------------------------------------------------------------------------------


def _decode_sdpa(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seq_lens: torch.Tensor,
                 max_len: int, window: int | None, scale: float) -> torch.Tensor:
    """q [B, H, D]; cache [rows, KVH, L, D] (this layer). The G query heads of a group become G query
    positions against the group's keys: [B, KVH, G, D] x [B, KVH, max_len, D], no copy of K or V."""
    B, H, D = q.shape
    kv_heads = k_cache.shape[1]
    keys, values = k_cache[:B, :, :max_len], v_cache[:B, :, :max_len]  # views of the cache
    position = torch.arange(max_len, device=q.device)
    last = (seq_lens.to(torch.int64) - 1)[:, None]
    visible = position[None, :] <= last
    if window is not None:
        visible &= last - position[None, :] < window
    out = F.scaled_dot_product_attention(q.view(B, kv_heads, H // kv_heads, D), keys.to(q.dtype), values.to(q.dtype),
                                         attn_mask=visible[:, None, None, :], scale=scale)
    return out.reshape(B, H, D)


def _decode_splits(max_positions: int, rows: int, kv_heads: int, device: torch.device) -> int:
    """Key splits per (row, KV head): enough programs to fill the GPU, at least 256 keys each."""
    if device.type != "cuda":
        return 2  # the interpreter: exercise the split path at test sizes
    from abs_fast.ops.lora import _sm_count

    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return max(1, min(-(-2 * sms // max(rows * kv_heads, 1)), -(-max_positions // 256), 64))


def decode_block_g(group: int) -> int:
    """Query-head columns of the decode kernel's products for a group of `group` heads: the next power
    of two, at least 8 (the N granularity of an MMA; the keys are the M side)."""
    return max(8, 1 << (group - 1).bit_length())


def _decode_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seq_lens: torch.Tensor,
                   window: int | None, scale: float) -> torch.Tensor:
    from abs_fast.kernels import attention as kernels

    B, H, D = q.shape
    kv_heads, capacity = k_cache.shape[1], k_cache.shape[2]
    group = H // kv_heads
    splits = _decode_splits(capacity, B, kv_heads, q.device)
    split_size = -(-capacity // splits)
    partial = torch.empty(B, H, splits, D, device=q.device, dtype=torch.float32)
    lse = torch.empty(B, H, splits, device=q.device, dtype=torch.float32)
    block_n = 32 if os.environ.get("TRITON_INTERPRET") == "1" else 64
    kernels.decode_attention_kernel[(B, kv_heads, splits)](
        q, k_cache, v_cache, seq_lens, partial, lse,
        scale, 0 if window is None else window, split_size,
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), k_cache.stride(3),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), v_cache.stride(3),
        partial.stride(0), partial.stride(1), partial.stride(2), partial.stride(3),
        lse.stride(0), lse.stride(1), lse.stride(2),
        GROUP=group, BLOCK_G=decode_block_g(group), BLOCK_N=block_n, HEAD_DIM=D,
        IEEE=q.dtype == torch.float32,
    )
    # combine the splits (an empty split has lse -inf and weight 0)
    top = lse.amax(dim=2, keepdim=True)
    weight = torch.exp(lse - top)
    out = (partial * weight[..., None]).sum(2) / weight.sum(2)[..., None]
    return out.to(q.dtype)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: DecodeBatch,
                     window: int | None) -> torch.Tensor:
    """q [B, H, D] (one new token per row) against rows 0..B-1 of this layer's cache
    [rows, KVH, L, D]; row b attends to its first seq_lens[b] positions (within `window`)."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    if batch.backend == "triton":
        return _decode_triton(q, k_cache, v_cache, batch.seq_lens, window, scale)
    return _decode_sdpa(q, k_cache, v_cache, batch.seq_lens, batch.max_len, window, scale)
