"""Find and load the optional native libraries built from csrc/ (C ABI, loaded with ctypes).

    libabs_fast_native.so  CPU NF4 product with the LoRA epilogue (AVX2 / AVX-512 / scalar, OpenMP)
    libabs_fast_cuda.so    the same op for CUDA decode batches, when nvcc was present at install

Both are optional: `cpu_library()` / `cuda_library()` return None when absent, and callers fall back
to Triton or PyTorch. ABS_FAST_NATIVE_DIR points at another directory holding them (a build tree).
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from pathlib import Path

__all__ = ["ISA_NAMES", "NativeError", "cpu_library", "cuda_library", "library_dirs", "native_report"]

ABI_VERSION = 2
MAX_ROWS = 16
ISA_NAMES = {"auto": 0, "scalar": 1, "avx2": 2, "avx512": 3}
ERRORS = {-1: "invalid size or pointer argument", -2: "instruction set not supported by this CPU",
          -3: "CUDA launch failed", -4: "the CUDA kernel needs in_features % 32 == 0 and blocksize >= 32"}

_c_int64, _c_int, _ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
_COMMON_ARGS = [_ptr, _c_int64, _c_int64,  # x, rows, in_features (CUDA inserts act_dtype after x)
                _ptr, _c_int64, _c_int64,  # packed, out_features, blocksize
                _ptr, _ptr, _ptr, _ptr, _ptr,  # absmax, absmax_q, nested_absmax, nested_code, nested_offset
                _ptr,  # bias
                _ptr, _ptr, _ptr, _c_int64, _c_int64,  # lora_a, lora_b, scaling, n_adapters, rank
                _ptr]  # adapter_ids


class NativeError(RuntimeError):
    """A native kernel refused its arguments or failed to launch."""


def library_dirs() -> list[Path]:
    """Where the libraries are looked for, in order."""
    dirs = []
    if os.environ.get("ABS_FAST_NATIVE_DIR"):
        dirs.append(Path(os.environ["ABS_FAST_NATIVE_DIR"]))
    dirs.append(Path(__file__).resolve().parent / "_native")
    # editable installs keep compiled files in site-packages while the Python sources stay in the checkout
    for entry in sys.path:
        candidate = Path(entry or ".") / "abs_fast" / "_native"
        if candidate not in dirs:
            dirs.append(candidate)
    return dirs


def _find(filename: str) -> Path | None:
    for directory in library_dirs():
        path = directory / filename
        if path.is_file():
            return path
    return None


def _load(filename: str, abi_symbol: str) -> ctypes.CDLL | None:
    path = _find(filename)
    if path is None:
        return None
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as err:
        raise NativeError(f"{path} exists but cannot be loaded: {err}") from err
    abi = getattr(lib, abi_symbol)
    abi.restype = ctypes.c_int
    if abi() != ABI_VERSION:
        raise NativeError(f"{path} has ABI version {abi()}, this abs-fast expects {ABI_VERSION}: reinstall abs-fast")
    lib.abs_fast_path = str(path)
    return lib


@functools.cache
def cpu_library() -> ctypes.CDLL | None:
    """The CPU library, or None when it was not built."""
    lib = _load("libabs_fast_native.so", "abs_fast_abi_version")
    if lib is None:
        return None
    lib.abs_fast_nf4_lora_cpu.argtypes = [*_COMMON_ARGS, _ptr, _c_int, _c_int]  # out, isa, num_threads
    lib.abs_fast_nf4_lora_cpu.restype = ctypes.c_int
    for name in ("abs_fast_cpu_best_isa", "abs_fast_cpu_max_threads"):
        getattr(lib, name).restype = ctypes.c_int
    lib.abs_fast_cpu_isa_supported.argtypes = [_c_int]
    lib.abs_fast_cpu_isa_supported.restype = ctypes.c_int
    lib.abs_fast_cpu_threads_for.argtypes = [ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, _c_int]
    lib.abs_fast_cpu_threads_for.restype = ctypes.c_int
    lib.abs_fast_cpu_parallel_regions.restype = ctypes.c_longlong
    return lib


@functools.cache
def cuda_library() -> ctypes.CDLL | None:
    """The CUDA library, or None when it was not built (no nvcc at install time)."""
    lib = _load("libabs_fast_cuda.so", "abs_fast_cuda_abi_version")
    if lib is None:
        return None
    args = list(_COMMON_ARGS)
    args.insert(1, _c_int)  # act_dtype
    lib.abs_fast_nf4_lora_cuda.argtypes = [*args, _ptr, _ptr, _ptr]  # shrunk workspace, out, stream
    lib.abs_fast_nf4_lora_cuda.restype = ctypes.c_int
    lib.abs_fast_cuda_last_error.restype = ctypes.c_char_p
    return lib


def isa_name(code: int) -> str:
    return {v: k for k, v in ISA_NAMES.items()}[code]


def native_report() -> dict:
    """What was built and what it will use here, for `abs-fast info`."""
    report: dict = {}
    try:
        cpu = cpu_library()
    except NativeError as err:
        cpu, report["cpu"] = None, f"error: {err}"
    if cpu is not None:
        supported = [name for name, code in ISA_NAMES.items() if code and cpu.abs_fast_cpu_isa_supported(code)]
        report["cpu"] = {"path": cpu.abs_fast_path, "isa": isa_name(cpu.abs_fast_cpu_best_isa()),
                         "isa_supported": supported, "max_threads": cpu.abs_fast_cpu_max_threads()}
    elif "cpu" not in report:
        report["cpu"] = "not built (no C++ compiler at install, or not installed from source)"
    try:
        cuda = cuda_library()
    except NativeError as err:
        cuda, report["cuda"] = None, f"error: {err}"
    if cuda is not None:
        report["cuda"] = {"path": cuda.abs_fast_path}
    elif "cuda" not in report:
        report["cuda"] = "not built (nvcc was not found at install)"
    return report
