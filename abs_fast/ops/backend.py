"""Which implementation of each op runs where, decided in one place.

Backends: "triton" (compiled on a GPU, or under TRITON_INTERPRET=1 on CPU tensors), "native" (the
csrc library, when built) and "reference" (plain PyTorch, always available). `ABS_FAST_BACKEND`
(auto | triton | reference) or an explicit `backend=` argument overrides the automatic choice.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import warnings

import torch

BACKENDS = ("auto", "triton", "reference")


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreting() -> bool:
    """True when Triton kernels run in its CPU interpreter (the variable is read at triton import)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreter_handles_bf16() -> bool:
    """The stock interpreter computes bf16 dot products on the raw bits (garbage); the test harness
    patches it and marks the patch. Without the patch, bf16 inputs use the reference backend."""
    if not triton_interpreting() or not triton_available():
        return False
    from triton.runtime import interpreter

    return bool(getattr(interpreter.InterpreterBuilder, "abs_fast_bf16_patch", False))


def requested_backend(backend: str | None) -> str:
    name = backend if backend is not None else os.environ.get("ABS_FAST_BACKEND", "auto")
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r} "
                         f"({'argument' if backend is not None else 'ABS_FAST_BACKEND'})")
    return name


def triton_runs_on(device: torch.device) -> bool:
    """Can a Triton kernel run on tensors of this device right now?"""
    if not triton_available():
        return False
    if triton_interpreting():
        return device.type in ("cpu", "cuda")
    return device.type == "cuda"


_warned: set[str] = set()


def select_backend(device: torch.device, dtype: torch.dtype, backend: str | None = None) -> str:
    """The backend for an op on tensors of `device` and `dtype` ("triton" or "reference")."""
    name = requested_backend(backend)
    if name == "reference":
        return "reference"
    if not triton_runs_on(device):
        if name == "triton":
            raise RuntimeError(
                f"backend='triton' cannot run on {device.type} tensors here: "
                + ("triton is not installed" if not triton_available()
                   else "Triton needs a CUDA device, or TRITON_INTERPRET=1 set before triton is "
                        "imported to run its CPU interpreter")
            )
        return "reference"
    if device.type == "cpu" and dtype == torch.bfloat16 and not interpreter_handles_bf16():
        message = ("the Triton interpreter computes bf16 dot products incorrectly; "
                   "bf16 inputs on CPU use the PyTorch reference")
        if name == "triton":
            raise RuntimeError(message + " (the test harness patches the interpreter; see tests/)")
        if message not in _warned:
            _warned.add(message)
            warnings.warn(message, stacklevel=3)
        return "reference"
    return "triton"


@functools.cache
def matmul_fp32_out(device_type: str) -> bool:
    """Can this torch multiply 16-bit matrices into an fp32 result on `device_type` (mm / addmm
    out_dtype, CUDA in torch >= 2.8): fp32 accumulation without rounding the product to 16 bits."""
    try:
        a = torch.ones(1, 1, dtype=torch.bfloat16, device=device_type)
        return torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
    except (TypeError, RuntimeError, NotImplementedError):
        return False


def describe_backends() -> dict[str, str]:
    """Human-readable: which backend `lora_linear` uses for CPU and CUDA tensors in this process."""
    forced = os.environ.get("ABS_FAST_BACKEND")
    out = {}
    for device in ("cpu", "cuda"):
        if device == "cuda" and not torch.cuda.is_available():
            out[device] = "no CUDA device"
            continue
        try:
            chosen = select_backend(torch.device(device), torch.float32)
        except (RuntimeError, ValueError) as err:
            out[device] = f"error: {err}"
            continue
        if chosen == "triton":
            label = "Triton interpreter (TRITON_INTERPRET=1)" if triton_interpreting() else "Triton (compiled)"
        else:
            label = "PyTorch reference"
        if forced:
            label += f" [ABS_FAST_BACKEND={forced}]"
        out[device] = label
    return out
