"""MultiLoRALinear: PEFT-style adapters over a frozen base, checked against PEFT itself."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import FP32_REL, assert_close_rel
from torch import nn

from abs_fast.model import MultiLoRALinear

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def randomise_adapters(layer: MultiLoRALinear, gen: torch.Generator) -> None:
    with torch.no_grad():
        for name in layer.adapter_names:
            layer.lora_A[name].copy_(torch.randn(layer.lora_A[name].shape, generator=gen) * 0.3)
            layer.lora_B[name].copy_(torch.randn(layer.lora_B[name].shape, generator=gen) * 0.3)


def test_new_adapter_is_peft_initialised_and_leaves_output_unchanged(rng_seed):
    gen = torch.Generator().manual_seed(rng_seed)
    layer = MultiLoRALinear(96, 40, device=DEVICE)
    layer.add_adapter("attacker", rank=16, alpha=32, generator=gen)
    a = layer.lora_A["attacker"]
    bound = 1 / math.sqrt(96)  # kaiming_uniform(a=sqrt(5)): gain sqrt(1/3) * sqrt(3 / fan_in)
    assert a.abs().max() <= bound and a.abs().max() > 0.9 * bound and a.std() > 0.5 * bound / math.sqrt(3)
    assert torch.count_nonzero(layer.lora_B["attacker"]) == 0
    x = torch.randn(13, 96, generator=gen).to(DEVICE)
    ids = torch.randint(-1, 1, (13,), generator=gen).to(DEVICE)
    # B = 0: the adapter adds exactly nothing; only the base product's summation order may differ
    assert_close_rel(layer(x, ids), F.linear(x.double(), layer.weight.double(), layer.bias.double()), FP32_REL,
                     "output of a fresh adapter")


def test_base_is_frozen_and_only_used_adapters_learn(rng_seed):
    gen = torch.Generator().manual_seed(rng_seed)
    layer = MultiLoRALinear(32, 24, device=DEVICE)
    for name in ("attacker", "defender", "spare"):
        layer.add_adapter(name, rank=4, alpha=8)
    randomise_adapters(layer, gen)
    x = torch.randn(20, 32, generator=gen).to(DEVICE)
    ids = torch.randint(-1, 2, (20,), generator=gen).to(DEVICE)  # "spare" (id 2) never used
    layer(x, ids).square().sum().backward()
    assert layer.weight.grad is None and layer.bias.grad is None
    assert not layer.weight.requires_grad
    for name in ("attacker", "defender"):
        assert layer.lora_A[name].grad.abs().sum() > 0 and layer.lora_B[name].grad.abs().sum() > 0
    assert torch.count_nonzero(layer.lora_A["spare"].grad) == 0


def test_mixed_ranks_match_separate_computation(rng_seed):
    gen = torch.Generator().manual_seed(rng_seed)
    layer = MultiLoRALinear(48, 36, device=DEVICE)
    layer.add_adapter("attacker", rank=1, alpha=2)
    layer.add_adapter("defender", rank=64, alpha=16)
    randomise_adapters(layer, gen)
    x = torch.randn(30, 48, generator=gen).to(DEVICE)
    ids = torch.randint(-1, 2, (30,), generator=gen).to(DEVICE)
    y = layer(x, ids)
    want = F.linear(x.double(), layer.weight.double(), layer.bias.double())
    for i, name in enumerate(layer.adapter_names):
        rows = ids == i
        a, b = layer.lora_A[name].double(), layer.lora_B[name].double()
        want[rows] += layer.alphas[name] / layer.ranks[name] * (x[rows].double() @ a.T) @ b.T
    assert_close_rel(y, want, FP32_REL, "mixed ranks")


def test_from_linear_shares_the_weight_without_copy():
    linear = nn.Linear(20, 12).to(DEVICE)
    layer = MultiLoRALinear.from_linear(linear)
    assert layer.weight.data_ptr() == linear.weight.data_ptr()
    assert layer.bias.data_ptr() == linear.bias.data_ptr()
    assert not layer.weight.requires_grad


def test_adapter_management_errors():
    layer = MultiLoRALinear(8, 8)
    layer.add_adapter("attacker", rank=2, alpha=16)
    with pytest.raises(ValueError, match="already exists"):
        layer.add_adapter("attacker")
    with pytest.raises(ValueError, match="identifier"):
        layer.add_adapter("bad name")
    with pytest.raises(ValueError, match="rank must be"):
        layer.add_adapter("defender", rank=0)
    with pytest.raises(KeyError, match="no adapter named 'defender'"):
        layer.delete_adapter("defender")
    layer.add_adapter("defender", rank=4, alpha=4)
    assert layer.adapter_id("defender") == 1 and layer.scaling.tolist() == [8.0, 1.0]
    layer.delete_adapter("attacker")
    assert layer.adapter_names == ["defender"] and layer.scaling.tolist() == [1.0]
    assert "defender(r=4, alpha=4)" in repr(layer)
    empty = MultiLoRALinear(8, 8)
    with pytest.raises(ValueError, match="has none"):
        empty(torch.randn(2, 8), torch.tensor([0, -1]))


class _TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(40, 28)

    def forward(self, x):
        return self.proj(x)


def _peft_twin(rng_seed):
    """A PEFT model with adapters attacker/defender and an abs-fast layer holding the same numbers."""
    peft = pytest.importorskip("peft")
    gen = torch.Generator().manual_seed(rng_seed)
    base = _TwoLayer().to(DEVICE)
    model = peft.get_peft_model(base, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["proj"]),
                                adapter_name="attacker")
    model.add_adapter("defender", peft.LoraConfig(r=4, lora_alpha=12, target_modules=["proj"]))
    ours = MultiLoRALinear.from_linear(base.proj.base_layer)
    ours.add_adapter("attacker", rank=8, alpha=16)
    ours.add_adapter("defender", rank=4, alpha=12)
    randomise_adapters(ours, gen)
    with torch.no_grad():
        for name in ("attacker", "defender"):
            base.proj.lora_A[name].weight.copy_(ours.lora_A[name])
            base.proj.lora_B[name].weight.copy_(ours.lora_B[name])
    return model, ours, gen


def test_mixed_batch_matches_peft(rng_seed):
    model, ours, gen = _peft_twin(rng_seed)
    x = torch.randn(5, 7, 40, generator=gen).to(DEVICE)
    names = ["attacker", "__base__", "defender", "defender", "attacker"]
    model.eval()
    with torch.no_grad():
        want = model(x, adapter_names=names)
    ids_per_sample = torch.tensor([{"attacker": 0, "defender": 1, "__base__": -1}[n] for n in names])
    ids = ids_per_sample[:, None].expand(5, 7).to(DEVICE)
    got = ours(x, ids)
    assert_close_rel(got, want, FP32_REL, "mixed batch vs PEFT")


@pytest.mark.parametrize("adapter", ["attacker", "defender"])
def test_gradients_match_peft(adapter, rng_seed):
    model, ours, gen = _peft_twin(rng_seed)
    model.train()
    model.set_adapter(adapter)
    x = torch.randn(6, 40, generator=gen).to(DEVICE)
    grad_out = torch.randn(6, 28, generator=gen).to(DEVICE)
    model(x).backward(grad_out)
    ours(x, torch.full((6,), ours.adapter_id(adapter), device=DEVICE)).backward(grad_out)
    proj = model.base_model.model.proj
    assert_close_rel(ours.lora_A[adapter].grad, proj.lora_A[adapter].weight.grad, FP32_REL, "d lora_A vs PEFT")
    assert_close_rel(ours.lora_B[adapter].grad, proj.lora_B[adapter].weight.grad, FP32_REL, "d lora_B vs PEFT")
