"""Packaging: kernels/ is only ever `abs_fast.kernels`; the wheel builds without CUDA; the CLI works."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent

PROBE = r"""
import importlib, json, sys
repo = sys.argv[1]
import abs_fast, abs_fast.ops, abs_fast.model
import abs_fast.kernels.lora
assert abs_fast.kernels.lora.__name__ == "abs_fast.kernels.lora"
import bitsandbytes, transformers
from transformers.utils import import_utils
hf_kernels = import_utils.is_kernels_available()
# what bitsandbytes does on CPUs with AVX512-BF16, and transformers' hub-kernels integration, do:
try:
    from kernels import get_kernel  # noqa: F401
    got_kernel = True
except ImportError:
    got_kernel = False
def from_checkout(module):  # a file of this checkout (not of a virtual environment inside it); a
    # namespace package (kernels/ has no __init__.py) runs no code and has no file: it does not count
    path = getattr(module, "__file__", None) or ""
    return path.startswith(repo) and not path.startswith(sys.prefix)
ours = sorted(name for name, module in list(sys.modules.items())
              if from_checkout(module) and not name.startswith("abs_fast"))
print(json.dumps({"hf_kernels_available": hf_kernels, "get_kernel_imported": got_kernel, "foreign_names": ours}))
"""


def _probe_hf_kernels(cwd: Path) -> dict:
    result = subprocess.run([sys.executable, "-c", PROBE, str(REPO_ROOT)], cwd=cwd,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_hf_kernels_probes_load_nothing_of_ours_from_repo_root(tmp_path):
    """From the repo root, transformers' and bitsandbytes' probes for the Hugging Face `kernels` package
    answer exactly as they do elsewhere: whether that package is installed (transformers >= 5.25 pulls
    it in) is the environment's business, but our kernels/ folder must never be what they find."""
    at_root = _probe_hf_kernels(REPO_ROOT)
    elsewhere = _probe_hf_kernels(tmp_path)
    assert at_root["foreign_names"] == [], "modules of this checkout loaded under a name that is not abs_fast"
    assert at_root == elsewhere


@pytest.mark.slow
def test_wheel_builds_without_cuda_and_maps_kernels(tmp_path):
    pytest.importorskip("scikit_build_core")
    env = dict(os.environ)
    nvcc = shutil.which("nvcc")
    if nvcc:  # hide the CUDA toolkit: the install must not need it
        cuda_bin = str(Path(nvcc).parent)
        env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if p != cuda_bin)
    for var in ("CUDACXX", "CUDA_HOME", "CUDA_PATH"):
        env.pop(var, None)
    # CMake also looks for nvcc outside PATH (/usr/local/cuda-*): switch the CUDA part off, the path
    # a machine without nvcc takes
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path),
         "-C", "cmake.define.ABS_FAST_CUDA=OFF", str(REPO_ROOT)], capture_output=True, text=True, env=env,
        timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (wheel,) = tmp_path.glob("abs_fast-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "abs_fast/kernels/lora.py" in names
    assert not [n for n in names if n.startswith("kernels/")], "kernels/ must not be a top-level package"
    assert "abs_fast/ops/lora.py" in names and "abs_fast/cli.py" in names
    assert "abs_fast/_native/libabs_fast_cuda.so" not in names
    if shutil.which("c++") or shutil.which("g++"):
        assert "abs_fast/_native/libabs_fast_native.so" in names, "the native CPU library is missing from the wheel"


def run_cli(*args, env_extra=None):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "abs_fast.cli", *args], capture_output=True, text=True,
                          env=env, timeout=300)


def test_info_reports_versions_devices_and_backends():
    result = run_cli("info", "--json", env_extra={"TRITON_INTERPRET": "0", "ABS_FAST_BACKEND": "auto"})
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    import torch

    assert report["packages"]["torch"] == torch.__version__
    assert report["abs_fast"]["version"]
    assert report["cpu"]["logical_cores"] == os.cpu_count()
    assert report["backends"]["lora_linear"]["cpu"].startswith("PyTorch reference")
    if torch.cuda.is_available():
        assert report["backends"]["lora_linear"]["cuda"] == "Triton (compiled) [ABS_FAST_BACKEND=auto]"
        assert report["cuda_devices"][0]["name"]
    else:
        assert report["backends"]["lora_linear"]["cuda"] == "no CUDA device" and report["cuda_devices"] == []


def test_info_follows_the_interpreter_and_overrides():
    interp = run_cli("info", env_extra={"TRITON_INTERPRET": "1"})
    assert interp.returncode == 0, interp.stderr
    assert "lora_linear on cpu : Triton interpreter (TRITON_INTERPRET=1)" in interp.stdout
    forced = run_cli("info", env_extra={"TRITON_INTERPRET": "1", "ABS_FAST_BACKEND": "reference"})
    assert "lora_linear on cpu : PyTorch reference [ABS_FAST_BACKEND=reference]" in forced.stdout
    bad = run_cli("info", env_extra={"ABS_FAST_BACKEND": "turbo"})
    assert "error: backend must be one of" in bad.stdout


def test_cli_without_command_explains_usage():
    result = run_cli()
    assert result.returncode == 2 and "info" in result.stderr


def test_the_suite_runs_in_a_private_home():
    """Caches, configs and runs of the suite go to a temporary home (conftest.py), never the user's:
    abs-fast's cache (the demo's warm start, the tokenizer) resolves there."""
    from abs_fast.model.tokenizer import default_cache_dir

    user_home = Path(os.environ["ABS_FAST_TEST_USER_HOME"]).resolve()
    test_home = Path.home().resolve()
    assert test_home != user_home and test_home.name.startswith("abs-fast-test-home-")
    for path in (default_cache_dir(), Path(os.environ["TRITON_CACHE_DIR"]), Path(os.environ["HF_HOME"]),
                 Path(os.environ["MPLCONFIGDIR"])):
        assert path.resolve().is_relative_to(test_home), path
