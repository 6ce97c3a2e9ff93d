"""Fused two-adapter LoRA linear, forward + backward, against the ways it is done without it.

Variants per layer shape (tokens split evenly between attacker and defender, LoRA r=16, alpha=32):
- fused:      abs_fast.ops.lora_linear, both adapters in one pass (Triton on GPU, torch on CPU)
- peft:       two sequential passes through a PEFT LoRA layer on the same base, one adapter each
- loop:       one base GEMM, then a per-adapter loop of torch matmuls (mLoRA style)
- base_only:  the base GEMM forward + input gradient alone (the floor LoRA adds to)
Each round runs forward and backward (input and adapter gradients) once.
Run: python -m pytest bench/ --benchmark-only --benchmark-json=bench.json; python bench/report.py bench.json
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, DTYPE, HAS_CUDA, synchronize

from abs_fast.model import linear_shapes
from abs_fast.ops import lora_linear

RANK, ALPHA = 16, 32
if HAS_CUDA:
    TOKENS = 8192
    SHAPES = {f"7b-{name}": shape for name, shape in linear_shapes("qwen2.5-7b").items()}
else:
    TOKENS = 512
    SHAPES = {"cpu-square-512": (512, 512), "cpu-narrow-128x512": (128, 512), "cpu-wide-1408x512": (1408, 512),
              "cpu-down-512x1408": (512, 1408)}
BACKEND = "triton" if HAS_CUDA else "reference"
VARIANTS = ["fused", "peft", "loop", "base_only"]


class Problem:
    def __init__(self, out_features: int, in_features: int, seed: int = 0):
        gen = torch.Generator(device=DEVICE).manual_seed(seed)
        randn = lambda *s, scale=1.0, dtype=DTYPE: (torch.randn(*s, generator=gen, device=DEVICE) * scale).to(dtype)
        self.x = randn(TOKENS, in_features).requires_grad_()
        self.grad_out = randn(TOKENS, out_features)
        self.weight = randn(out_features, in_features, scale=in_features**-0.5)
        self.lora_a = randn(2, RANK, in_features, scale=in_features**-0.5, dtype=torch.float32).requires_grad_()
        self.lora_b = randn(2, out_features, RANK, scale=0.01, dtype=torch.float32).requires_grad_()
        half = TOKENS // 2
        self.adapter_ids = torch.cat([torch.zeros(half), torch.ones(TOKENS - half)]).to(DEVICE, torch.int32)
        self.scaling = torch.full((2,), ALPHA / RANK, device=DEVICE)
        self.rows = [torch.arange(half, device=DEVICE), torch.arange(half, TOKENS, device=DEVICE)]

    def clear_grads(self):
        for t in (self.x, self.lora_a, self.lora_b):
            t.grad = None

    def fused(self):
        y = lora_linear(self.x, self.weight, self.lora_a, self.lora_b, self.adapter_ids, self.scaling,
                        backend=BACKEND)
        y.backward(self.grad_out)

    def loop(self):
        y = F.linear(self.x, self.weight)
        for a, rows in enumerate(self.rows):
            x_a = self.x.index_select(0, rows)
            update = (x_a.to(torch.float32) @ self.lora_a[a].T) @ self.lora_b[a].T * self.scaling[a]
            y = y.index_add(0, rows, update.to(y.dtype))
        y.backward(self.grad_out)

    def base_only(self):
        F.linear(self.x, self.weight).backward(self.grad_out)


class PeftProblem:
    """The same numbers inside a PEFT LoRA layer with adapters attacker and defender."""

    def __init__(self, problem: Problem):
        peft = pytest.importorskip("peft")
        out_features, in_features = problem.weight.shape
        base = torch.nn.Sequential(torch.nn.Linear(in_features, out_features, bias=False, device=DEVICE, dtype=DTYPE))
        with torch.no_grad():
            base[0].weight.copy_(problem.weight)
        config = lambda: peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["0"])
        self.model = peft.get_peft_model(base, config(), adapter_name="attacker")
        self.model.add_adapter("defender", config())
        self.problem = problem
        self.x_parts = [problem.x.detach()[rows].clone().requires_grad_() for rows in problem.rows]
        self.grad_parts = [problem.grad_out[rows] for rows in problem.rows]

    def run(self):
        for name, x, g in zip(("attacker", "defender"), self.x_parts, self.grad_parts, strict=True):
            self.model.set_adapter(name)
            self.model(x).backward(g)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
def test_lora_linear_fwd_bwd(benchmark, shape, variant):
    out_features, in_features = SHAPES[shape]
    problem = Problem(out_features, in_features)
    run = PeftProblem(problem).run if variant == "peft" else getattr(problem, variant)
    benchmark.group = f"lora_linear fwd+bwd {shape} T={TOKENS}"
    benchmark.extra_info.update(variant=variant, shape=shape, tokens=TOKENS, rank=RANK,
                                dtype=str(DTYPE), device=str(DEVICE), backend=BACKEND)

    def step():
        problem.clear_grads()
        run()
        synchronize()

    step()  # warm-up: compilation, autotuning, allocator
    benchmark.pedantic(step, rounds=20 if HAS_CUDA else 40, iterations=1, warmup_rounds=2)
