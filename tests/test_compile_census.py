"""The compile census (tests/compile_census.py): the Triton variants a 7B self-play step and decode
waves compile are few, and do not grow with the number of distinct token counts. Each variant costs
3-4 s of compiling for sm_90 on this CPU, so a constexpr or a specialisation that follows the token
count turns the first steps on a GPU into minutes of compiling.

The census runs the real launch wrappers on meta tensors with recording launchers: nothing is
launched and no GPU is needed. bench/gpu_check.py budgets its compile stage from the bound."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
import gpu_check  # noqa: E402


def _census(micro_batches: int, seed: int, arch: int = 90) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # real JIT functions
    done = subprocess.run([sys.executable, str(REPO / "tests" / "compile_census.py"), str(micro_batches), str(seed),
                           str(arch)], capture_output=True, text=True, env=env, timeout=900, cwd=REPO)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def census() -> dict:
    return _census(40, 0)


def test_a_7b_step_and_decode_waves_compile_a_bounded_number_of_variants(census):
    print(json.dumps(census, indent=1))
    assert census["launches"] > 2000  # 40 micro-batches x 7 projections x (scoring, forward, backward), decode
    assert census["variants"] <= gpu_check.COMPILE_VARIANTS, census["per_kernel"]
    for kernel in ("lora_shrink_kernel", "lora_fused_matmul_kernel", "lora_segment_grad_kernel",
                   "token_stats_kernel", "token_grad_chunk_kernel", "nf4_decode_matmul_kernel",
                   "decode_attention_kernel"):
        assert census["per_kernel"].get(kernel), f"the census never reached {kernel}"


def test_twice_the_distinct_token_counts_compile_nothing_more(census):
    """80 micro-batches with other token counts (and so twice the distinct counts) compile the same
    variants: no constexpr and no specialisation follows the token count."""
    more = _census(80, 1)
    assert more["launches"] > census["launches"]
    assert more["variants"] == census["variants"], (more["per_kernel"], census["per_kernel"])


def test_no_kernel_adds_with_atomics():
    """Split-K partials (the shrink's, the decode matmul's) and split gradient sums are written per split
    and summed by the caller in a fixed order: no tl.atomic_* in any kernel, so a GPU run adds in the
    same order every time and a seed repeats bit for bit."""
    import ast

    for path in sorted((REPO / "kernels").glob("*.py")):
        atomics = [node.attr for node in ast.walk(ast.parse(path.read_text()))
                   if isinstance(node, ast.Attribute) and node.attr.startswith("atomic")]
        assert not atomics, f"kernels/{path.name} adds with {atomics}"
