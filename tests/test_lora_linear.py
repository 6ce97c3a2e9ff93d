"""lora_linear: Triton kernels (under TRITON_INTERPRET=1 on CPU, compiled on a GPU) and the PyTorch
reference against a float64 computation, and against a per-adapter (mLoRA-style) loop."""

from __future__ import annotations

from dataclasses import dataclass, replace

import pytest
import torch
import torch.nn.functional as F
from helpers import FP32_REL, assert_close_rel

import abs_fast.ops.lora as ll
from abs_fast.ops import lora_linear, lora_linear_reference
from abs_fast.ops.routing import AdapterRouting

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Tolerances, relative to the largest magnitude of the float64 result:
# - fp32 outputs: sums of <= 100 products accumulate ~sqrt(K) * 2^-24 relative error; 1e-5 leaves
#   a 10x margin and still fails on any wrong term (each term is O(1/sqrt(K)) of the output).
# - bf16 outputs (y, dx): the kernel accumulates in fp32 and rounds once to bf16; round-to-nearest
#   errs by at most half an ulp, 2^-9 of the value, so one ulp of the largest value (2^-8) bounds it.
#   Inputs are rounded to bf16 before the float64 reference sees them, so input rounding is shared.
# - LoRA gradients are fp32 (fp32 adapters) whatever the model dtype: fp32 tolerance, except on a
#   GPU with a 16-bit model, where LoRA products run in tf32 (operands rounded to 10 mantissa bits,
#   2^-11 relative each): sums of such products with random signs stay within 2^-9 of the largest.
BF16_REL = 2.0**-8
TF32_REL = 2.0**-9


@dataclass
class Case:
    T: int
    K: int
    N: int
    n_adapters: int
    rank: int
    ids: str = "random"  # random | interleaved | all_base | empty_adapter | single
    bias: bool = True


CASES = [
    Case(T=77, K=50, N=45, n_adapters=3, rank=8),
    Case(T=33, K=96, N=72, n_adapters=1, rank=1, bias=False),
    Case(T=100, K=40, N=70, n_adapters=4, rank=16, ids="empty_adapter"),
    Case(T=41, K=36, N=52, n_adapters=2, rank=64),
    Case(T=29, K=48, N=40, n_adapters=2, rank=8, ids="all_base"),
    Case(T=64, K=33, N=47, n_adapters=2, rank=16, ids="interleaved"),
    Case(T=17, K=20, N=24, n_adapters=1, rank=4, ids="single"),
]


def make_ids(case: Case, gen: torch.Generator) -> torch.Tensor:
    T, n = case.T, case.n_adapters
    if case.ids == "random":
        ids = torch.randint(-1, n, (T,), generator=gen)
    elif case.ids == "interleaved":
        ids = torch.arange(T) % n  # attacker, defender, attacker, ...: worst case for grouping
    elif case.ids == "all_base":
        ids = torch.full((T,), -1)
    elif case.ids == "empty_adapter":
        ids = torch.randint(-1, n - 1, (T,), generator=gen)
        ids[ids == 1] = n - 1  # adapter 1 gets no token at all
    elif case.ids == "single":
        ids = torch.zeros(T, dtype=torch.long)
    else:
        raise ValueError(case.ids)
    return ids.to(DEVICE)


def make_inputs(case: Case, dtype: torch.dtype, seed: int, lora_dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=gen) * scale).to(dt).to(DEVICE)

    x = randn(case.T, case.K)
    weight = randn(case.N, case.K, scale=case.K**-0.5)
    bias = randn(case.N) if case.bias else None
    lora_a = randn(case.n_adapters, case.rank, case.K, scale=case.K**-0.5, dt=lora_dtype)
    lora_b = randn(case.n_adapters, case.N, case.rank, scale=case.rank**-0.5, dt=lora_dtype)
    scaling = (torch.rand(case.n_adapters, generator=gen) * 2 + 0.25).to(DEVICE)
    grad_out = randn(case.T, case.N)
    return x, weight, bias, lora_a, lora_b, make_ids(case, gen), scaling, grad_out


def run(backend, x, weight, bias, lora_a, lora_b, ids, scaling, grad_out):
    x = x.detach().clone().requires_grad_()
    lora_a = lora_a.detach().clone().requires_grad_()
    lora_b = lora_b.detach().clone().requires_grad_()
    y = lora_linear(x, weight, lora_a, lora_b, ids, scaling, bias, backend=backend)
    y.backward(grad_out)
    return y.detach(), x.grad, lora_a.grad, lora_b.grad


def float64_reference(x, weight, bias, lora_a, lora_b, ids, scaling, grad_out):
    d = lambda t: None if t is None else t.detach().double().cpu()
    return run("reference", d(x), d(weight), d(bias), d(lora_a), d(lora_b), ids.cpu(), d(scaling), d(grad_out))


def check_against_float64(backend, case, dtype, seed, lora_dtype=torch.float32):
    inputs = make_inputs(case, dtype, seed, lora_dtype)
    got = run(backend, *inputs)
    want = float64_reference(*inputs)
    out_rel = BF16_REL if dtype == torch.bfloat16 else FP32_REL
    lora_rel = BF16_REL if lora_dtype == torch.bfloat16 else FP32_REL
    if backend == "triton" and DEVICE == "cuda" and dtype != torch.float32:
        lora_rel = max(lora_rel, TF32_REL)
    for name, g, w, rel in zip(("y", "dx", "d_lora_a", "d_lora_b"), got, want,
                               (out_rel, out_rel, lora_rel, lora_rel), strict=True):
        assert g.dtype == (dtype if name in ("y", "dx") else lora_dtype), f"{name} dtype {g.dtype}"
        assert_close_rel(g.cpu(), w, rel, f"{name} ({case}, {dtype})")


BIG_BLOCKS = replace(ll.INTERPRETER_CONFIG, block_m=32, block_n=64, block_k=16, group_m=1,
                     shrink_split_k=1, grad_splits=3)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"T{c.T}-K{c.K}-N{c.N}-n{c.n_adapters}-r{c.rank}-{c.ids}")
def test_triton_fp32_matches_float64(case, rng_seed):
    check_against_float64("triton", case, torch.float32, rng_seed)


@pytest.mark.parametrize("case", [CASES[0], CASES[3], CASES[5]], ids=["random", "rank64", "interleaved"])
def test_triton_other_block_config_matches_float64(case, rng_seed, monkeypatch):
    # one split everywhere in the shrink, three partial sums in the gradients, other tile shapes
    monkeypatch.setattr(ll, "INTERPRETER_CONFIG", BIG_BLOCKS)
    check_against_float64("triton", case, torch.float32, rng_seed)


@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[5]], ids=["random", "empty_adapter", "interleaved"])
def test_triton_bf16_matches_float64(case, rng_seed):
    check_against_float64("triton", case, torch.bfloat16, rng_seed)


def test_triton_bf16_adapters_match_float64(rng_seed):
    check_against_float64("triton", CASES[0], torch.bfloat16, rng_seed, lora_dtype=torch.bfloat16)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"n{c.n_adapters}-r{c.rank}-{c.ids}")
def test_reference_fp32_matches_float64(case, rng_seed):
    check_against_float64("reference", case, torch.float32, rng_seed)


def mlora_loop(x, weight, bias, lora_a, lora_b, ids, scaling, grad_out):
    """Each adapter's tokens through their own separate computation, with their own leaf tensors."""
    x = x.detach().clone().requires_grad_()
    y = F.linear(x, weight, bias)
    parts = y.clone()
    a_leaves, b_leaves = [], []
    for a in range(lora_a.shape[0]):
        rows = (ids == a).nonzero().flatten()
        a_leaf = lora_a[a].detach().clone().requires_grad_()
        b_leaf = lora_b[a].detach().clone().requires_grad_()
        x_a = x[rows]
        parts = parts.index_add(0, rows, scaling[a] * (x_a @ a_leaf.T) @ b_leaf.T)
        a_leaves.append(a_leaf)
        b_leaves.append(b_leaf)
    parts.backward(grad_out)
    return parts.detach(), x.grad, torch.stack([t.grad for t in a_leaves]), torch.stack([t.grad for t in b_leaves])


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[3]], ids=["random", "empty_adapter", "rank64"])
def test_per_adapter_gradients_equal_separate_loop(case, backend, rng_seed):
    inputs = make_inputs(case, torch.float32, rng_seed)
    got = run(backend, *inputs)
    want = mlora_loop(*inputs)
    for name, g, w in zip(("y", "dx", "d_lora_a", "d_lora_b"), got, want, strict=True):
        assert_close_rel(g, w, FP32_REL, f"{name} vs separate per-adapter computation")
    # an adapter that owns no token gets an exactly zero gradient
    ids = inputs[5]
    for a in range(case.n_adapters):
        if not (ids == a).any():
            assert torch.count_nonzero(got[2][a]) == 0 and torch.count_nonzero(got[3][a]) == 0


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_leading_dims_and_strided_weight(backend, rng_seed):
    gen = torch.Generator().manual_seed(rng_seed)
    B, S, K, N, n, r = 3, 11, 40, 36, 2, 8
    x = torch.randn(B, S, K, generator=gen).to(DEVICE)
    weight = torch.randn(K, N, generator=gen).to(DEVICE).T  # [N, K] view with non-unit K stride
    lora_a = torch.randn(n, r, K, generator=gen).to(DEVICE) * 0.2
    lora_b = torch.randn(n, N, r, generator=gen).to(DEVICE) * 0.2
    ids = torch.randint(-1, n, (B, S), generator=gen).to(DEVICE)
    scaling = torch.tensor([0.5, 2.0], device=DEVICE)
    y = lora_linear(x, weight, lora_a, lora_b, ids, scaling, backend=backend)
    assert y.shape == (B, S, N)
    flat = lora_linear_reference(x.reshape(-1, K).double(), weight.double(), lora_a.double(), lora_b.double(),
                                 ids.reshape(-1), scaling.double())
    assert_close_rel(y.reshape(-1, N), flat, FP32_REL, "y with leading dims")


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_no_tokens(backend):
    x = torch.randn(0, 24, device=DEVICE, requires_grad=True)
    lora_a = torch.randn(2, 4, 24, device=DEVICE, requires_grad=True)
    lora_b = torch.randn(2, 20, 4, device=DEVICE, requires_grad=True)
    weight = torch.randn(20, 24, device=DEVICE)
    y = lora_linear(x, weight, lora_a, lora_b, torch.empty(0, dtype=torch.long, device=DEVICE), [1.0, 1.0],
                    backend=backend)
    assert y.shape == (0, 20)
    y.sum().backward()
    assert torch.count_nonzero(lora_a.grad) == 0 and torch.count_nonzero(lora_b.grad) == 0
    assert x.grad.shape == (0, 24)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_zero_adapters_is_the_base_linear(backend, rng_seed):
    gen = torch.Generator().manual_seed(rng_seed)
    x = torch.randn(19, 30, generator=gen).to(DEVICE)
    weight = torch.randn(26, 30, generator=gen).to(DEVICE)
    bias = torch.randn(26, generator=gen).to(DEVICE)
    ids = torch.full((19,), -1, device=DEVICE)
    y = lora_linear(x, weight, torch.empty(0, 4, 30, device=DEVICE), torch.empty(0, 26, 4, device=DEVICE),
                    ids, torch.empty(0), bias, backend=backend)
    assert_close_rel(y, F.linear(x.double(), weight.double(), bias.double()), FP32_REL, "base-only output")


def test_input_gradient_skipped_when_not_needed(rng_seed):
    # frozen embeddings: the first layer's input needs no gradient, the adapters still get theirs
    inputs = list(make_inputs(CASES[0], torch.float32, rng_seed))
    x, weight, bias, lora_a, lora_b, ids, scaling, grad_out = inputs
    lora_a = lora_a.clone().requires_grad_()
    y = lora_linear(x, weight, lora_a, lora_b, ids, scaling, bias, backend="triton")
    y.backward(grad_out)
    want = float64_reference(*inputs)
    assert x.grad is None
    assert_close_rel(lora_a.grad, want[2], FP32_REL, "d_lora_a without dx")


def test_segment_plan_covers_every_token_once(rng_seed):
    gen = torch.Generator().manual_seed(rng_seed)
    n, block_m = 3, 16
    ids = torch.randint(-1, n, (101,), generator=gen)
    ids[ids == 1] = 2  # an empty adapter
    plan = AdapterRouting.from_ids(ids, n).plan(block_m)
    seen = torch.zeros(101, dtype=torch.long)
    for adapter, start, end in zip(plan.tile_adapter.tolist(), plan.tile_start.tolist(), plan.tile_end.tolist(),
                                   strict=True):
        if adapter == -2:
            assert start == end == 0
            continue
        assert 0 < end - start <= block_m
        rows = plan.sorted_idx[start:end].long()
        assert torch.all(ids[rows] == adapter), "a tile mixes adapters"
        seen[rows] += 1
    assert torch.all(seen == 1)
    assert plan.seg_count.tolist() == [int((ids == a).sum()) for a in range(n)]
    assert plan.sorted_idx.tolist() == sorted(range(101), key=lambda t: (int(ids[t]), t)), "sort is not stable"


def test_routing_checks_once_and_builds_each_plan_once(rng_seed):
    """One AdapterRouting per batch: the id range is checked when it is built (host ids: on the host),
    each block size's plan is built once and shared by every layer, and nothing is cached on tensors."""
    ids = torch.tensor([1, 0, -1, 1, 0])
    routing = AdapterRouting.from_ids(ids, 2)
    plan = routing.plan(16)
    assert routing.plan(16) is plan and routing.plan(32) is not plan
    assert plan.seg_count.tolist() == [2, 2]
    assert not [name for name in vars(ids) if name.startswith("_abs_fast")], "state cached on the tensor"
    assert AdapterRouting.from_ids([1, 0, -1], 2).ids.dtype == torch.int32
    for bad in ([0, 2, -1], torch.tensor([0, -2])):
        with pytest.raises(ValueError, match=r"adapter_ids must lie in \[-1, 1\]"):
            AdapterRouting.from_ids(bad, 2)
    gen = torch.Generator().manual_seed(rng_seed)
    x, w = torch.randn(5, 8, generator=gen), torch.randn(6, 8, generator=gen)
    a, b = torch.randn(2, 4, 8, generator=gen), torch.randn(2, 6, 4, generator=gen)
    with pytest.raises(ValueError, match="built for 3 adapters"):
        lora_linear(x, w, a, b, AdapterRouting.from_ids(ids, 3), [1.0, 1.0])
    expected = lora_linear(x, w, a, b, ids, [1.0, 2.0], backend="reference")
    assert torch.equal(lora_linear(x, w, a, b, routing, [1.0, 2.0], backend="reference"), expected)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_bad_inputs_get_clear_errors(backend):
    x = torch.randn(5, 8, device=DEVICE)
    w = torch.randn(6, 8, device=DEVICE)
    a = torch.randn(2, 4, 8, device=DEVICE)
    b = torch.randn(2, 6, 4, device=DEVICE)
    ids = torch.tensor([0, 1, -1, 0, 1], device=DEVICE)
    with pytest.raises(ValueError, match=r"adapter_ids must lie in \[-1, 1\]"):
        lora_linear(x, w, a, b, torch.tensor([0, 2, 0, 0, 0], device=DEVICE), [1.0, 1.0], backend=backend)
    with pytest.raises(ValueError, match="one id per token"):
        lora_linear(x, w, a, b, ids[:4], [1.0, 1.0], backend=backend)
    with pytest.raises(ValueError, match="weight must be"):
        lora_linear(x, w[:, :7], a, b, ids, [1.0, 1.0], backend=backend)
    with pytest.raises(ValueError, match="lora_b must be"):
        lora_linear(x, w, a, b[:, :5], ids, [1.0, 1.0], backend=backend)
    with pytest.raises(ValueError, match="scaling must have shape"):
        lora_linear(x, w, a, b, ids, [1.0], backend=backend)
    with pytest.raises(TypeError, match="integer tensor"):
        lora_linear(x, w, a, b, ids.float(), [1.0, 1.0], backend=backend)
    with pytest.raises(TypeError, match="does not match x dtype"):
        lora_linear(x, w.double(), a, b, ids, [1.0, 1.0], backend=backend)
    with pytest.raises(ValueError, match="base frozen"):
        lora_linear(x, w.requires_grad_(), a, b, ids, [1.0, 1.0], backend=backend)


def test_unknown_backend_is_rejected(monkeypatch):
    x = torch.randn(2, 4)
    args = (x, torch.randn(3, 4), torch.randn(1, 2, 4), torch.randn(1, 3, 2), torch.zeros(2, dtype=torch.long), [1.0])
    with pytest.raises(ValueError, match="backend must be one of"):
        lora_linear(*args, backend="cuda")
    monkeypatch.setenv("ABS_FAST_BACKEND", "fast")
    with pytest.raises(ValueError, match="ABS_FAST_BACKEND"):
        lora_linear(*args)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(3584, 3584), (512, 3584), (3584, 18944)], ids=["q", "kv", "down"])
def test_compiled_kernels_at_qwen_shapes(shape, dtype, rng_seed):
    """The autotuned GPU path at Qwen2.5-7B layer shapes, 3 adapters + base rows, ragged counts."""
    N, K = shape
    case = Case(T=1531, K=K, N=N, n_adapters=3, rank=16)
    check_against_float64("triton", case, dtype, rng_seed)
