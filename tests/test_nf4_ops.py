"""NF4 ops: the Triton dequantisation kernel, and lora_linear over an NF4 base (fused dequantisation in
the GEMM's K-loop, and the dequantise-to-scratch path) against "dequantise, then float64"."""

from __future__ import annotations

import pytest
import torch
from helpers import FP32_REL, assert_close_rel
from test_lora_linear import BF16_REL, CASES, TF32_REL, Case, make_ids, run

import abs_fast.ops.lora as ll
from abs_fast.ops import lora_linear, nf4_dequantize
from abs_fast.ops.lora import lora_linear_reference
from abs_fast.quant import NF4Weight

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("out_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "no-dq"])
@pytest.mark.parametrize(("shape", "blocksize"), [((45, 50), 64), ((33, 17), 128), ((64, 96), 64), ((7, 300), 64),
                                                  ((3, 700), 256)])
def test_triton_dequantize_is_bit_identical(shape, blocksize, double_quant, out_dtype, rng_seed):
    gen = torch.Generator().manual_seed(rng_seed)
    w = (torch.randn(shape, generator=gen) * 0.05).to(out_dtype).to(DEVICE)
    q = NF4Weight.quantize(w, blocksize=blocksize, double_quant=double_quant)
    got = nf4_dequantize(q, out_dtype, backend="triton")
    assert got.dtype == out_dtype and got.shape == shape
    assert torch.equal(got, q.dequantize(out_dtype))  # the PyTorch definition, itself checked against bitsandbytes


@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "no-dq"])
def test_triton_dequantize_equals_bitsandbytes(double_quant, rng_seed):
    bnb_functional = pytest.importorskip("bitsandbytes.functional")
    gen = torch.Generator().manual_seed(rng_seed)
    w = torch.randn(300, 70, generator=gen).to(torch.bfloat16)
    packed, state = bnb_functional.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
    theirs = bnb_functional.dequantize_4bit(packed, state)
    q = NF4Weight.from_bnb(packed.to(DEVICE), state.to(DEVICE) if DEVICE != "cpu" else state)
    assert torch.equal(nf4_dequantize(q, backend="triton").cpu(), theirs)


def test_dequantize_into_a_reused_buffer(rng_seed):
    gen = torch.Generator().manual_seed(rng_seed)
    q1 = NF4Weight.quantize(torch.randn(20, 64, generator=gen).to(DEVICE))
    q2 = NF4Weight.quantize(torch.randn(31, 16, generator=gen).to(DEVICE))
    buffer = torch.full((20 * 64,), float("nan"), device=DEVICE)
    for q in (q1, q2, q1):
        view = buffer[: q.numel]
        got = nf4_dequantize(q, torch.float32, out=view, backend="triton")
        assert got.data_ptr() == buffer.data_ptr() and torch.equal(got, q.dequantize(torch.float32))
    with pytest.raises(ValueError, match=r"out must be a contiguous torch\.float32 tensor of 1280 elements"):
        nf4_dequantize(q1, torch.float32, out=buffer[:100])
    with pytest.raises(TypeError, match="expects an NF4Weight"):
        nf4_dequantize(torch.randn(3, 3))


def make_nf4_inputs(case: Case, dtype: torch.dtype, seed: int, blocksize: int = 64, double_quant: bool = True):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=gen) * scale).to(dt).to(DEVICE)

    x = randn(case.T, case.K)
    weight = NF4Weight.quantize(randn(case.N, case.K, scale=case.K**-0.5), blocksize, double_quant)
    bias = randn(case.N) if case.bias else None
    lora_a = randn(case.n_adapters, case.rank, case.K, scale=case.K**-0.5, dt=torch.float32)
    lora_b = randn(case.n_adapters, case.N, case.rank, scale=case.rank**-0.5, dt=torch.float32)
    scaling = (torch.rand(case.n_adapters, generator=gen) * 2 + 0.25).to(DEVICE)
    grad_out = randn(case.T, case.N)
    return x, weight, bias, lora_a, lora_b, make_ids(case, gen), scaling, grad_out


def dequantized_float64(x, weight: NF4Weight, bias, lora_a, lora_b, ids, scaling, grad_out):
    """The dense weight exactly as the kernels round it (to x's dtype), then everything in float64."""
    d = lambda t: None if t is None else t.detach().double().cpu().requires_grad_(t.is_floating_point())
    dense = weight.dequantize(x.dtype).double().cpu()
    x64, a64, b64 = d(x), d(lora_a), d(lora_b)
    y = lora_linear_reference(x64, dense, a64, b64, ids.cpu(), scaling.double().cpu(),
                              None if bias is None else bias.double().cpu())
    y.backward(grad_out.double().cpu())
    return y.detach(), x64.grad, a64.grad, b64.grad


def check(backend, case, dtype, seed, **quant):
    inputs = make_nf4_inputs(case, dtype, seed, **quant)
    got = run(backend, *inputs)
    want = dequantized_float64(*inputs)
    out_rel = FP32_REL if dtype == torch.float32 else BF16_REL
    lora_rel = TF32_REL if (backend == "triton" and DEVICE == "cuda" and dtype != torch.float32) else FP32_REL
    for name, g, w, rel in zip(("y", "dx", "d_lora_a", "d_lora_b"), got, want, (out_rel, out_rel, lora_rel, lora_rel),
                               strict=True):
        assert_close_rel(g.cpu(), w, rel, f"{name} ({case}, {dtype}, {quant})")


@pytest.fixture(params=["fused", "buffer"])
def nf4_path(request, monkeypatch):
    monkeypatch.setenv("ABS_FAST_NF4_PATH", request.param)
    return request.param


NF4_CASES = [CASES[0], CASES[2], CASES[3], CASES[5], Case(T=23, K=200, N=19, n_adapters=2, rank=4)]


@pytest.mark.parametrize("case", NF4_CASES, ids=lambda c: f"T{c.T}-K{c.K}-N{c.N}-n{c.n_adapters}-r{c.rank}-{c.ids}")
def test_triton_nf4_fp32_matches_dequantized_float64(case, nf4_path, rng_seed):
    check("triton", case, torch.float32, rng_seed)


@pytest.mark.parametrize(("blocksize", "double_quant"), [(128, False), (64, False), (256, True)])
def test_triton_nf4_other_formats(blocksize, double_quant, nf4_path, rng_seed):
    check("triton", CASES[0], torch.float32, rng_seed, blocksize=blocksize, double_quant=double_quant)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_triton_nf4_16bit_matches_dequantized_float64(dtype, nf4_path, rng_seed):
    check("triton", CASES[0], dtype, rng_seed)


@pytest.mark.parametrize("case", [CASES[0], CASES[4]], ids=["random", "all_base"])
def test_reference_nf4_matches_dequantized_float64(case, rng_seed):
    check("reference", case, torch.float32, rng_seed)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_no_dense_weight_is_kept_for_backward(backend, nf4_path, rng_seed):
    """Between forward and backward, autograd holds nothing of W's size: the packed codes only."""
    case = Case(T=8, K=64, N=96, n_adapters=2, rank=4)
    x, weight, bias, lora_a, lora_b, ids, scaling, grad_out = make_nf4_inputs(case, torch.float32, rng_seed)
    x.requires_grad_()
    lora_a.requires_grad_()
    saved_sizes = []

    def pack(t):
        saved_sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = lora_linear(x, weight, lora_a, lora_b, ids, scaling, bias, backend=backend)
    assert saved_sizes, "the hook saw nothing: the test would pass vacuously"
    assert max(saved_sizes) < case.N * case.K, f"a tensor of {max(saved_sizes)} elements was saved for backward"
    y.backward(grad_out)
    want = dequantized_float64(x, weight, bias, lora_a, lora_b, ids, scaling, grad_out)
    assert_close_rel(x.grad.cpu(), want[1], FP32_REL, "dx")


DECODE_CASES = [Case(T=1, K=256, N=70, n_adapters=2, rank=8), Case(T=5, K=128, N=45, n_adapters=3, rank=16),
                Case(T=23, K=320, N=33, n_adapters=2, rank=4, ids="interleaved"),
                Case(T=40, K=64, N=19, n_adapters=1, rank=1, bias=False),
                Case(T=9, K=192, N=40, n_adapters=2, rank=8, ids="all_base"),
                Case(T=150, K=128, N=37, n_adapters=2, rank=8, ids="interleaved")]  # three row tiles


@pytest.mark.parametrize(("blocksize", "double_quant"), [(64, True), (128, False), (32, True)])
@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: f"T{c.T}-K{c.K}-N{c.N}-n{c.n_adapters}-{c.ids}")
def test_triton_nf4_decode_matmul_matches_dequantized_float64(case, blocksize, double_quant, monkeypatch, rng_seed):
    """The decode product (no gradient, up to 256 rows): one split-K pass over W with the LoRA expand
    and bias of split 0, ragged N tiles, mixed adapters and base rows; forced for every row count."""
    monkeypatch.setenv("ABS_FAST_NF4_DECODE", "triton")
    x, weight, bias, lora_a, lora_b, ids, scaling, grad_out = make_nf4_inputs(case, torch.float32, rng_seed,
                                                                               blocksize, double_quant)
    calls = []
    original = ll._nf4_decode
    monkeypatch.setattr(ll, "_nf4_decode", lambda *args: calls.append(1) or original(*args))
    with torch.no_grad():
        got = lora_linear(x, weight, lora_a, lora_b, ids, scaling, bias)
    assert calls, "the decode kernel did not run"
    want = dequantized_float64(x, weight, bias, lora_a, lora_b, ids, scaling, grad_out)[0]
    assert_close_rel(got.cpu(), want, FP32_REL, f"decode y ({case}, blocksize {blocksize})")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_nf4_decode_matmul_16_bit(dtype, monkeypatch, rng_seed):
    """bf16 and fp16 activations: the code values are looked up in the activations' own 16-bit format
    (code_table(device, dtype)), and the block scale multiplies each K step's product."""
    monkeypatch.setenv("ABS_FAST_NF4_DECODE", "triton")
    case = Case(T=17, K=256, N=72, n_adapters=2, rank=16)
    x, weight, bias, lora_a, lora_b, ids, scaling, grad_out = make_nf4_inputs(case, dtype, rng_seed)
    with torch.no_grad():
        got = lora_linear(x, weight, lora_a, lora_b, ids, scaling, bias)
    want = dequantized_float64(x, weight, bias, lora_a, lora_b, ids, scaling, grad_out)[0]
    assert got.dtype == dtype
    assert_close_rel(got.cpu(), want, BF16_REL, f"decode y {dtype}")


def test_nf4_product_dispatch_rule(monkeypatch):
    """Which NF4 product runs: the buffer from NF4_BUFFER_MIN_TOKENS tokens up, fused below; decode
    (no gradient) up to 256 rows on the decode matmul; the environment overrides each choice."""
    from abs_fast.ops.nf4 import NF4_BUFFER_MIN_TOKENS, nf4_path

    assert nf4_path(NF4_BUFFER_MIN_TOKENS) == "buffer" and nf4_path(NF4_BUFFER_MIN_TOKENS - 1) == "fused"
    monkeypatch.setenv("ABS_FAST_NF4_PATH", "fused")
    assert nf4_path(10**6) == "fused"
    q = NF4Weight.quantize(torch.randn(8, 64, device=DEVICE))
    x = torch.randn(300, 64, device=DEVICE)
    a, b = torch.randn(1, 2, 64, device=DEVICE), torch.randn(1, 8, 2, device=DEVICE)
    assert ll._nf4_decode_reason(x[:256], q, a, b) is None
    assert "at most 256 rows" in ll._nf4_decode_reason(x, q, a, b)
    assert "gradients" in ll._nf4_decode_reason(x[:4].requires_grad_(), q, a, b)
    monkeypatch.setenv("ABS_FAST_NF4_DECODE", "sometimes")
    with pytest.raises(ValueError, match="ABS_FAST_NF4_DECODE"):
        lora_linear(x[:4], q, a, b, torch.zeros(4, dtype=torch.long, device=DEVICE), [1.0])


def test_nf4_weight_errors():
    x = torch.randn(4, 64, device=DEVICE)
    q = NF4Weight.quantize(torch.randn(8, 64, device=DEVICE))
    a, b = torch.randn(1, 2, 64, device=DEVICE), torch.randn(1, 8, 2, device=DEVICE)
    ids = torch.zeros(4, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match="weight must be"):
        lora_linear(torch.randn(4, 32, device=DEVICE), q, a[:, :, :32], b, ids, [1.0])
    with pytest.raises(TypeError, match="fp32/bf16/fp16/fp64 inputs"):
        lora_linear(x.to(torch.int32), q, a, b, ids, [1.0])
    with pytest.raises(TypeError, match=r"torch\.Tensor or an NF4Weight"):
        lora_linear(x, x.tolist(), a, b, ids, [1.0])


def test_unknown_nf4_path_is_rejected(monkeypatch):
    monkeypatch.setenv("ABS_FAST_NF4_PATH", "fastest")
    q = NF4Weight.quantize(torch.randn(8, 64, device=DEVICE))
    with pytest.raises(ValueError, match="ABS_FAST_NF4_PATH"):
        lora_linear(torch.randn(4, 64, device=DEVICE), q, torch.randn(1, 2, 64, device=DEVICE),
                    torch.randn(1, 8, 2, device=DEVICE), torch.zeros(4, dtype=torch.long, device=DEVICE), [1.0],
                    backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize(("dtype", "rows"), [(torch.bfloat16, (1, 16, 64, 150)), (torch.float16, (16,))], ids=str)
def test_register_decode_on_a_gpu_matches_float64(dtype, rows, monkeypatch, rng_seed):
    """The decode matmul with its register decode (PTX that only a GPU runs) at every row tile, with
    LoRA, against float64; and the first call's check kept the register decode. No bias, rank 16:
    the variants gpu-check's compile stage has built for a 7B step."""
    import abs_fast.ops.lora as ll

    monkeypatch.setenv("ABS_FAST_NF4_DECODE", "triton")
    for T in rows:
        case = Case(T=T, K=512, N=200, n_adapters=2, rank=16, ids="interleaved", bias=False)
        x, weight, bias, lora_a, lora_b, ids, scaling, grad_out = make_nf4_inputs(case, dtype, rng_seed)
        with torch.no_grad():
            got = lora_linear(x, weight, lora_a, lora_b, ids, scaling, bias)
        want = dequantized_float64(x, weight, bias, lora_a, lora_b, ids, scaling, grad_out)[0]
        assert_close_rel(got.cpu(), want, BF16_REL, f"decode y {dtype} T={T}")
    assert ll._REGISTER_DECODE_MATCHES.get((torch.cuda.current_device(), dtype)) is True


@pytest.mark.gpu
@pytest.mark.parametrize("nf4_path_name", ["fused", "buffer"])
@pytest.mark.parametrize("shape", [(3584, 3584), (512, 3584), (3584, 18944)], ids=["q", "kv", "down"])
def test_compiled_nf4_kernels_at_qwen_shapes(shape, nf4_path_name, rng_seed, monkeypatch):
    monkeypatch.setenv("ABS_FAST_NF4_PATH", nf4_path_name)
    N, K = shape
    check("triton", Case(T=1531, K=K, N=N, n_adapters=3, rank=16), torch.bfloat16, rng_seed)


def test_the_code_table_moves_to_a_device_once():
    """Dequantising on a device copies the 16-value code table there once per process, never per call
    (a copy inside a CUDA graph capture would bake a transient table into the graph)."""
    import dataclasses

    from torch.utils._python_dispatch import TorchDispatchMode

    class Copies(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.tables = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default) and args[0].shape == (16,):
                self.tables += 1
            return func(*args, **(kwargs or {}))

    q = NF4Weight.quantize(torch.randn(8, 64), 64, double_quant=True)
    on_meta = dataclasses.replace(q, **{f.name: getattr(q, f.name).to("meta") for f in dataclasses.fields(q)
                                        if isinstance(getattr(q, f.name), torch.Tensor)})
    on_meta.dequantize(torch.float32)  # the first use on this device may move it
    with Copies() as copies:
        for _ in range(3):
            on_meta.dequantize(torch.float32)
    assert copies.tables == 0
