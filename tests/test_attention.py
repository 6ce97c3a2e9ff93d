"""Attention: packed documents (no [S, S] tensor) against the dense-mask formulation, and the Triton
decode kernel against a float64 reference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import FP32_REL, assert_close_rel

import abs_fast.model.attention as attention
import abs_fast.model.transformer as transformer
from abs_fast.model import build_model, load_policy
from abs_fast.model.attention import DecodeBatch, Documents, KVCache, decode_attention, packed_attention

pytestmark = pytest.mark.usefixtures("reference_backend")


@pytest.fixture
def reference_backend(monkeypatch):
    monkeypatch.setenv("ABS_FAST_BACKEND", "reference")  # the linear layers; attention is what is tested here


def dense_mask_attention(q, k, v, documents: Documents, window, backend=None, deterministic=False):
    """What the model computed before packed attention: one [T, T] document-causal (windowed) mask
    and K/V expanded to every query head."""
    T, H, _ = q.shape
    doc = torch.repeat_interleave(torch.arange(len(documents.lengths)), torch.tensor(documents.lengths))
    position = torch.cat([torch.arange(n) for n in documents.lengths])
    i = torch.arange(T)
    allowed = (doc[:, None] == doc[None, :]) & (i[:, None] >= i[None, :])
    if window is not None:
        allowed &= (position[:, None] - position[None, :]) < window
    groups = H // k.shape[1]
    kk, vv = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    out = F.scaled_dot_product_attention(q.transpose(0, 1), kk.transpose(0, 1), vv.transpose(0, 1),
                                         attn_mask=allowed.to(q.device))
    return out.transpose(0, 1)


def _small(family: str):
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    common = dict(hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
                  num_key_value_heads=2, vocab_size=300, max_position_embeddings=512, rms_norm_eps=1e-5)
    if family == "llama":
        config, cls = LlamaConfig(**common, attention_bias=True), LlamaForCausalLM
    else:
        config, cls = MistralConfig(**common, sliding_window=5), MistralForCausalLM
    torch.manual_seed(0)
    return cls(config).eval()


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    dirs = {}
    for family in ("qwen2-window", "llama", "mistral"):
        if family == "qwen2-window":
            hf = build_model("tiny", seed=2, use_sliding_window=True, sliding_window=3, max_window_layers=1)
        else:
            hf = _small(family)
        path = tmp_path_factory.mktemp(family)
        hf.save_pretrained(str(path))
        dirs[family] = str(path)
    return dirs


@pytest.mark.parametrize("lengths", [[7, 1, 12, 1, 4], [20]], ids=["five-documents", "one-document"])
@pytest.mark.parametrize("family", ["qwen2-window", "llama", "mistral"])
def test_packed_forward_and_backward_equal_the_dense_mask_path(model_dirs, family, lengths, monkeypatch, rng_seed):
    """The model's packed documents (ragged, some of length 1, windows shorter than documents) against
    the same model with the old [T, T] mask: hidden states and adapter gradients, fp32, 1e-5 relative."""
    policy = load_policy(model_dirs[family], quantize=None, device="cpu", rank=4, alpha=8)
    gen = torch.Generator().manual_seed(rng_seed)
    with torch.no_grad():
        for p in policy.adapter_parameters("attacker") + policy.adapter_parameters("defender"):
            p.normal_(0, 0.1, generator=gen)
    T = sum(lengths)
    ids = torch.randint(0, policy.config.vocab_size, (1, T), generator=gen)
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    adapters = torch.randint(-1, 2, (1, T), generator=gen)

    def run():
        policy.zero_grad(set_to_none=True)
        hidden = policy(ids, adapters, position_ids=positions)
        (hidden * torch.linspace(-1, 1, hidden.shape[-1])).sum().backward()
        grads = [p.grad.clone() for p in policy.adapter_parameters("attacker") + policy.adapter_parameters("defender")]
        return hidden.detach(), grads

    packed_hidden, packed_grads = run()
    monkeypatch.setattr(transformer, "packed_attention", dense_mask_attention)
    dense_hidden, dense_grads = run()
    assert_close_rel(packed_hidden, dense_hidden, FP32_REL, f"{family} hidden")
    for i, (a, b) in enumerate(zip(packed_grads, dense_grads, strict=True)):
        assert_close_rel(a, b, FP32_REL, f"{family} adapter gradient {i}")


def test_no_tensor_spans_the_packed_row_in_both_dimensions(model_dirs):
    """A packed training forward + backward over S = 1024 tokens in 5 documents: no tensor anywhere
    has two trailing dimensions of S or more (no [S, S] mask, scores or bias)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    S = 1024
    lengths = [300, 250, 200, 150, 124]
    policy = load_policy(model_dirs["qwen2-window"], quantize=None, device="cpu", rank=4, alpha=8)
    ids = torch.randint(0, policy.config.vocab_size, (1, S))
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    adapters = torch.randint(-1, 2, (1, S))
    shapes = []

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, tuple | list) else (out,):
                if isinstance(t, torch.Tensor):
                    shapes.append((func._schema.name, tuple(t.shape)))
            return out

    with Recorder():
        hidden = policy(ids, adapters, position_ids=positions)
        hidden.float().pow(2).mean().backward()
    assert len(shapes) > 100
    square = [(name, shape) for name, shape in shapes if len(shape) >= 2 and min(shape[-2:]) >= S]
    assert not square, f"tensors spanning the row twice: {square[:5]}"


def test_documents_from_positions_and_padding():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 0, 1]])
    assert Documents.from_positions(positions).lengths == (3, 2, 1, 2)
    # left padding (positions of pads clamp to 0): every pad is its own document
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    padded = (mask.cumsum(-1) - 1).clamp(min=0)
    assert Documents.from_positions(padded, mask).lengths == (1, 1, 3, 5)
    docs = Documents.from_lengths([3, 1], "cpu")
    assert docs.cu_seqlens.tolist() == [0, 3, 4] and docs.max_len == 3
    with pytest.raises(ValueError, match=">= 1"):
        Documents.from_lengths([2, 0], "cpu")


def _decode_reference(q, k_cache, v_cache, seq_lens, window):
    """float64, one row and one head at a time."""
    B, H, D = q.shape
    groups = H // k_cache.shape[1]
    out = torch.zeros(B, H, D, dtype=torch.float64)
    for b in range(B):
        n = int(seq_lens[b])
        first = 0 if window is None else max(0, n - window)
        for h in range(H):
            keys = k_cache[b, h // groups, first:n].double()
            scores = keys @ q[b, h].double() / math.sqrt(D)
            out[b, h] = torch.softmax(scores, 0) @ v_cache[b, h // groups, first:n].double()
    return out


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 2), (7, 1), (2, 2)], ids=["gqa2", "gqa7", "mha"])
@pytest.mark.parametrize("backend", ["triton", "sdpa"])
def test_decode_attention_matches_float64(backend, heads, kv_heads, window, rng_seed):
    """Ragged rows (length 1 and a row longer than one split), GQA groups of 1, 2 and 7 query heads,
    a sliding window, cache rows longer than the batch (rows past B untouched)."""
    gen = torch.Generator().manual_seed(rng_seed)
    D, capacity, rows = 16, 80, 6
    seq_lens = torch.tensor([1, 37, 80, 5, 64], dtype=torch.int32)
    B = len(seq_lens)
    cache = KVCache(1, rows, kv_heads, capacity, D, torch.device("cpu"), torch.float32)
    cache.k.normal_(generator=gen)
    cache.v.normal_(generator=gen)
    q = torch.randn(B, heads, D, generator=gen)
    batch = DecodeBatch(cache, seq_lens, int(seq_lens.max()), backend)
    got = decode_attention(q, cache.k[0], cache.v[0], batch, window)
    want = _decode_reference(q, cache.k[0], cache.v[0], seq_lens, window)
    assert_close_rel(got, want, FP32_REL, f"{backend} decode attention", floor=1.0)


def test_packed_attention_backends_agree_on_cpu(rng_seed):
    """sdpa per document against the dense formulation directly (the CUDA varlen path is checked in
    the gpu test below)."""
    gen = torch.Generator().manual_seed(rng_seed)
    docs = Documents.from_lengths([5, 1, 9], "cpu")
    q, k, v = torch.randn(15, 4, 8, generator=gen), torch.randn(15, 2, 8, generator=gen), torch.randn(15, 2, 8,
                                                                                                      generator=gen)
    for window in (None, 2, 100):
        got = packed_attention(q, k, v, docs, window, "sdpa")
        assert_close_rel(got, dense_mask_attention(q, k, v, docs, window), FP32_REL, f"window {window}")


@pytest.mark.parametrize("window", [None, 3])
def test_the_varlen_path_takes_grouped_heads(window):
    """torch >= 2.13 refuses Hq != Hkv unless enable_gqa=True. The varlen path passes it: on CPU the
    call reaches the kernel (NotImplementedError: FlashAttention has no CPU kernel), never the
    head-count ValueError."""
    if attention._torch_varlen() is None or "enable_gqa" not in attention._varlen_parameters():
        pytest.skip("this torch's varlen_attn has no enable_gqa")
    docs = Documents.from_lengths([4, 6], "cpu")
    q, k, v = torch.randn(10, 4, 16, dtype=torch.bfloat16), *torch.randn(2, 10, 2, 16, dtype=torch.bfloat16)
    with pytest.raises(NotImplementedError, match="_flash_attention_forward"):
        packed_attention(q, k, v, docs, window, "torch-varlen")


def test_a_varlen_without_enable_gqa_leaves_grouped_heads_to_sdpa(monkeypatch, rng_seed):
    """A torch whose varlen_attn has no enable_gqa (before 2.13) or no window_size (2.10): calls it
    cannot express go to per-document SDPA (equal to the dense formulation); the others reach varlen."""
    calls = []

    def fake_varlen(q, k, v, *args, **kwargs):
        calls.append((q.shape[1], k.shape[1], kwargs))
        return torch.zeros_like(q)
    monkeypatch.setattr(attention, "_torch_varlen", lambda: fake_varlen)
    gen = torch.Generator().manual_seed(rng_seed)
    docs = Documents.from_lengths([3, 5], "cpu")
    q, k, v = (torch.randn(8, h, 16, generator=gen) for h in (4, 2, 2))
    monkeypatch.setattr(attention, "_varlen_parameters", lambda: frozenset({"scale", "window_size"}))
    assert_close_rel(packed_attention(q, k, v, docs, None, "torch-varlen"), dense_mask_attention(q, k, v, docs, None),
                     FP32_REL, "GQA without enable_gqa")
    assert not calls
    packed_attention(q, k[:, [0, 0, 1, 1]], v[:, [0, 0, 1, 1]], docs, None, "torch-varlen")  # MHA: varlen
    assert calls == [(4, 4, {"scale": 0.25, "window_size": (-1, 0)})]
    monkeypatch.setattr(attention, "_varlen_parameters", lambda: frozenset({"scale", "is_causal", "enable_gqa"}))
    packed_attention(q, k, v, docs, None, "torch-varlen")
    assert calls[-1] == (4, 2, {"scale": 0.25, "is_causal": True, "enable_gqa": True})
    calls.clear()
    windowed = packed_attention(q, k, v, docs, 2, "torch-varlen")  # no window_size: SDPA
    assert not calls
    assert_close_rel(windowed, dense_mask_attention(q, k, v, docs, 2), FP32_REL, "window without window_size")


@pytest.mark.parametrize("deterministic", [True, False])
def test_the_varlen_backward_runs_in_deterministic_mode_when_asked(deterministic, monkeypatch, rng_seed):
    """ATen's FlashAttention backward reads torch's deterministic mode (it then sums dq without atomics):
    with deterministic=True that mode is on while the varlen backward runs, and off again after; the
    gradients are those of the plain call. A stand-in varlen_attn (per-document SDPA) records the mode
    when its gradient flows."""
    gen = torch.Generator().manual_seed(rng_seed)
    docs = Documents.from_lengths([5, 1, 9], "cpu")
    seen = []

    def fake_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale=None, window_size=(-1, -1), enable_gqa=False):
        out = attention._sdpa_documents(q, k, v, docs.lengths, None, scale)
        if out.requires_grad:
            out.register_hook(lambda grad: seen.append(torch.are_deterministic_algorithms_enabled()))
        return out
    monkeypatch.setattr(attention, "_torch_varlen", lambda: fake_varlen)
    monkeypatch.setattr(attention, "_varlen_parameters", lambda: frozenset({"scale", "window_size", "enable_gqa"}))
    q, k, v = (torch.randn(15, h, 16, generator=gen, dtype=torch.float64).requires_grad_() for h in (4, 2, 2))
    grad = torch.randn(15, 4, 16, generator=gen, dtype=torch.float64)
    grads = []
    for wrapped in (deterministic, False):
        out = packed_attention(q, k, v, docs, None, "torch-varlen", deterministic=wrapped)
        grads.append(torch.autograd.grad(out, (q, k, v), grad))
    assert seen == [deterministic, False]
    assert not torch.are_deterministic_algorithms_enabled()
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)
    with torch.no_grad():  # no backward to come: the plain call
        packed_attention(q, k, v, docs, None, "torch-varlen", deterministic=True)


@pytest.mark.gpu
@pytest.mark.parametrize("window", [None, 64])
def test_torch_varlen_equals_per_document_sdpa_on_gpu(window, rng_seed):
    """CUDA: torch's FlashAttention varlen path (native GQA, windows) against per-document SDPA, bf16,
    forward and backward."""
    if attention._torch_varlen() is None:
        pytest.skip("this torch has no torch.nn.attention.varlen")
    if attention._varlen_options(True, window) is None:
        pytest.skip("this torch's varlen_attn cannot take grouped heads (no enable_gqa): GQA takes the SDPA path")
    gen = torch.Generator(device="cuda").manual_seed(rng_seed)
    docs = Documents.from_lengths([300, 1, 517, 64], "cuda")
    T = docs.num_tokens
    shape = lambda heads: (T, heads, 128)
    q, k, v = (torch.randn(shape(h), generator=gen, device="cuda", dtype=torch.bfloat16).requires_grad_()
               for h in (28, 4, 4))
    grad = torch.randn(shape(28), generator=gen, device="cuda", dtype=torch.bfloat16)
    results = []
    for backend in ("torch-varlen", "sdpa"):
        for t in (q, k, v):
            t.grad = None
        out = packed_attention(q, k, v, docs, window, backend)
        out.backward(grad)
        results.append([out.float(), q.grad.float(), k.grad.float(), v.grad.float()])
    for name, a, b in zip(("out", "dq", "dk", "dv"), *results, strict=True):
        assert_close_rel(a, b, 2**-6, f"varlen {name}")
