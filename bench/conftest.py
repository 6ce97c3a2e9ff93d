"""Benchmark set-up: real Qwen2.5 shapes on a GPU, small shapes on CPU (PyTorch path, no interpreter)."""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA and os.environ.get("TRITON_INTERPRET") == "1":
    raise pytest.UsageError("benchmarks measure real kernels: unset TRITON_INTERPRET")

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
DTYPE = torch.bfloat16 if HAS_CUDA else torch.float32


def synchronize() -> None:
    if HAS_CUDA:
        torch.cuda.synchronize()


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["abs_fast_device"] = torch.cuda.get_device_name() if HAS_CUDA else "cpu"
    machine_info["torch"] = torch.__version__
