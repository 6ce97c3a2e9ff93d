"""NF4 base: the native decode product, the fused NF4 multi-LoRA GEMM, and what they replace.

CPU (always): 4096x4096 weight, batch 1/8/16, inference
- native:          abs_fast's native CPU NF4 product (csrc/, AVX-512/AVX2, OpenMP), the baseline
- bnb_linear4bit:  bitsandbytes Linear4bit forward (bf16 compute)
- dense_bf16:      nn.Linear with a bf16 weight
GPU (when lent), Qwen2.5-7B layer shapes, bf16 activations:
- "nf4 lora fwd+bwd": fused (decode in the K-loop, baseline) / buffer (dequantise to scratch, then
  the dense fused kernel) / peft_bnb (PEFT LoRA over bitsandbytes Linear4bit, one pass per adapter)
- "nf4 gemm fwd" at 8192 tokens: fused / buffer / bnb_matmul_4bit
- "nf4 decode" at batch 1..16: native CUDA / triton fused / bnb; extra_info["bytes"] gives GB/s
- "hbm copy": a 2 GiB device copy, the bandwidth the decode numbers are a fraction of
Run: python -m pytest bench/test_bench_nf4.py --benchmark-only --benchmark-json=nf4.json;
     python bench/report.py nf4.json
"""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, HAS_CUDA, synchronize

from abs_fast import native
from abs_fast.model import linear_shapes
from abs_fast.ops import lora_linear
from abs_fast.ops.nf4 import nf4_lora_native
from abs_fast.quant import NF4Weight

RANK, ALPHA = 16, 32


def _bnb_linear4bit(weight: torch.Tensor):
    bnb = pytest.importorskip("bitsandbytes")
    out_features, in_features = weight.shape
    # built on the meta device (no fp32 CPU weight of its own) and quantised where `weight` lives
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4",
                              device="meta")
    layer.weight = bnb.nn.Params4bit(weight.to(torch.bfloat16), requires_grad=False, quant_type="nf4")
    if out_features % 32:  # bitsandbytes' AVX512-BF16 CPU repacking asserts out_features % 32 == 0
        layer.support_avx512bf16_for_cpu = False
    return layer.to(DEVICE)  # quantises on the move, on CPU as on a GPU


def hf_bnb_nf4_model(preset: str):
    """A Hugging Face model of `preset` (random weights, bf16) with every decoder projection turned into
    bitsandbytes Linear4bit, one at a time (q/k/v biases dropped: negligible cost). The straightforward
    baseline of the rollout and self-play benchmarks."""
    from abs_fast.model import build_model

    model = build_model(preset, device=DEVICE, dtype=torch.bfloat16)
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, torch.nn.Linear):
                    setattr(parent, name, _bnb_linear4bit(child.weight.data))
                    del child
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return model


def _run(benchmark, fn, rounds):
    def step():
        fn()
        synchronize()

    step()  # warm-up: compilation, autotuning, bitsandbytes' CPU repacking
    benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=2)


# ---------------------------------------------------------------------------------------------
# CPU: the decode product
# ---------------------------------------------------------------------------------------------

CPU_BATCHES = [1, 8, 16]


@pytest.mark.skipif(HAS_CUDA, reason="the CPU suite runs on CPU machines")
@pytest.mark.parametrize("variant", ["native", "bnb_linear4bit", "dense_bf16"])
@pytest.mark.parametrize("batch", CPU_BATCHES)
def test_cpu_nf4_product(benchmark, batch, variant):
    gen = torch.Generator().manual_seed(0)
    out_features = in_features = 4096
    weight = torch.randn(out_features, in_features, generator=gen) * in_features**-0.5
    x = torch.randn(batch, in_features, generator=gen)
    benchmark.group = f"nf4 product cpu 4096x4096 batch {batch}"
    benchmark.extra_info.update(variant=variant, batch=batch, threads=torch.get_num_threads())
    if variant == "native":
        if native.cpu_library() is None:
            pytest.skip("the native CPU library is not built")
        nf4 = NF4Weight.quantize(weight)
        empty_a, empty_b = torch.empty(0, RANK, in_features), torch.empty(0, out_features, RANK)
        ids, scaling = torch.full((batch,), -1, dtype=torch.int32), torch.empty(0)
        benchmark.extra_info["isa"] = native.isa_name(native.cpu_library().abs_fast_cpu_best_isa())
        fn = lambda: nf4_lora_native(x, nf4, empty_a, empty_b, ids, scaling)
    elif variant == "bnb_linear4bit":
        layer = _bnb_linear4bit(weight)
        xb = x.to(torch.bfloat16)
        fn = lambda: layer(xb)
    else:
        layer = torch.nn.Linear(in_features, out_features, bias=False, dtype=torch.bfloat16)
        layer.weight.data.copy_(weight)
        xb = x.to(torch.bfloat16)
        fn = lambda: layer(xb)
    with torch.no_grad():
        _run(benchmark, fn, rounds=30)


# ---------------------------------------------------------------------------------------------
# GPU: training GEMM, forward GEMM, decode, at Qwen2.5-7B shapes
# ---------------------------------------------------------------------------------------------

GPU_SHAPES = {f"7b-{name}": shape for name, shape in linear_shapes("qwen2.5-7b").items()} if HAS_CUDA else {}
TOKENS = 8192


class NF4Problem:
    def __init__(self, out_features: int, in_features: int, tokens: int, seed: int = 0):
        gen = torch.Generator(device=DEVICE).manual_seed(seed)
        randn = lambda *s, scale=1.0: torch.randn(*s, generator=gen, device=DEVICE) * scale
        self.dense = randn(out_features, in_features, scale=in_features**-0.5)
        self.weight = NF4Weight.quantize(self.dense)
        self.x = randn(tokens, in_features).to(torch.bfloat16).requires_grad_()
        self.grad_out = randn(tokens, out_features).to(torch.bfloat16)
        self.lora_a = randn(2, RANK, in_features, scale=in_features**-0.5).requires_grad_()
        self.lora_b = randn(2, out_features, RANK, scale=0.01).requires_grad_()
        half = tokens // 2
        self.adapter_ids = torch.cat([torch.zeros(half), torch.ones(tokens - half)]).to(DEVICE, torch.int32)
        self.scaling = torch.full((2,), ALPHA / RANK, device=DEVICE)

    def fwd_bwd(self):
        for t in (self.x, self.lora_a, self.lora_b):
            t.grad = None
        y = lora_linear(self.x, self.weight, self.lora_a, self.lora_b, self.adapter_ids, self.scaling,
                        backend="triton")
        y.backward(self.grad_out)


@pytest.mark.skipif(not HAS_CUDA, reason="GPU suite")
@pytest.mark.parametrize("variant", ["fused", "buffer", "peft_bnb"])
@pytest.mark.parametrize("shape", list(GPU_SHAPES))
def test_gpu_nf4_lora_fwd_bwd(benchmark, shape, variant, monkeypatch):
    out_features, in_features = GPU_SHAPES[shape]
    problem = NF4Problem(out_features, in_features, TOKENS)
    benchmark.group = f"nf4 lora fwd+bwd {shape} T={TOKENS}"
    benchmark.extra_info.update(variant=variant, shape=shape, tokens=TOKENS, rank=RANK)
    if variant in ("fused", "buffer"):
        monkeypatch.setenv("ABS_FAST_NF4_PATH", variant)
        fn = problem.fwd_bwd
    else:
        peft = pytest.importorskip("peft")
        base = torch.nn.Sequential(_bnb_linear4bit(problem.dense))
        config = lambda: peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["0"])
        model = peft.get_peft_model(base, config(), adapter_name="attacker")
        model.add_adapter("defender", config())
        half = TOKENS // 2
        parts = [(name, problem.x.detach()[rows].clone().requires_grad_(), problem.grad_out[rows])
                 for name, rows in (("attacker", slice(0, half)), ("defender", slice(half, TOKENS)))]

        def fn():
            for name, x, g in parts:
                model.set_adapter(name)
                model(x).backward(g)
    _run(benchmark, fn, rounds=20)


@pytest.mark.skipif(not HAS_CUDA, reason="GPU suite")
@pytest.mark.parametrize("variant", ["fused", "buffer", "bnb_matmul_4bit"])
@pytest.mark.parametrize("shape", list(GPU_SHAPES))
def test_gpu_nf4_gemm_forward(benchmark, shape, variant, monkeypatch):
    out_features, in_features = GPU_SHAPES[shape]
    problem = NF4Problem(out_features, in_features, TOKENS)
    benchmark.group = f"nf4 gemm fwd {shape} T={TOKENS}"
    benchmark.extra_info.update(variant=variant, shape=shape, tokens=TOKENS)
    x = problem.x.detach()
    no_adapters = (torch.empty(0, RANK, in_features, device=DEVICE), torch.empty(0, out_features, RANK, device=DEVICE))
    ids = torch.full((TOKENS,), -1, device=DEVICE, dtype=torch.int32)
    if variant in ("fused", "buffer"):
        monkeypatch.setenv("ABS_FAST_NF4_PATH", variant)
        fn = lambda: lora_linear(x, problem.weight, *no_adapters, ids, torch.empty(0, device=DEVICE),
                                 backend="triton")
    else:
        bnb = pytest.importorskip("bitsandbytes")
        packed, state = problem.weight.to_bnb()
        packed_t = packed.t()
        fn = lambda: bnb.matmul_4bit(x, packed_t, quant_state=state)
    with torch.no_grad():
        _run(benchmark, fn, rounds=20)


ENGINE_DECODE_ROWS = (1, 16, 64, 256)


def engine_decode_call(out_features: int, in_features: int, rows: int, seed: int = 0):
    """The call an engine decode step makes for one projection, as the engine makes it: a
    MultiLoRALinear whose NF4 base has its block scales decoded once (at quantisation), two adapters,
    and one AdapterRouting built for the batch (ids checked once on the host: no sync per call).
    Returns (fn, the implementation the dispatch picks for it: ops.lora.nf4_call_path)."""
    from abs_fast.model import MultiLoRALinear
    from abs_fast.ops.lora import nf4_call_path
    from abs_fast.ops.routing import AdapterRouting

    dtype = torch.bfloat16 if HAS_CUDA else torch.float32
    torch.manual_seed(seed)
    layer = MultiLoRALinear(in_features, out_features, bias=False, device=DEVICE, dtype=dtype)
    layer.quantize_base_()
    for name in ("attacker", "defender"):
        layer.add_adapter(name, RANK, ALPHA)
        with torch.no_grad():
            layer.lora_B[name].normal_(0, 0.01)
    routing = AdapterRouting.from_ids([i % 3 - 1 for i in range(rows)], 2, device=DEVICE)  # base and both adapters
    x = torch.randn(rows, in_features, device=DEVICE, dtype=dtype)
    lora_a, lora_b = layer.stacked_adapters()

    def fn():
        with torch.no_grad():
            return layer(x, routing)
    with torch.no_grad():
        path = nf4_call_path(x, layer.base_weight, lora_a, lora_b)
    return fn, path, layer.base_weight.nbytes()


@pytest.mark.parametrize("rows", ENGINE_DECODE_ROWS)
def test_nf4_decode_engine_call(benchmark, rows):
    """The engine's decode call (the dispatch picks native, the Triton decode matmul, or the general
    path by row count); extra_info["bytes"] / time is the weight bandwidth, compared with the
    measured HBM copy bandwidth in gpu-check."""
    out_features, in_features = GPU_SHAPES["7b-gate_proj"] if HAS_CUDA else (256, 512)
    fn, path, nbytes = engine_decode_call(out_features, in_features, rows)
    benchmark.group = f"nf4 decode engine call rows {rows}"
    benchmark.extra_info.update(path=path, rows=rows, bytes=nbytes, shape=f"{out_features}x{in_features}")
    _run(benchmark, fn, rounds=50 if HAS_CUDA else 3)


@pytest.mark.skipif(not HAS_CUDA, reason="GPU suite")
@pytest.mark.parametrize("variant", ["native", "triton", "bnb"])
@pytest.mark.parametrize("batch", [1, 4, 16])
@pytest.mark.parametrize("shape", ["7b-gate_proj", "7b-down_proj", "7b-q_proj"])
def test_gpu_nf4_decode(benchmark, shape, batch, variant):
    out_features, in_features = GPU_SHAPES[shape]
    problem = NF4Problem(out_features, in_features, batch)
    weight = problem.weight
    benchmark.group = f"nf4 decode {shape} batch {batch}"
    benchmark.extra_info.update(variant=variant, shape=shape, batch=batch, bytes=weight.nbytes())
    x = problem.x.detach()
    ids = problem.adapter_ids
    args = (x, weight, problem.lora_a.detach(), problem.lora_b.detach(), ids, problem.scaling)
    if variant == "native":
        if native.cuda_library() is None:
            pytest.skip("the native CUDA library is not built")
        fn = lambda: nf4_lora_native(*args)
    elif variant == "triton":
        fn = lambda: lora_linear(*args, backend="triton")
    else:
        bnb = pytest.importorskip("bitsandbytes")
        packed, state = weight.to_bnb()
        packed_t = packed.t()
        fn = lambda: bnb.matmul_4bit(x, packed_t, quant_state=state)
    with torch.no_grad():
        _run(benchmark, fn, rounds=50)


@pytest.mark.skipif(not HAS_CUDA, reason="GPU suite")
def test_gpu_hbm_copy(benchmark):
    src = torch.randn(2**29, device=DEVICE)  # 2 GiB
    dst = torch.empty_like(src)
    benchmark.group = "hbm copy 2 GiB"
    benchmark.extra_info.update(variant="copy", bytes=2 * src.numel() * src.element_size())
    _run(benchmark, lambda: dst.copy_(src), rounds=20)
