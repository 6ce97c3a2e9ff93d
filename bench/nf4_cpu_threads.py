"""The native CPU NF4 decode call at a small model's shapes, by thread count: what a call costs when
a second thread must be woken (and, on a loaded machine, waited for).

    python bench/nf4_cpu_threads.py [--lib OTHER.so] [--rounds 200]

--lib times another build of libabs_fast_native.so with the same call signature (e.g. an earlier
commit's, to compare). Start a second process that loads a core (python -c "while True: pass") to
measure under load. Prints the median microseconds per call for each shape and thread count.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import time

import torch

from abs_fast import native
from abs_fast.ops.nf4 import nf4_lora_native
from abs_fast.quant import NF4Weight

SHAPES = [(4, 576, 576), (4, 576, 1536), (4, 1536, 576), (16, 576, 1536), (1, 3584, 18944)]


def _use_library(path: str) -> None:
    lib = ctypes.CDLL(path)
    lib.abs_fast_nf4_lora_cpu.argtypes = [*native._COMMON_ARGS, native._ptr, native._c_int, native._c_int]
    lib.abs_fast_nf4_lora_cpu.restype = ctypes.c_int
    native.cpu_library = lambda: lib


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lib", help="time this build of the CPU library instead of the installed one")
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    if args.lib:
        _use_library(args.lib)
    gen = torch.Generator().manual_seed(0)
    print(f"library: {args.lib or native.cpu_library().abs_fast_path}")
    for rows, k, n in SHAPES:
        weight = NF4Weight.quantize(torch.randn(n, k, generator=gen) * k**-0.5, 64, True)
        x = torch.randn(rows, k, generator=gen)
        a, b = torch.randn(2, 16, k, generator=gen) * 0.01, torch.randn(2, n, 16, generator=gen) * 0.01
        ids, scaling = torch.zeros(rows, dtype=torch.int32), torch.ones(2)
        cells = []
        for threads in (1, 2):
            times = []
            for _ in range(args.rounds if n * k < 10**7 else max(5, args.rounds // 20)):
                start = time.perf_counter()
                nf4_lora_native(x, weight, a, b, ids, scaling, num_threads=threads)
                times.append(time.perf_counter() - start)
            cells.append(f"{threads} thread(s) {statistics.median(times) * 1e6:8.1f} us")
        print(f"rows {rows:2d}, {k:5d} -> {n:5d}: " + ", ".join(cells))


if __name__ == "__main__":
    main()
