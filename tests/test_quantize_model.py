"""Model-level NF4: MultiLoRALinear with an NF4 base, and streaming quantisation of a whole model."""

from __future__ import annotations

import copy
import weakref

import pytest
import torch
from helpers import FP32_REL, assert_close_rel
from torch import nn

import abs_fast.quant.nf4 as nf4_module
from abs_fast.model import MultiLoRALinear, build_model, quantize_model_, quantized_linear_bytes
from abs_fast.quant import NF4Weight

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_quantisation_streams_layer_by_layer(monkeypatch):
    """When layer i is quantised, the dense weights of layers 0..i-1 are already freed."""
    model = build_model("tiny", seed=3)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    refs = [weakref.ref(model.get_submodule(n).weight) for n in names]  # the Parameter objects themselves
    assert all(r() is not None for r in refs)
    alive_before = []
    real_quantize = nf4_module.NF4Weight.quantize.__func__

    def spying_quantize(cls, w, *args, **kwargs):
        done = len(alive_before)
        alive_before.append(sum(r() is not None for r in refs[:done]))
        return real_quantize(cls, w, *args, **kwargs)

    monkeypatch.setattr(nf4_module.NF4Weight, "quantize", classmethod(spying_quantize))
    seen = []
    count = quantize_model_(model, progress=lambda i, total, name: seen.append((i, total, name)))
    assert count == len(names) == len(alive_before) and len(names) > 4
    assert alive_before == [0] * len(names), f"dense weights still alive when quantising: {alive_before}"
    assert [s[2] for s in seen] == names and seen[-1][:2] == (len(names), len(names))
    assert all(r() is None for r in refs)
    assert isinstance(model.lm_head, nn.Linear), "lm_head is skipped by default"


def test_quantised_model_equals_the_dequantised_dense_model(rng_seed):
    model = build_model("tiny", seed=rng_seed % 1000, device=DEVICE)
    dense = copy.deepcopy(model)
    quantize_model_(model, blocksize=64)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, MultiLoRALinear):
                dense.get_submodule(name).weight.copy_(module.base_weight.dequantize(torch.float32))
    gen = torch.Generator().manual_seed(rng_seed)
    input_ids = torch.randint(0, 2000, (2, 11), generator=gen).to(DEVICE)
    with torch.no_grad():
        got = model(input_ids).logits
        want = dense(input_ids).logits
    assert_close_rel(got, want, 1e-4, "logits of the NF4 model vs its dequantised dense twin")
    stored, params = quantized_linear_bytes(model)
    assert params == sum(m.base_weight.numel for m in model.modules() if isinstance(m, MultiLoRALinear))
    assert stored < params  # well under one byte per parameter, statistics included


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_nf4_layer_with_adapters_trains_like_its_dense_twin(backend, rng_seed, monkeypatch):
    monkeypatch.setenv("ABS_FAST_BACKEND", backend)
    gen = torch.Generator().manual_seed(rng_seed)
    linear = nn.Linear(96, 40).to(DEVICE)
    layer = MultiLoRALinear.from_linear(linear)
    for name, rank in (("attacker", 8), ("defender", 4)):
        layer.add_adapter(name, rank=rank, alpha=16, generator=gen)
        with torch.no_grad():
            layer.lora_B[name].copy_(torch.randn(40, rank, generator=gen) * 0.1)
    layer.quantize_base_()
    assert layer.weight is None and layer.is_quantized
    twin = MultiLoRALinear.from_linear(nn.Linear(96, 40).to(DEVICE))
    with torch.no_grad():
        twin.weight.copy_(layer.base_weight.dequantize(torch.float32))
        twin.bias.copy_(layer.bias)
    for name, rank in (("attacker", 8), ("defender", 4)):
        twin.add_adapter(name, rank=rank, alpha=16)
        with torch.no_grad():
            twin.lora_A[name].copy_(layer.lora_A[name])
            twin.lora_B[name].copy_(layer.lora_B[name])
    x = torch.randn(37, 96, generator=gen).to(DEVICE)
    ids = torch.randint(-1, 2, (37,), generator=gen).to(DEVICE)
    grad = torch.randn(37, 40, generator=gen).to(DEVICE)
    layer(x, ids).backward(grad)
    twin(x, ids).backward(grad)
    for name in ("attacker", "defender"):
        assert_close_rel(layer.lora_A[name].grad, twin.lora_A[name].grad, FP32_REL, f"{name} A grad")
        assert_close_rel(layer.lora_B[name].grad, twin.lora_B[name].grad, FP32_REL, f"{name} B grad")


def test_moving_an_nf4_layer_never_casts_its_codes():
    layer = MultiLoRALinear(128, 16)
    layer.quantize_base_()
    before = layer.base_weight.dequantize(torch.float32)
    layer.to(torch.bfloat16)
    assert layer.nf4_packed.dtype == torch.uint8 and layer.nf4_nested_absmax.dtype == torch.float32
    assert layer.bias.dtype == torch.bfloat16
    assert torch.equal(layer.base_weight.dequantize(torch.float32), before)
    assert isinstance(layer.base_weight, NF4Weight) and "nf4_packed" in layer.state_dict()


def test_quantising_twice_or_on_meta_is_refused():
    layer = MultiLoRALinear(64, 8)
    layer.quantize_base_()
    with pytest.raises(RuntimeError, match="already quantised"):
        layer.quantize_base_()
    with pytest.raises(RuntimeError, match="meta device"):
        MultiLoRALinear(64, 8, device="meta").quantize_base_()
