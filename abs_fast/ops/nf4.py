"""NF4 dequantisation and the NF4 base product: Triton kernels with a PyTorch reference.

`nf4_dequantize` expands an `NF4Weight` to a dense tensor (the PyTorch reference of lora_linear
dequantises in forward and again in backward, so autograd never holds a dense copy of W).
"""

from __future__ import annotations

import logging
import os

import torch

from abs_fast.ops.backend import select_backend
from abs_fast.quant.nf4 import NF4Weight, code_table

logger = logging.getLogger(__name__)

__all__ = ["NF4_BUFFER_MIN_TOKENS", "NF4_DECODE_MAX_ROWS", "NF4_PATHS", "nf4_decode_choice", "nf4_dequantize",
           "nf4_path"]

# How lora_linear's Triton backend multiplies tokens that need gradients (training) or are many
# (prefill) by an NF4 base:
#   fused   decode each weight tile inside the GEMM's K-loop (no dense W anywhere); every M tile
#           decodes W again, so its decode work grows with the tokens
#   buffer  dequantise the whole weight once into one scratch buffer reused by every layer (read
#           0.5 B and write 2 B per weight), then the dense fused GEMM at full tensor-core speed
# The rule ("auto"): buffer from NF4_BUFFER_MIN_TOKENS tokens up, fused below. The threshold is an
# estimate, unmeasured on a GPU: at 7B shapes on an H100 the buffer's extra pass costs about as much
# as ~128-256 tokens of GEMM, while the fused kernel runs at an estimated ~26% of bf16 peak
# (bench/RESULTS.md); scripts/gpu-check.sh measures both paths per shape to settle it.
NF4_PATHS = ("auto", "fused", "buffer")
NF4_BUFFER_MIN_TOKENS = 256

# Few tokens and no gradient (decode): on CUDA the Triton split-K decode matmul (kernels/nf4.py)
# for up to NF4_DECODE_MAX_ROWS rows, the native CUDA product for what it cannot serve; on the CPU
# the native product for up to 16 rows (ops/lora.py nf4_call_path). ABS_FAST_NF4_DECODE:
# auto | native (native only) | triton (Triton only) | off (neither).
NF4_DECODE_CHOICES = ("auto", "native", "triton", "off")
NF4_DECODE_MAX_ROWS = 256


def nf4_path(tokens: int) -> str:
    """"fused" or "buffer" for a product of `tokens` rows (ABS_FAST_NF4_PATH overrides the rule)."""
    name = os.environ.get("ABS_FAST_NF4_PATH", "auto")
    if name not in NF4_PATHS:
        raise ValueError(f"ABS_FAST_NF4_PATH must be one of {NF4_PATHS}, got {name!r}")
    if name == "auto":
        return "buffer" if tokens >= NF4_BUFFER_MIN_TOKENS else "fused"
    return name


def nf4_decode_choice() -> str:
    name = os.environ.get("ABS_FAST_NF4_DECODE", "auto")
    if name not in NF4_DECODE_CHOICES:
        raise ValueError(f"ABS_FAST_NF4_DECODE must be one of {NF4_DECODE_CHOICES}, got {name!r}")
    return name




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
    dense = weight.dequantize(dtype)
    if out is None:
        return dense
    out.view(-1).copy_(dense.view(-1))
    return out.view(weight.shape)


# ---------------------------------------------------------------------------------------------
# The native library (csrc/): decode-time NF4 product with the LoRA epilogue, no autograd
# ---------------------------------------------------------------------------------------------

_ACT_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


# Devices ("cpu", "cuda") whose native library failed at run time (a NativeError: e.g. its static CUDA
# runtime on an older driver) -> why. The process's later calls there go to Triton (or PyTorch).
_NATIVE_FAILED: dict[str, str] = {}


def native_failed(device_type: str, err: Exception) -> None:
    """Record that the native library failed on `device_type` and say so once: every later call
    takes the next implementation instead of failing again."""
    if device_type not in _NATIVE_FAILED:
        _NATIVE_FAILED[device_type] = str(err)
        logger.warning("the native NF4 library failed on %s (%s); Triton serves its calls from now on",
                       device_type, str(err).splitlines()[0])


def native_unsupported_reason(x2d: torch.Tensor, weight: NF4Weight, lora_a: torch.Tensor,
                              lora_b: torch.Tensor) -> str | None:
    """Why the native op cannot serve this call (None when it can). It serves inference only:
    at most 16 rows, nothing that needs a gradient."""
    from abs_fast import native

    if x2d.device.type in _NATIVE_FAILED:
        return f"the native library failed on {x2d.device.type} earlier ({_NATIVE_FAILED[x2d.device.type]})"

    if x2d.shape[0] > native.MAX_ROWS:
        return f"it serves at most {native.MAX_ROWS} rows (decode batches), got {x2d.shape[0]}"
    if torch.is_grad_enabled() and (x2d.requires_grad or lora_a.requires_grad or lora_b.requires_grad):
        return "it computes no gradients (inference only); run under torch.no_grad() or use the Triton backend"
    if x2d.dtype not in _ACT_DTYPES:
        return f"it takes fp32/bf16/fp16 inputs, got {x2d.dtype}"
    if lora_a.shape[1] > 1024:
        return f"rank {lora_a.shape[1]} is above 1024"
    if x2d.device.type == "cpu":
        if native.cpu_library() is None:
            return "the native CPU library is not built (" + str(native.native_report()["cpu"]) + ")"
        return None
    if x2d.device.type == "cuda":
        if native.cuda_library() is None:
            return "the native CUDA library is not built (nvcc was not found when abs-fast was installed)"
        if weight.shape[1] % 32 or weight.blocksize < 32:
            return "the CUDA kernel needs in_features % 32 == 0 and blocksize >= 32"
        return None
    return f"no native kernel for {x2d.device.type} tensors"


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def nf4_lora_native(x2d: torch.Tensor, weight: NF4Weight, lora_a: torch.Tensor, lora_b: torch.Tensor,
                    adapter_ids: torch.Tensor, scaling: torch.Tensor, bias: torch.Tensor | None = None, *,
                    isa: str = "auto", num_threads: int | None = None) -> torch.Tensor:
    """x2d [T<=16, K] @ W^T (+ bias) + per-row LoRA term, by the native library (no autograd).

    `isa` (CPU only: auto | avx512 | avx2 | scalar) forces one instruction-set variant;
    `num_threads` defaults to torch.get_num_threads().
    """
    from abs_fast import native

    reason = native_unsupported_reason(x2d, weight, lora_a, lora_b)
    if reason is not None:
        raise RuntimeError(f"the native NF4 op cannot run this call: {reason}")
    if isa not in native.ISA_NAMES:
        raise ValueError(f"isa must be one of {tuple(native.ISA_NAMES)}, got {isa!r}")
    T, K = x2d.shape
    N = weight.shape[0]
    n, R = lora_a.shape[0], lora_a.shape[1]
    on_cpu = x2d.device.type == "cpu"
    act = torch.float32 if on_cpu else x2d.dtype
    x = x2d.to(act).contiguous()
    ids = adapter_ids.reshape(T).to(torch.int32).contiguous()
    a32 = lora_a.detach().to(torch.float32).contiguous()
    b32 = lora_b.detach().to(torch.float32).contiguous()
    scale32 = scaling.to(torch.float32).contiguous()
    bias_c = None if bias is None else bias.detach().to(act).contiguous()
    packed = weight.packed.contiguous()
    dq = weight.double_quant
    stats = (None if dq else weight.absmax.contiguous(), weight.absmax.contiguous() if dq else None,
             weight.nested_absmax if dq else None, weight.nested_code if dq else None,
             weight.nested_offset.reshape(1) if dq else None)
    out = torch.empty(T, N, device=x2d.device, dtype=act)
    common = (T, K, _ptr(packed), N, weight.blocksize, *map(_ptr, stats), _ptr(bias_c),
              _ptr(a32), _ptr(b32), _ptr(scale32), n, R, _ptr(ids))
    if on_cpu:
        lib = native.cpu_library()
        threads = num_threads or torch.get_num_threads()
        rc = lib.abs_fast_nf4_lora_cpu(_ptr(x), *common, _ptr(out), native.ISA_NAMES[isa], threads)
        detail = ""
    else:
        if isa != "auto":
            raise ValueError("isa selects a CPU variant; it does not apply to CUDA tensors")
        if x.data_ptr() % 16 or packed.data_ptr() % 16:
            x, packed = x.clone(), packed.clone()  # the kernel's 16-byte loads need aligned starts
            common = (T, K, _ptr(packed), *common[3:])
        lib = native.cuda_library()
        shrunk = torch.empty(max(T * R, 1), device=x2d.device, dtype=torch.float32)
        stream = torch.cuda.current_stream(x2d.device).cuda_stream
        rc = lib.abs_fast_nf4_lora_cuda(_ptr(x), _ACT_DTYPES[act], *common, _ptr(shrunk), _ptr(out), stream)
        detail = lib.abs_fast_cuda_last_error().decode() if rc == -3 else ""
    if rc != 0:
        raise native.NativeError(f"native NF4 op failed ({rc}): {native.ERRORS.get(rc, 'unknown error')} {detail}")
    return out.to(x2d.dtype)
