"""RMSNorm, SwiGLU and RoPE of the decoder layers: the memory-lean PyTorch versions against plain
autograd (Hugging Face's formulas), and Liger-Kernel's ops against them where Liger runs."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from helpers import FP32_REL, assert_close_rel

from abs_fast.ops.layers import layer_kernels, rms_norm, rotary, swiglu


def hf_rms_norm(x, weight, eps):
    dtype = x.dtype
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)


def hf_rotary(q, k, cos, sin):
    half = q.shape[-1] // 2
    rotate = lambda t: torch.cat((-t[..., half:], t[..., :half]), dim=-1)
    cos, sin = cos[:, None], sin[:, None]
    return q * cos + rotate(q) * sin, k * cos + rotate(k) * sin


def _grads(fn, *inputs):
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    gen = torch.Generator().manual_seed(0)
    loss = sum((o.float() * torch.randn(o.shape, generator=gen).to(o.device)).sum() for o in outs)
    loss.backward()
    return [o.detach() for o in outs], [t.grad for t in inputs]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_torch_layer_ops_equal_plain_autograd(dtype, rng_seed):
    gen = torch.Generator().manual_seed(rng_seed)
    x = (torch.randn(37, 64, generator=gen) * 3).to(dtype)
    weight = (torch.rand(64, generator=gen) + 0.5).to(dtype)
    rel = FP32_REL if dtype == torch.float32 else 2**-7
    (ours,), (dx,) = _grads(lambda t: rms_norm(t, weight, 1e-6), x)
    (theirs,), (dx_ref,) = _grads(lambda t: hf_rms_norm(t, weight, 1e-6), x)
    assert torch.equal(ours, theirs), "the forward must be bit-identical to Hugging Face's"
    assert_close_rel(dx.float(), dx_ref.float(), rel, "RMSNorm dx")
    gate, up = torch.randn(37, 96, generator=gen).to(dtype), torch.randn(37, 96, generator=gen).to(dtype)
    (ours,), grads = _grads(lambda g, u: swiglu(g, u), gate, up)
    (theirs,), grads_ref = _grads(lambda g, u: F.silu(g) * u, gate, up)
    assert torch.equal(ours, theirs)
    for name, a, b in zip(("dgate", "dup"), grads, grads_ref, strict=True):
        assert_close_rel(a.float(), b.float(), rel, f"SwiGLU {name}")
    q, k = torch.randn(11, 6, 16, generator=gen).to(dtype), torch.randn(11, 2, 16, generator=gen).to(dtype)
    angles = torch.rand(11, 8, generator=gen) * 6
    cos, sin = torch.cat([angles.cos()] * 2, -1).to(dtype), torch.cat([angles.sin()] * 2, -1).to(dtype)
    assert all(torch.equal(a, b) for a, b in zip(rotary(q, k, cos, sin), hf_rotary(q, k, cos, sin), strict=True))


def test_torch_layer_ops_save_less_for_backward(rng_seed):
    """RMSNorm keeps its input in the model dtype plus one fp32 value per row (not an fp32 copy of the
    input); SwiGLU keeps gate and up only."""
    gen = torch.Generator().manual_seed(rng_seed)
    x = torch.randn(64, 256, generator=gen, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.ones(256, dtype=torch.bfloat16)

    def saved_bytes(fn, *args):
        total = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: (total.append(t.numel() * t.element_size()), t)[1],
                                                      lambda t: t):
            fn(*args)
        return sum(total)
    ours, theirs = saved_bytes(lambda: rms_norm(x, weight, 1e-6)), saved_bytes(lambda: hf_rms_norm(x, weight, 1e-6))
    assert ours <= 64 * 256 * 2 + 64 * 4 + 256 * 2 < theirs
    gate = torch.randn(64, 256, generator=gen, dtype=torch.bfloat16, requires_grad=True)
    up = torch.randn(64, 256, generator=gen, dtype=torch.bfloat16, requires_grad=True)
    assert saved_bytes(lambda: swiglu(gate, up)) == 2 * 64 * 256 * 2 < saved_bytes(lambda: F.silu(gate) * up)


def _liger_runs() -> str | None:
    """Why the Liger comparison cannot run here (None when it can)."""
    if importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel is not installed (pip install abs-fast[gpu])"
    if not torch.cuda.is_available():
        return ("needs a CUDA GPU: Liger's kernels call libdevice (rsqrt), which the Triton interpreter does not "
                "run (tests/triton_interpreter.py)")
    return None


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_liger_layer_ops_equal_the_fallbacks(dtype, monkeypatch, rng_seed):
    """Liger's Triton ops on a GPU against the PyTorch versions, forward and backward."""
    reason = _liger_runs()
    if reason:
        pytest.skip(reason)
    device = "cuda"
    monkeypatch.setenv("ABS_FAST_LAYER_KERNELS", "liger")
    assert layer_kernels(torch.device(device)) == "liger"
    gen = torch.Generator().manual_seed(rng_seed)
    x = (torch.randn(37, 64, generator=gen) * 3).to(dtype).to(device)
    weight = (torch.rand(64, generator=gen) + 0.5).to(dtype).to(device)
    rel = FP32_REL * 10 if dtype == torch.float32 else 2**-6
    for fn_name, fn, inputs in (
        ("rms_norm", lambda kernels: lambda t: rms_norm(t, weight, 1e-6, kernels), (x,)),
        ("swiglu", lambda kernels: lambda g, u: swiglu(g, u, kernels),
         tuple(torch.randn(37, 96, generator=gen).to(dtype).to(device) for _ in range(2))),
    ):
        liger_out, liger_grads = _grads(fn("liger"), *inputs)
        torch_out, torch_grads = _grads(fn("torch"), *inputs)
        for a, b in zip(liger_out + liger_grads, torch_out + torch_grads, strict=True):
            assert_close_rel(a.float().cpu(), b.float().cpu(), rel, f"liger {fn_name}")
    q = torch.randn(11, 6, 16, generator=gen).to(dtype).to(device)
    k = torch.randn(11, 2, 16, generator=gen).to(dtype).to(device)
    angles = torch.rand(11, 8, generator=gen) * 6
    cos = torch.cat([angles.cos()] * 2, -1).to(dtype).to(device)
    sin = torch.cat([angles.sin()] * 2, -1).to(dtype).to(device)
    liger = rotary(q.clone(), k.clone(), cos, sin, "liger")
    for a, b in zip(liger, rotary(q, k, cos, sin), strict=True):
        assert_close_rel(a.float().cpu(), b.float().cpu(), rel, "liger rotary")


def test_layer_recompute_keeps_gradients_and_saves_less(rng_seed):
    """A decoder layer in training keeps neither its norms' outputs nor SwiGLU's output for backward
    (recomputed from what their own ops keep): the gradients are bit-identical, the saved bytes fewer."""
    import abs_fast.model.transformer as transformer
    from abs_fast.model import load_policy
    from abs_fast.model.attention import Documents, PackedBatch
    from abs_fast.ops.routing import AdapterRouting

    policy = load_policy("tiny", quantize=None, device="cpu", rank=4, alpha=8, seed=rng_seed % 1000)
    gen = torch.Generator().manual_seed(rng_seed)
    with torch.no_grad():
        for p in policy.adapter_parameters("attacker") + policy.adapter_parameters("defender"):
            p.normal_(0, 0.1, generator=gen)
    layer, T = policy.model.model.layers[0], 24
    x = torch.randn(T, policy.config.hidden_size, generator=gen)
    routing = AdapterRouting.from_ids(torch.randint(-1, 2, (T,), generator=gen), 2)
    batch = PackedBatch(Documents.from_lengths([10, 14], "cpu"))
    positions = torch.cat([torch.arange(10), torch.arange(14)])
    cos, sin = (t[0] for t in policy.model.rotary(x[None], positions[None]))
    saved = {True: 0, False: 0}
    original = transformer._Recompute.pack
    results = {}
    for recompute in (False, True):
        policy.zero_grad(set_to_none=True)
        xin = x.clone().requires_grad_()

        def count(self, t, _recompute=recompute):
            packed = original(self, t)
            if packed is t:
                saved[_recompute] += t.numel() * t.element_size()
            return packed

        def outer(t, _recompute=recompute):
            saved[_recompute] += t.numel() * t.element_size() if not (t.is_leaf and t.requires_grad) else 0
            return t

        transformer._Recompute.pack = count
        try:
            with torch.autograd.graph.saved_tensors_hooks(outer, lambda t: t):
                out = layer(xin, routing, cos, sin, batch, recompute=recompute)
        finally:
            transformer._Recompute.pack = original
        (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        results[recompute] = [xin.grad] + [p.grad for p in policy.adapter_parameters("attacker")
                                             + policy.adapter_parameters("defender")]
    pairs = [(a, b) for a, b in zip(results[True], results[False], strict=True) if a is not None or b is not None]
    assert len(pairs) > 10 and all(torch.equal(a, b) for a, b in pairs)
    h, inter = policy.config.hidden_size, policy.config.intermediate_size
    assert saved[False] - saved[True] >= T * (2 * h + inter) * 4 * 0.99
