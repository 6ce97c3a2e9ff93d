"""The fused multi-adapter LoRA linear: one pass over a frozen base for tokens of many adapters.

    y[t] = x[t] @ W^T (+ bias) + scaling[a] * (x[t] @ A[a]^T) @ B[a]^T,   a = adapter_ids[t]

adapter_ids[t] == -1 means "base only" (the KL-reference rows). Differentiable in x, lora_a and
lora_b; the base weight and bias are frozen and receive no gradient.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from abs_fast.native import NativeError
from abs_fast.ops.backend import requested_backend, select_backend, triton_interpreting
from abs_fast.ops.nf4 import (
    NF4_DECODE_MAX_ROWS,
    native_failed,
    native_unsupported_reason,
    nf4_decode_choice,
    nf4_dequantize,
    nf4_lora_native,
    nf4_path,
)
from abs_fast.ops.routing import AdapterRouting, SegmentPlan
from abs_fast.quant.nf4 import NF4_CODE, NF4Weight, code_table

__all__ = ["KernelConfig", "lora_linear", "lora_linear_reference"]

logger = logging.getLogger(__name__)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


# ---------------------------------------------------------------------------------------------
# Input checking (shared by both backends)
# ---------------------------------------------------------------------------------------------


def _as_scaling(scaling: torch.Tensor | Sequence[float], n_adapters: int, device: torch.device) -> torch.Tensor:
    if not isinstance(scaling, torch.Tensor):
        scaling = torch.tensor(list(scaling), dtype=torch.float32)
    if scaling.shape != (n_adapters,):
        raise ValueError(f"scaling must have shape [n_adapters]=[{n_adapters}], got {tuple(scaling.shape)}")
    return scaling.detach().to(device=device, dtype=torch.float32)


def _check_inputs(x, weight, lora_a, lora_b, routing: AdapterRouting, bias):
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension [..., K]")
    K = x.shape[-1]
    nf4 = isinstance(weight, NF4Weight)
    if not nf4 and not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor or an NF4Weight, got {type(weight).__name__}")
    if len(weight.shape) != 2 or weight.shape[1] != K:
        raise ValueError(f"weight must be [N, K] with K={K} (x's last dim), got {tuple(weight.shape)}")
    N = weight.shape[0]
    if lora_a.dim() != 3 or lora_a.shape[2] != K:
        raise ValueError(f"lora_a must be [n_adapters, r, K] with K={K}, got {tuple(lora_a.shape)}")
    n, r = lora_a.shape[0], lora_a.shape[1]
    if tuple(lora_b.shape) != (n, N, r):
        raise ValueError(f"lora_b must be [n_adapters, N, r] = [{n}, {N}, {r}], got {tuple(lora_b.shape)}")
    T = x.numel() // K if K else 0
    if routing.num_tokens != T:
        raise ValueError(f"adapter_ids must hold one id per token ({T} tokens), got {routing.num_tokens}")
    if routing.n_adapters != n:
        raise ValueError(f"the adapter routing was built for {routing.n_adapters} adapters, lora_a holds {n}")
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"bias must be [N]=[{N}], got {tuple(bias.shape)}")
    if nf4:  # dequantised to x's dtype
        if x.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            raise TypeError(f"an NF4 weight multiplies fp32/bf16/fp16/fp64 inputs, got x dtype {x.dtype}")
    elif weight.dtype != x.dtype:
        raise TypeError(f"weight dtype {weight.dtype} does not match x dtype {x.dtype}")
    for name, t in (("weight", weight), ("lora_a", lora_a), ("lora_b", lora_b), ("adapter_ids", routing.ids)):
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if torch.is_grad_enabled() and ((not nf4 and weight.requires_grad) or (bias is not None and bias.requires_grad)):
        raise ValueError("lora_linear keeps the base frozen: weight and bias get no gradient; "
                         "call requires_grad_(False) on them")
    return T, N, K, n, r


# ---------------------------------------------------------------------------------------------
# PyTorch reference (any float dtype, float64 included): used on CPU when not interpreting
# ---------------------------------------------------------------------------------------------


class ReferenceLoRAFunction(torch.autograd.Function):
    """PyTorch forward and backward of `lora_linear` on 2-D inputs, saving what the Triton path saves:
    the input in its own dtype and the [T, n*r] shrunk activations (not fp32 copies of the input)."""

    @staticmethod
    def forward(ctx, x2d, weight, lora_a, lora_b, token_scale, bias):
        nf4 = isinstance(weight, NF4Weight)
        y = F.linear(x2d, weight.dequantize(x2d.dtype) if nf4 else weight, bias)
        n, r, K = lora_a.shape
        shrunk = None
        if n > 0 and r > 0:
            T, N = x2d.shape[0], y.shape[1]
            shrunk = F.linear(x2d.to(lora_a.dtype), lora_a.reshape(n * r, K)).view(T, n, r)
            shrunk = (shrunk * token_scale[:, :, None]).reshape(T, n * r)
            expand = lora_b.permute(1, 0, 2).reshape(N, n * r)  # [N, n*r], adapter-major columns
            y = y + F.linear(shrunk, expand.to(shrunk.dtype)).to(y.dtype)
        ctx.save_for_backward(x2d, None if nf4 else weight, lora_a, lora_b, token_scale, shrunk)
        ctx.nf4_weight = weight if nf4 else None
        return y

    @staticmethod
    def backward(ctx, dy):
        x2d, weight, lora_a, lora_b, token_scale, shrunk = ctx.saved_tensors
        weight = ctx.nf4_weight if ctx.nf4_weight is not None else weight
        need_x, _, need_a, need_b = ctx.needs_input_grad[:4]
        n, r, K = lora_a.shape
        T, N = dy.shape
        dx = da = db = None
        if need_x:
            dense = weight.dequantize(dy.dtype) if isinstance(weight, NF4Weight) else weight
            dx = dy @ dense
        if shrunk is None:
            if need_a:
                da = torch.zeros_like(lora_a)
            if need_b:
                db = torch.zeros_like(lora_b)
            return dx, None, da, db, None, None
        dy_lora = dy.to(lora_a.dtype)
        if need_x or need_a:
            d_shrunk = (dy_lora @ lora_b.permute(1, 0, 2).reshape(N, n * r)).view(T, n, r) * token_scale[:, :, None]
            d_shrunk = d_shrunk.reshape(T, n * r)
            if need_x:
                dx = dx + (d_shrunk @ lora_a.reshape(n * r, K)).to(dx.dtype)
            if need_a:
                da = (d_shrunk.T @ x2d.to(lora_a.dtype)).view(n, r, K)
        if need_b:
            db = (dy_lora.T @ shrunk).view(N, n, r).permute(1, 0, 2)
        return dx, None, da, db, None, None


def lora_linear_reference(x, weight, lora_a, lora_b, adapter_ids, scaling, bias=None):
    """Plain PyTorch: the base product plus every adapter's LoRA term masked to its own tokens.

    An NF4 weight is dequantised to x's dtype for the base product (and again in backward).

    All adapters are stacked into one shrink and one expand GEMM ([T, n*r] in between), so the cost
    is two small GEMMs however many adapters there are. The LoRA branch runs in the adapters' dtype
    (x is cast to it, as PEFT does) and is added to the base output in x's dtype.
    """
    routing = _routing(adapter_ids, lora_a.shape[0], x.device)
    T, N, K, n, _ = _check_inputs(x, weight, lora_a, lora_b, routing, bias)
    scaling = _as_scaling(scaling, n, x.device)
    x2d = x.reshape(T, K)
    token_scale = routing.one_hot(lora_a.dtype) * scaling.to(lora_a.dtype)[None, :] if n > 0 else \
        x2d.new_zeros(T, 0, dtype=lora_a.dtype)  # [T, n]
    y = ReferenceLoRAFunction.apply(x2d, weight, lora_a, lora_b, token_scale, bias)
    return y.reshape(*x.shape[:-1], N)


# ---------------------------------------------------------------------------------------------
# Triton launchers
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelConfig:
    """Block sizes and splits. On a GPU, BLOCK_N/BLOCK_K/warps/stages of the fused matmul are
    autotuned per (N, K, dtype); the rest follows `kernel_config`."""

    block_m: int
    block_n: int = 64
    block_k: int = 32
    group_m: int = 8
    shrink_split_k: int = 1
    grad_splits: int = 1
    num_warps: int = 4
    num_stages: int = 2


# Under TRITON_INTERPRET=1 every program x loop step costs milliseconds: small blocks keep test
# shapes multi-tile, and the split paths (partial sums in the shrink and the grads) run.
INTERPRETER_CONFIG = KernelConfig(block_m=16, block_n=32, block_k=32, group_m=2, shrink_split_k=2,
                                  grad_splits=2)


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _arch(device_index: int) -> int:
    major, minor = torch.cuda.get_device_capability(device_index)
    return 10 * major + minor


def kernel_config(T: int, N: int, K: int, n_adapters: int, device: torch.device) -> KernelConfig:
    if triton_interpreting():
        return INTERPRETER_CONFIG
    block_m = 16 if T <= 16 else 32 if T <= 32 else 64 if T <= 512 else 128
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    tiles = _cdiv(T, block_m) + n_adapters
    # shrink: split K when the tiles alone cannot fill the GPU (decode, small batches)
    split_k = max(1, min(_cdiv(2 * sms, max(tiles, 1)), K // 256))
    grad_d_tiles = _cdiv(max(N, K), 64) * max(n_adapters, 1)
    grad_splits = max(1, min(_cdiv(4 * sms, grad_d_tiles), _cdiv(T, block_m)))
    return KernelConfig(block_m=block_m, shrink_split_k=split_k, grad_splits=grad_splits)


def _lora_precision(dtype: torch.dtype) -> str:
    # LoRA-side products are fp32 dots: exact IEEE for fp32 models, tf32 (10-bit mantissa, better
    # than the bf16 inputs) for 16-bit models.
    return "ieee" if dtype == torch.float32 else "tf32"


_autotuned = {}

# (BLOCK_N, BLOCK_K, num_warps, num_stages) the fused matmul is autotuned over on a GPU: one large
# tile for the big projections (256 x 64), two 128-wide tiles (8 warps and 3 stages; 4 warps and 4
# stages over a shorter K step), and two 64-wide ones for narrow outputs and the small shared memory
# of consumer cards. (128, 64, 4, 4) was dropped: the same tile as the first with more shared memory.
# Which of them win on each GPU is unmeasured (no GPU has run them).
FUSED_MATMUL_CONFIGS = ((128, 64, 8, 3), (256, 64, 8, 3), (128, 32, 4, 4), (64, 64, 4, 4), (64, 32, 4, 5))

# Shared memory per block a kernel may use, by compute capability (bytes).
SHARED_MEMORY_BYTES = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448, 100: 232448, 120: 101376}

# The fused matmul's (shared memory bytes, register spill bytes) per configuration at its largest
# launch (BLOCK_M 128, BLOCK_R 64: rank 64), forward and backward, as Triton 3.9 compiles it for sm_80
# (the Ampere/Ada code generation: sm_86/89 too) and sm_90: [arch family][W_NF4][config].
# tests/test_kernels_compile.py compiles every one with the installed Triton and checks that the
# shared memory is the same and the pruner chooses the same configurations. Spill sizes vary between
# Triton versions (3.6, the GPU image's, spills 304 B where 3.9 spills 112 B, and none in the one
# sm_80 NF4 tile the pruner keeps, which spills 24 B with 3.9).
FUSED_MATMUL_RESOURCES = {
    80: {
        False: {(128, 64, 8, 3): (65536, 0), (256, 64, 8, 3): (98304, 320), (128, 32, 4, 4): (65536, 112),
               (64, 64, 4, 4): (73728, 0), (64, 32, 4, 5): (49152, 0)},
        True: {(128, 64, 8, 3): (163840, 88), (256, 64, 8, 3): (294912, 1380), (128, 32, 4, 4): (122880, 300),
               (64, 64, 4, 4): (147456, 200), (64, 32, 4, 5): (98304, 24)},
    },
    90: {
        False: {(128, 64, 8, 3): (98304, 0), (256, 64, 8, 3): (147456, 0), (128, 32, 4, 4): (65536, 0),
               (64, 64, 4, 4): (98304, 0), (64, 32, 4, 5): (61440, 0)},
        True: {(128, 64, 8, 3): (196608, 0), (256, 64, 8, 3): (344064, 2236), (128, 32, 4, 4): (139264, 212),
               (64, 64, 4, 4): (172032, 0), (64, 32, 4, 5): (110592, 0)},
    },
}


FUSED_MATMUL_KEY = ["N", "K", "BLOCK_M", "HAS_LORA", "W_NF4"]  # what the autotuner times anew


def fused_matmul_fits(arch: int, nf4: bool, shared_bytes: int | None = None) -> list[tuple[int, int, int, int]]:
    """The fused matmul configurations the autotuner gets on a GPU of compute capability `arch` (e.g.
    90), for a dense (nf4=False) or an NF4 base: those whose shared memory at the largest launch
    (FUSED_MATMUL_RESOURCES) is within the per-block limit (`shared_bytes`, default
    SHARED_MEMORY_BYTES[arch]) and that spill no registers; where every fitting one spills, the one
    that spills least. A configuration that could not launch is never compiled."""
    if shared_bytes is None:
        shared_bytes = SHARED_MEMORY_BYTES.get(arch, min(SHARED_MEMORY_BYTES.values()))
    return configs_that_fit(FUSED_MATMUL_RESOURCES[90 if arch >= 90 else 80][bool(nf4)], shared_bytes)


def configs_that_fit(resources: dict, shared_bytes: int) -> list[tuple[int, int, int, int]]:
    """Of `resources` ({config: (shared memory bytes, spill bytes)}), the configurations within
    `shared_bytes` that spill nothing, in FUSED_MATMUL_CONFIGS order; where every fitting one spills,
    the one that spills least."""
    fitting = [config for config in FUSED_MATMUL_CONFIGS if resources[config][0] <= shared_bytes]
    clean = [config for config in fitting if resources[config][1] == 0]
    return clean or sorted(fitting, key=lambda config: resources[config][1])[:1]


def fused_matmul_configs(arch: int, shared_bytes: int | None = None) -> tuple[list, object]:
    """(every autotune configuration that fits the target for a dense or an NF4 base, the prune
    function that keeps, for each launch, those that fit its base)."""
    import triton

    fits = {nf4: fused_matmul_fits(arch, nf4, shared_bytes) for nf4 in (False, True)}
    configs = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
               for bn, bk, w, s in FUSED_MATMUL_CONFIGS if any((bn, bk, w, s) in f for f in fits.values())]

    def prune(configs, named_args, **kwargs):
        kept = fits[bool(named_args.get("W_NF4", kwargs.get("W_NF4", False)))]
        return [c for c in configs if (c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages) in kept]

    return configs, prune


def _fused_matmul_kernel():
    """The fused matmul kernel: plain under the interpreter, autotuned on a GPU over the
    configurations that fit it."""
    from abs_fast.kernels import lora as k

    if triton_interpreting():
        return k.lora_fused_matmul_kernel
    if "fused" not in _autotuned:
        import triton

        device = torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(device)
        shared = torch.cuda.get_device_properties(device).shared_memory_per_block_optin
        configs, prune = fused_matmul_configs(10 * major + minor, shared)
        _autotuned["fused"] = triton.autotune(configs, key=FUSED_MATMUL_KEY,
                                              prune_configs_by={"early_config_prune": prune})(
            k.lora_fused_matmul_kernel)
    return _autotuned["fused"]


def _shrink(x2d, p, p_strides, scaling, plan: SegmentPlan, R: int, cfg: KernelConfig, precision: str):
    """L[t, :R] = scaling[a] * x2d[t] @ P[a]^T (fp32), zero for base-only rows."""
    from abs_fast.kernels import lora as k

    T, K = x2d.shape
    split_k = max(1, min(cfg.shrink_split_k, _cdiv(K, cfg.block_k)))
    # one partial per split, summed here in a fixed order (no atomics: runs repeat bit for bit); rows
    # of base-only tokens are never written, hence zeros
    partial = torch.zeros(split_k, T, R, device=x2d.device, dtype=torch.float32)
    k.lora_shrink_kernel[(plan.num_tiles, split_k)](
        x2d, p, scaling, partial,
        plan.sorted_idx, plan.tile_adapter, plan.tile_start, plan.tile_end,
        K, R, split_k,
        x2d.stride(0), x2d.stride(1),
        *p_strides,
        partial.stride(0), partial.stride(1), partial.stride(2),
        BLOCK_M=plan.block_m, BLOCK_R=max(16, _next_pow2(R)), BLOCK_K=cfg.block_k, LORA_PRECISION=precision,
        num_warps=cfg.num_warps,
    )
    return partial[0] if split_k == 1 else partial.sum(0)


@dataclass(frozen=True)
class _NF4Operand:
    """An NF4 base weight as the fused matmul reads it: packed codes, the code table, fp32 block scales."""

    packed: torch.Tensor
    code: torch.Tensor
    scale: torch.Tensor
    blocksize_log2: int
    index_i64: bool


def _nf4_operand(weight: NF4Weight) -> _NF4Operand:
    # block scales are decoded from the nested statistics once per call (numel / blocksize floats)
    return _NF4Operand(weight.packed, code_table(weight.device), weight.block_absmax(),
                       weight.blocksize.bit_length() - 1, weight.numel >= 2**31)


_scratch: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _dequantize_to_scratch(weight: NF4Weight, dtype: torch.dtype) -> torch.Tensor:
    """The dense weight in one scratch buffer per (device, dtype), reused by every layer and pass.

    Valid until the next call: the caller consumes it at once, on the same stream.
    """
    key = (weight.device, dtype)
    buffer = _scratch.get(key)
    if buffer is None or buffer.numel() < weight.numel:
        _scratch.pop(key, None)
        buffer = torch.empty(weight.numel, device=weight.device, dtype=dtype)
        _scratch[key] = buffer
    return nf4_dequantize(weight, dtype, out=buffer[: weight.numel], backend="triton")


def _base_operand(weight, dtype: torch.dtype, transpose: bool, tokens: int):
    """(operand, strides) for the fused matmul to read Wmat = W ([N, K]) or W^T ([K, N])."""
    if isinstance(weight, NF4Weight):
        K = weight.shape[1]
        if nf4_path(tokens) == "fused":
            return _nf4_operand(weight), ((1, K) if transpose else (K, 1))
        weight = _dequantize_to_scratch(weight, dtype)
    strides = (weight.stride(0), weight.stride(1))
    return weight, (strides[::-1] if transpose else strides)


def _fused_matmul(x2d, w, w_strides, N, bias, lora_l, q, q_strides, R, plan, cfg, precision):
    """out[t] = x2d[t] @ Wmat^T (+ bias) + lora_l[t] @ Q[a]^T; Wmat[n, k] read through w_strides
    (element strides; `w` is a dense tensor or an _NF4Operand)."""
    T, K = x2d.shape
    out = torch.empty(T, N, device=x2d.device, dtype=x2d.dtype)
    has_lora = lora_l is not None and R > 0
    nf4 = isinstance(w, _NF4Operand)
    kernel = _fused_matmul_kernel()
    common = dict(BLOCK_M=plan.block_m, BLOCK_R=max(16, _next_pow2(R)), GROUP_M=cfg.group_m,
                  HAS_BIAS=bias is not None, HAS_LORA=has_lora, LORA_PRECISION=precision,
                  BASE_IEEE=x2d.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32,
                  W_NF4=nf4, W_BLOCKSIZE_LOG2=w.blocksize_log2 if nf4 else 6,
                  W_INDEX_I64=w.index_i64 if nf4 else False)
    args = (
        x2d, w.packed if nf4 else w, w.code if nf4 else x2d, w.scale if nf4 else x2d,
        bias if bias is not None else x2d, lora_l if has_lora else x2d, q if has_lora else x2d, out,
        plan.sorted_idx, plan.tile_adapter, plan.tile_start, plan.tile_end,
        plan.num_tiles, N, K, R,
        x2d.stride(0), x2d.stride(1),
        *w_strides,
        lora_l.stride(0) if has_lora else 0, lora_l.stride(1) if has_lora else 0,
        *(q_strides if has_lora else (0, 0, 0)),
        out.stride(0), out.stride(1),
    )
    if triton_interpreting():
        grid = (plan.num_tiles * _cdiv(N, cfg.block_n),)
        kernel[grid](*args, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, **common,
                     num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    else:
        grid = lambda meta: (plan.num_tiles * _cdiv(N, meta["BLOCK_N"]),)
        kernel[grid](*args, **common)
    return out


def _segment_grad(lora_l, r_mat, plan: SegmentPlan, R: int, D: int, transpose_out: bool, cfg, precision):
    """G[a] = sum over a's tokens of lora_l[t, :R]^T r_mat[t, :D], as fp32 [n, R, D] ([n, D, R] if
    transpose_out)."""
    from abs_fast.kernels import lora as k

    n = plan.n_adapters
    splits = cfg.grad_splits
    shape = (splits, n, D, R) if transpose_out else (splits, n, R, D)
    partial = torch.empty(shape, device=r_mat.device, dtype=torch.float32)
    s_split, s_adapter = partial.stride(0), partial.stride(1)
    s_r, s_d = (partial.stride(3), partial.stride(2)) if transpose_out else (partial.stride(2), partial.stride(3))
    block_d = 64
    k.lora_segment_grad_kernel[(_cdiv(D, block_d), n, splits)](
        lora_l, r_mat, partial,
        plan.sorted_idx, plan.seg_start, plan.seg_count,
        D, R, splits,
        lora_l.stride(0), lora_l.stride(1),
        r_mat.stride(0), r_mat.stride(1),
        s_split, s_adapter, s_r, s_d,
        BLOCK_M=plan.block_m, BLOCK_R=max(16, _next_pow2(R)), BLOCK_D=block_d,
        LORA_PRECISION=precision,
        num_warps=cfg.num_warps,
    )
    return partial[0] if splits == 1 else partial.sum(0)


class LoRALinearFunction(torch.autograd.Function):
    """Triton forward and backward of `lora_linear` on 2-D inputs (dense or NF4 base)."""

    @staticmethod
    def forward(ctx, x2d, weight, lora_a, lora_b, routing: AdapterRouting, scaling, bias):
        T, K = x2d.shape
        N = weight.shape[0]
        n, R = lora_a.shape[0], lora_a.shape[1]
        cfg = kernel_config(T, N, K, n, x2d.device)
        plan = routing.plan(cfg.block_m)
        precision = _lora_precision(x2d.dtype)
        shrunk = None
        if T > 0 and n > 0 and R > 0:
            shrunk = _shrink(x2d, lora_a, (lora_a.stride(0), lora_a.stride(1), lora_a.stride(2)),
                             scaling, plan, R, cfg, precision)
        if T > 0:
            w, w_strides = _base_operand(weight, x2d.dtype, transpose=False, tokens=T)
            y = _fused_matmul(x2d, w, w_strides, N, bias,
                              shrunk, lora_b, (lora_b.stride(0), lora_b.stride(1), lora_b.stride(2)),
                              R, plan, cfg, precision)
        else:
            y = x2d.new_empty(0, N)
        # an NF4 base is kept as the object itself (its packed codes), never as a dense copy
        nf4 = isinstance(weight, NF4Weight)
        ctx.save_for_backward(x2d, None if nf4 else weight, lora_a, lora_b, scaling, shrunk)
        ctx.nf4_weight = weight if nf4 else None
        ctx.plan, ctx.cfg, ctx.precision = plan, cfg, precision
        return y

    @staticmethod
    def backward(ctx, dy):
        x2d, weight, lora_a, lora_b, scaling, shrunk = ctx.saved_tensors
        if ctx.nf4_weight is not None:
            weight = ctx.nf4_weight
        plan, cfg, precision = ctx.plan, ctx.cfg, ctx.precision
        need_x, _, need_a, need_b = ctx.needs_input_grad[:4]
        T, K = x2d.shape
        n, R = lora_a.shape[0], lora_a.shape[1]
        dx = da = db = None
        if dy.stride(-1) != 1:
            dy = dy.contiguous()
        has_lora = T > 0 and n > 0 and R > 0
        d_shrunk = None
        if has_lora and (need_x or need_a):
            # dS[t] = s[a] * dY[t] @ B[a]: the shrink kernel reading P[a][j, n] = B[a][n, j]
            d_shrunk = _shrink(dy, lora_b, (lora_b.stride(0), lora_b.stride(2), lora_b.stride(1)),
                               scaling, plan, R, cfg, precision)
        if need_x:
            if T == 0:
                dx = torch.zeros_like(x2d)
            else:
                # dX = dY @ W + dS @ A[a]: the fused matmul reading Wmat[k, n] = W[n, k], Q[a][k, j] = A[a][j, k]
                w, w_strides = _base_operand(weight, dy.dtype, transpose=True, tokens=T)
                dx = _fused_matmul(dy, w, w_strides, K, None,
                                   d_shrunk, lora_a, (lora_a.stride(0), lora_a.stride(2), lora_a.stride(1)),
                                   R, plan, cfg, precision)
        if need_a:
            da = (_segment_grad(d_shrunk, x2d, plan, R, K, False, cfg, precision).to(lora_a.dtype)
                  if has_lora else torch.zeros_like(lora_a))
        if need_b:
            db = (_segment_grad(shrunk, dy, plan, R, lora_b.shape[1], True, cfg, precision).to(lora_b.dtype)
                  if has_lora else torch.zeros_like(lora_b))
        return dx, None, da, db, None, None, None


def _nf4_decode_reason(x2d: torch.Tensor, weight: NF4Weight, lora_a: torch.Tensor, lora_b: torch.Tensor) -> str | None:
    """Why the Triton NF4 decode matmul cannot serve this call (None when it can)."""
    T, K = x2d.shape
    if T > NF4_DECODE_MAX_ROWS:
        return f"it serves at most {NF4_DECODE_MAX_ROWS} rows, got {T}"
    if torch.is_grad_enabled() and (x2d.requires_grad or lora_a.requires_grad or lora_b.requires_grad):
        return "it computes no gradients"
    if select_backend(x2d.device, x2d.dtype) != "triton" or x2d.dtype == torch.float64:
        return "Triton does not run on these tensors here"
    block_k = min(64, weight.blocksize)
    if K % block_k or weight.blocksize < 16:
        return f"it needs in_features % {block_k} == 0 and blocksize >= 16"
    return None


@functools.cache
def nf4_register_decode_for(dtype: torch.dtype) -> tuple[str, tuple[int, int, int, int]]:
    """The NF4 decode matmul's register decode (PTX and table words) for 16-bit activations; ("",
    zeros) for fp32, whose code values do not fit the 16-bit byte tables: it looks them up in memory."""
    if dtype not in (torch.bfloat16, torch.float16):
        return "", (0, 0, 0, 0)
    from abs_fast.kernels.nf4 import nf4_register_decode

    return nf4_register_decode((NF4_CODE.to(dtype).view(torch.int16).to(torch.int32) & 0xFFFF).tolist())


def nf4_decode_tiles(rows: int, arch: int = 90, interpreting: bool = False) -> tuple[int, int, int, int]:
    """(BLOCK_T, BLOCK_N, num_warps, num_stages) of the NF4 decode matmul for `rows` batch rows on
    sm_`arch`.

    The batch rows are the MMA's N side (granularity 8), up to 64 a tile; 128 weight rows a tile
    over 4 warps give each thread 64 weight elements a K step, which keeps the K loop's fixed
    instructions small beside the decode (the compiled loop's count is in bench/RESULTS.md and held
    by tests/test_kernels_compile.py). Before Hopper a 64-row tile over 4 warps spills its fp32
    accumulator (sm_80: 56 B), so it takes 8. Unmeasured on a GPU."""
    block_t = min(64, max(8, _next_pow2(rows)))
    if interpreting:
        return block_t, 32, 4, 1
    return block_t, 128, 8 if block_t >= 64 and arch < 90 else 4, 3


def _nf4_decode(x2d, weight: NF4Weight, lora_a, lora_b, routing: AdapterRouting, scaling, bias) -> torch.Tensor:
    """Few rows times an NF4 base in one split-K pass that reads W once (kernels/nf4.py), the LoRA
    expand and bias added by split 0; the shrink runs first (the Triton shrink kernel)."""
    T, K = x2d.shape
    N = weight.shape[0]
    n, R = lora_a.shape[0], lora_a.shape[1]
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    has_lora = T > 0 and n > 0 and R > 0
    shrunk = None
    if has_lora:
        cfg = kernel_config(T, N, K, n, x2d.device)
        shrunk = _shrink(x2d, lora_a, (lora_a.stride(0), lora_a.stride(1), lora_a.stride(2)), scaling,
                         routing.plan(cfg.block_m), R, cfg, _lora_precision(x2d.dtype))
    return nf4_decode_matmul(x2d, weight, shrunk, routing.ids, lora_b if has_lora else None, bias,
                             _register_decode(x2d.device, x2d.dtype))


NO_REGISTER_DECODE = ("", (0, 0, 0, 0))
_REGISTER_DECODE_MATCHES: dict[tuple[int, torch.dtype], bool] = {}


def _register_decode(device: torch.device, dtype: torch.dtype) -> tuple[str, tuple[int, int, int, int]]:
    """The decode matmul's register decode for these activations, once it has matched the table
    decode on a small problem on this device (checked on the first call outside a CUDA graph
    capture; the engine's warm-up steps run before it captures). A mismatch, which no CPU test can
    rule out since only a GPU runs the PTX, costs one warning and the table decode from then on."""
    if device.type != "cuda" or triton_interpreting():
        return NO_REGISTER_DECODE
    decode = nf4_register_decode_for(dtype)
    if not decode[0]:
        return decode
    key = (device.index if device.index is not None else torch.cuda.current_device(), dtype)
    if key not in _REGISTER_DECODE_MATCHES:
        if torch.cuda.is_current_stream_capturing():
            return NO_REGISTER_DECODE
        _REGISTER_DECODE_MATCHES[key] = register_decode_matches(
            lambda chosen: _register_decode_probe(device, dtype, chosen), decode, f"{device} {dtype}")
    return decode if _REGISTER_DECODE_MATCHES[key] else NO_REGISTER_DECODE


def register_decode_matches(run, decode, where: str) -> bool:
    """Whether run(decode) (the register decode) gives what run(table decode) gives, to 2^-7; one
    warning when it does not."""
    with torch.no_grad():
        got, want = run(decode).float(), run(NO_REGISTER_DECODE).float()
    if torch.allclose(got, want, rtol=2.0**-7, atol=1e-3):
        return True
    logger.warning("the NF4 register decode disagrees with the table decode on %s (max difference %.3g); "
                   "the decode matmul looks codes up in memory from now on", where, (got - want).abs().max().item())
    return False


def _register_decode_probe(device: torch.device, dtype: torch.dtype, decode) -> torch.Tensor:
    gen = torch.Generator(device="cpu").manual_seed(0)
    weight = NF4Weight.quantize(torch.randn(136, 512, generator=gen).to(device)).with_scales()
    x = torch.randn(5, 512, generator=gen).to(device=device, dtype=dtype)
    return nf4_decode_matmul(x, weight, None, torch.full((5,), -1, dtype=torch.int32, device=device), None, None,
                             decode)


def nf4_decode_matmul(x2d, weight: NF4Weight, shrunk, ids, lora_b, bias, decode) -> torch.Tensor:
    """The decode matmul kernel's launch: tiles, split-K, and `decode` (nf4_register_decode_for's
    PTX and table words, or NO_REGISTER_DECODE for the table in memory). No LoRA when lora_b is None."""
    from abs_fast.kernels import nf4 as k

    T, K = x2d.shape
    N = weight.shape[0]
    has_lora = lora_b is not None
    R = shrunk.shape[1] if has_lora else 0
    block_k = min(64, weight.blocksize)
    if triton_interpreting():
        block_t, block_n, warps, stages = nf4_decode_tiles(T, interpreting=True)
        split_k = 2 if 4 * block_k <= K else 1
    else:
        device_index = x2d.device.index if x2d.device.index is not None else torch.cuda.current_device()
        block_t, block_n, warps, stages = nf4_decode_tiles(T, _arch(device_index))
        tiles = _cdiv(T, block_t) * _cdiv(N, block_n)
        sms = _sm_count(device_index)
        split_k = max(1, min(_cdiv(2 * sms, tiles), K // (4 * block_k)))
    k_per_split = _cdiv(_cdiv(K, split_k), block_k) * block_k
    split_k = _cdiv(K, k_per_split)
    out = torch.empty(split_k, T, N, device=x2d.device, dtype=x2d.dtype if split_k == 1 else torch.float32)
    grid = (_cdiv(T, block_t) * _cdiv(N, block_n), split_k)
    decode_asm, decode_words = decode
    k.nf4_decode_matmul_kernel[grid](
        x2d, weight.packed, weight.block_absmax(), code_table(x2d.device, x2d.dtype),
        bias if bias is not None else x2d, shrunk if has_lora else x2d, ids,
        lora_b if has_lora else x2d, out,
        T, N, K, R, lora_b.shape[0] if has_lora else 0, k_per_split,
        *decode_words,
        K // 2, x2d.stride(0), x2d.stride(1),
        shrunk.stride(0) if has_lora else 0, shrunk.stride(1) if has_lora else 0,
        *((lora_b.stride(0), lora_b.stride(1), lora_b.stride(2)) if has_lora else (0, 0, 0)),
        out.stride(0), out.stride(1), out.stride(2),
        HAS_BIAS=bias is not None, HAS_LORA=has_lora,
        BLOCK_T=block_t, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=max(16, _next_pow2(R)),
        BLOCKSIZE_LOG2=weight.blocksize.bit_length() - 1, LORA_PRECISION=_lora_precision(x2d.dtype),
        BASE_IEEE=x2d.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32,
        DECODE_ASM=decode_asm,
        num_warps=warps, num_stages=stages,
    )
    return out[0] if split_k == 1 else out.sum(0).to(x2d.dtype)


def nf4_call_path(x2d: torch.Tensor, weight: NF4Weight, lora_a: torch.Tensor, lora_b: torch.Tensor,
                  backend: str | None = None) -> str:
    """Which implementation serves lora_linear with an NF4 base for this call: "native" (the native
    library: decode batches of at most 16 rows, no gradient), "triton-decode" (the split-K decode
    matmul: up to NF4_DECODE_MAX_ROWS rows, no gradient), or "general" (the Triton GEMM with NF4
    decoded in its K loop or a dequantised buffer, or the PyTorch reference). Decided here, once,
    for the dispatch and for whoever reports it (benchmarks, `abs-fast info`).

    On CUDA the Triton decode matmul serves every row count it can and the native kernel the rest
    (ABS_FAST_NF4_DECODE=native|triton forces one). Read from the sm_90 machine code, not measured
    (bench/RESULTS.md): with bf16 activations the Triton K loop, decoding in registers, issues
    4.9-5.4 instructions per weight element at 1-32 rows and 6.3 at 64; the native kernel's scalar
    fp32 products issue 8 at one row, 10 at two and 37 at 16. On the CPU the native library is the
    decode path."""
    decode, auto = nf4_decode_choice(), backend == "native" or requested_backend(backend) == "auto"
    if not auto:
        return "general"
    triton_ok = backend != "native" and decode in ("auto", "triton") and \
        _nf4_decode_reason(x2d, weight, lora_a, lora_b) is None
    if triton_ok and x2d.device.type == "cuda":
        return "triton-decode"
    if (backend == "native" or decode in ("auto", "native")) and \
            native_unsupported_reason(x2d, weight, lora_a, lora_b) is None:
        return "native"
    return "triton-decode" if triton_ok else "general"


def _routing(adapter_ids, n_adapters: int, device: torch.device) -> AdapterRouting:
    """The caller's AdapterRouting, or one built (and range-checked, one sync) from an id tensor."""
    if isinstance(adapter_ids, AdapterRouting):
        return adapter_ids
    if not isinstance(adapter_ids, torch.Tensor):
        raise TypeError(f"adapter_ids must be an integer tensor or an AdapterRouting, got {type(adapter_ids).__name__}")
    return AdapterRouting.from_ids(adapter_ids, n_adapters, device=device)


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    adapter_ids: torch.Tensor | AdapterRouting,
    scaling: torch.Tensor | Sequence[float],
    bias: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Frozen base linear plus one LoRA adapter per token, all adapters in one pass.

    x [..., K]; weight [N, K] (frozen; a dense tensor or an NF4Weight); lora_a [n_adapters, r, K];
    lora_b [n_adapters, N, r]; adapter_ids: [...] int, one per token (-1 = base only), or an
    AdapterRouting built once for the batch (a model passes one to every layer: no id check and no
    host sync per call); scaling [n_adapters] (alpha / r).
    Returns [..., N] in x's dtype. `backend` ("auto", "triton", "reference", "native") overrides the
    automatic choice: an NF4 base with no gradient to compute and few tokens (decode) runs the NF4
    decode product (`ops/nf4.py`, `nf4_decode_choice`); otherwise Triton on a GPU or under
    TRITON_INTERPRET=1, else the PyTorch reference. "native" insists on the native library and says
    why when it cannot run.
    """
    routing = _routing(adapter_ids, lora_a.shape[0] if lora_a.dim() == 3 else 0, x.device)
    if isinstance(weight, NF4Weight) and backend in (None, "auto", "native"):
        T, N, K, n, _ = _check_inputs(x, weight, lora_a, lora_b, routing, bias)
        x2d = x.reshape(T, K)
        path = nf4_call_path(x2d, weight, lora_a, lora_b, backend)
        if path == "native":
            try:
                y = nf4_lora_native(x2d, weight, lora_a, lora_b, routing.ids, _as_scaling(scaling, n, x.device), bias)
                return y.reshape(*x.shape[:-1], N)
            except NativeError as err:
                if backend == "native":
                    raise
                native_failed(x2d.device.type, err)  # one warning; this call and later ones take Triton
                path = nf4_call_path(x2d, weight, lora_a, lora_b, backend)
        if backend == "native":
            raise RuntimeError(f"backend='native' cannot run this call: "
                               f"{native_unsupported_reason(x2d, weight, lora_a, lora_b)}")
        if path == "triton-decode":
            y = _nf4_decode(x2d, weight, lora_a, lora_b, routing, _as_scaling(scaling, n, x.device), bias)
            return y.reshape(*x.shape[:-1], N)
    elif backend == "native":
        raise RuntimeError("backend='native' serves NF4 weights only (see abs_fast.quant.NF4Weight)")
    chosen = select_backend(x.device, x.dtype, backend)
    if chosen == "reference":
        return lora_linear_reference(x, weight, lora_a, lora_b, routing, scaling, bias)
    T, N, K, n, _ = _check_inputs(x, weight, lora_a, lora_b, routing, bias)
    scaling = _as_scaling(scaling, n, x.device)
    x2d = x.reshape(T, K)
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    y = LoRALinearFunction.apply(x2d, weight, lora_a, lora_b, routing, scaling, bias)
    return y.reshape(*x.shape[:-1], N)
