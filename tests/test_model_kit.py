"""Tiny-model kit: Qwen2 presets at the real Qwen2.5 shapes, seeded random weights."""

import pytest
import torch

from abs_fast.model import PRESETS, build_model, linear_shapes, qwen2_config

# Parameter counts of the released checkpoints (embeddings tied in 3B, untied in 7B and 14B).
RELEASED_PARAMETERS = {"qwen2.5-3b": 3_085_938_688, "qwen2.5-7b": 7_615_616_512, "qwen2.5-14b": 14_770_033_664}


@pytest.mark.parametrize("preset", sorted(RELEASED_PARAMETERS))
def test_full_size_presets_have_the_released_shapes(preset):
    model = build_model(preset, device="meta")
    assert sum(p.numel() for p in model.parameters()) == RELEASED_PARAMETERS[preset]
    layer = model.model.layers[0]
    for name, (out_features, in_features) in linear_shapes(preset).items():
        module = getattr(layer.self_attn, name, None) or getattr(layer.mlp, name)
        assert (module.out_features, module.in_features) == (out_features, in_features), name


def test_7b_layer_shapes_are_the_benchmark_shapes():
    assert linear_shapes("qwen2.5-7b") == {
        "q_proj": (3584, 3584), "k_proj": (512, 3584), "v_proj": (512, 3584), "o_proj": (3584, 3584),
        "gate_proj": (18944, 3584), "up_proj": (18944, 3584), "down_proj": (3584, 18944)}


def test_tiny_model_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a, b, c = build_model("tiny", seed=7), build_model("tiny", seed=7), build_model("tiny", seed=8)
    assert torch.equal(torch.get_rng_state(), before)
    pa, pb, pc = (dict(m.named_parameters()) for m in (a, b, c))
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert not torch.equal(pa["model.layers.0.self_attn.q_proj.weight"], pc["model.layers.0.self_attn.q_proj.weight"])
    assert pa["model.layers.0.self_attn.q_proj.weight"].std() > 0  # random, not zeros


def test_tiny_model_runs_on_real_token_ids():
    model = build_model("tiny", seed=0)
    ids = torch.tensor([[151644, 9707, 1879, 0, 151645]])
    logits = model(ids).logits
    assert logits.shape == (1, 5, PRESETS["tiny"]["vocab_size"])
    assert torch.isfinite(logits).all()


def test_unknown_preset_is_named():
    with pytest.raises(ValueError, match="unknown preset 'qwen3'"):
        qwen2_config("qwen3")
