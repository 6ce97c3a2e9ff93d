"""The policy model against Hugging Face and PEFT: loading, adapters, packing, per-token adapter ids."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from helpers import FP32_REL, assert_close_rel

from abs_fast.model import build_model, load_policy
from abs_fast.quant import NF4Weight

# Model-level tests run the PyTorch reference of lora_linear (the kernels have their own tests;
# the Triton interpreter would make a whole model slow).
pytestmark = pytest.mark.usefixtures("reference_backend")
PEFT_REL = 1e-4  # the acceptance tolerance for PEFT equivalence (fp32)


@pytest.fixture
def reference_backend(monkeypatch):
    monkeypatch.setenv("ABS_FAST_BACKEND", "reference")


def _save_hf(model, path) -> str:
    model.save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    return _save_hf(build_model("tiny", seed=3), tmp_path_factory.mktemp("qwen"))


def _hf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _randomise_adapters(policy, seed: int, std: float = 0.05) -> None:
    """Non-zero B (PEFT starts it at zero, which would hide a wrong B or scaling)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in policy.target_layers().values():
            for name in layer.adapter_names:
                layer.lora_B[name].copy_(torch.randn(layer.lora_B[name].shape, generator=gen) * std)


def _ids(seed: int, shape, vocab: int = 151936) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


# --- the base model ------------------------------------------------------------------------


def _small(family: str):
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    common = dict(hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=300, max_position_embeddings=256, rms_norm_eps=1e-5)
    if family == "llama":  # biases everywhere, llama3 RoPE scaling, untied head
        config = LlamaConfig(**common, attention_bias=True, mlp_bias=True, tie_word_embeddings=False,
                             rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                              "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                              "original_max_position_embeddings": 64})
        cls = LlamaForCausalLM
    else:  # a sliding window shorter than the test sequences
        config = MistralConfig(**common, sliding_window=4, tie_word_embeddings=False)
        cls = MistralForCausalLM
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return cls(config).eval()


@pytest.mark.parametrize("family", ["qwen2", "llama", "mistral"])
def test_dense_base_equals_hugging_face(family, tmp_path, rng_seed):
    hf = build_model("tiny", seed=rng_seed % 1000) if family == "qwen2" else _small(family)
    path = _save_hf(hf, tmp_path)
    policy = load_policy(path, quantize=None, device="cpu")
    ids = _ids(rng_seed, (3, 11), hf.config.vocab_size)
    with torch.no_grad():
        expected = hf(ids).logits
        actual = policy.logits(ids)  # adapters exist but their B is zero: the base
        assert_close_rel(actual, expected, FP32_REL, f"{family} logits")
        assert_close_rel(policy.logits(ids, [-1, -1, -1]), expected, FP32_REL, f"{family} logits, ids -1")


def test_nf4_base_equals_the_dequantised_dense_model(qwen_dir, rng_seed):
    hf = _hf(qwen_dir)
    with torch.no_grad():  # what NF4 loading must compute: every projection's weight dequantised
        for name, module in hf.named_modules():
            if name.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                           "down_proj"):
                module.weight.copy_(NF4Weight.quantize(module.weight, 64).dequantize(torch.float32))
    policy = load_policy(qwen_dir, quantize="nf4", device="cpu")
    assert all(layer.is_quantized for layer in policy.model.target_layers().values())
    assert policy.model.lm_head_weight.dtype == torch.float32  # head and embeddings stay dense
    ids = _ids(rng_seed, (2, 9))
    with torch.no_grad():
        assert_close_rel(policy.logits(ids), hf(ids).logits, FP32_REL, "NF4 logits")


def _bnb_4bit(path, double_quant: bool):
    """transformers' own 4-bit model of the checkpoint at `path`, quantised by bitsandbytes on CPU (its
    quantiser only: the tests never run bitsandbytes' CPU 4-bit forward, which depends on the CPU's
    features: on AVX512-BF16 it repacks weights and asserts out_features % 32 == 0, elsewhere it differs
    from bitsandbytes' own dequantised weights by ~5e-3 relative)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant,
                                bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=config, device_map="cpu",
                                                dtype=torch.float32).eval()


def _decode_bnb_checkpoint_float64(tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """The weight `name` of a saved bitsandbytes NF4 checkpoint, decoded in float64 from its raw
    tensors by the format's definition (written here, independent of abs-fast's loader and of any
    CPU kernel): high nibble first, code[q] * absmax of the block; with nested statistics the
    absmax is nested_code[q2] * nested_absmax[block // nested_blocksize] + offset."""
    state_key = next(k for k in tensors if k.startswith(f"{name}.quant_state.bitsandbytes__"))
    state = json.loads(bytes(tensors[state_key].tolist()).decode())
    packed = tensors[name].reshape(-1).view(torch.uint8).long()
    codes = torch.stack([packed >> 4, packed & 15], dim=1).reshape(-1)
    numel = math.prod(state["shape"])
    codes = codes[:numel]
    if "nested_blocksize" in state:
        q2 = tensors[f"{name}.absmax"].reshape(-1).long()
        nested = tensors[f"{name}.nested_absmax"].double().reshape(-1)
        block = torch.arange(q2.numel()) // int(state["nested_blocksize"])
        absmax = tensors[f"{name}.nested_quant_map"].double()[q2] * nested[block] + float(state["nested_offset"])
    else:
        absmax = tensors[f"{name}.absmax"].double().reshape(-1)
    values = tensors[f"{name}.quant_map"].double()[codes] * absmax[torch.arange(numel) // int(state["blocksize"])]
    return values.reshape(state["shape"])


def _dense_model_of_bnb_checkpoint(dense_dir, bnb_dir, family: str):
    """The dense model of `dense_dir` with every 4-bit weight of the checkpoint in `bnb_dir` replaced by
    its float64 decoding (rounded once to fp32): what any correct NF4 forward must compute."""
    from safetensors.torch import load_file

    tensors = {}
    for file in sorted(Path(bnb_dir).glob("*.safetensors")):
        tensors.update(load_file(file))
    hf = _hf(dense_dir)
    replaced = 0
    with torch.no_grad():
        for name, module in hf.named_modules():
            key = f"{name}.weight"
            if f"{key}.absmax" in tensors:
                module.weight.copy_(_decode_bnb_checkpoint_float64(tensors, key).float())
                replaced += 1
    assert replaced == 7 * hf.config.num_hidden_layers, f"{family}: {replaced} quantised weights found"
    return hf


@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "no-dq"])
@pytest.mark.parametrize("family", ["qwen2", "llama", "mistral"])
def test_prequantised_bitsandbytes_checkpoint_loads_its_codes(family, double_quant, tmp_path, rng_seed):
    """A checkpoint that transformers saves from a BitsAndBytesConfig model: packed uint8 weights with
    .absmax, .quant_map, .nested_* and a JSON quant state. load_policy reads the codes as they are
    (bit-equal to bitsandbytes' own) and its logits equal a dense model carrying the checkpoint's
    weights decoded in float64 (the reference is exact math, never a CPU kernel of bitsandbytes)."""
    pytest.importorskip("bitsandbytes")
    hf = build_model("tiny", seed=rng_seed % 1000) if family == "qwen2" else _small(family)
    dense_dir = _save_hf(hf, tmp_path / "dense")
    quantised = _bnb_4bit(dense_dir, double_quant)
    quantised.save_pretrained(str(tmp_path / "bnb"))
    policy = load_policy(tmp_path / "bnb", quantize="nf4", device="cpu")
    layer = policy.model.model.layers[0].self_attn.q_proj
    bnb_weight = quantised.model.layers[0].self_attn.q_proj.weight
    assert layer.is_quantized and layer.base_weight.double_quant == double_quant
    assert torch.equal(layer.base_weight.packed, bnb_weight.data.reshape(-1).view(torch.uint8))
    ids = _ids(rng_seed, (2, 9), hf.config.vocab_size)
    with torch.no_grad():
        reference = _dense_model_of_bnb_checkpoint(dense_dir, tmp_path / "bnb", family)
        expected = reference(ids).logits
        assert (expected - hf(ids).logits).abs().max() > 1e-4, "quantisation changed nothing: the test could not fail"
        assert_close_rel(policy.logits(ids), expected, FP32_REL, f"{family} bnb-4bit logits")
        dense_policy = load_policy(tmp_path / "bnb", quantize=None, device="cpu")  # dequantised on load
        assert_close_rel(dense_policy.logits(ids), expected, FP32_REL, f"{family} dequantised logits")


def test_unsupported_quantised_checkpoints_are_refused(tmp_path):
    path = Path(_save_hf(_small("llama"), tmp_path))
    config = json.loads((path / "config.json").read_text())
    for quantization, what in (({"quant_method": "gptq", "bits": 4}, "'gptq'"),
                               ({"quant_method": "bitsandbytes", "load_in_8bit": True}, "8-bit")):
        (path / "config.json").write_text(json.dumps({**config, "quantization_config": quantization}))
        with pytest.raises(ValueError, match=what):
            load_policy(path, device="cpu")


def test_preset_loads_random_weights_reproducibly():
    a = load_policy("tiny", quantize="nf4", device="cpu", seed=5)
    b = load_policy("tiny", quantize="nf4", device="cpu", seed=5)
    c = load_policy("tiny", quantize="nf4", device="cpu", seed=6)
    ids = _ids(0, (1, 6))
    with torch.no_grad():
        assert torch.equal(a.logits(ids), b.logits(ids))
        assert not torch.equal(a.logits(ids), c.logits(ids))


# --- adapters in PEFT format ----------------------------------------------------------------


def test_saved_adapters_load_in_peft_with_the_same_logits(qwen_dir, tmp_path, rng_seed):
    from peft import PeftModel

    policy = load_policy(qwen_dir, quantize=None, device="cpu", rank=8, alpha=16)
    _randomise_adapters(policy, rng_seed)
    policy.save_adapters(tmp_path / "adapters")
    for name in ("attacker", "defender"):
        files = sorted(os.listdir(tmp_path / "adapters" / name))
        assert files == ["adapter_config.json", "adapter_model.safetensors"]
        config = json.loads((tmp_path / "adapters" / name / "adapter_config.json").read_text())
        assert config["peft_type"] == "LORA" and config["r"] == 8 and config["lora_alpha"] == 16
        assert sorted(config["target_modules"]) == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                           "up_proj", "down_proj"])
    ids = _ids(rng_seed, (2, 10))
    peft_model = PeftModel.from_pretrained(_hf(qwen_dir), str(tmp_path / "adapters" / "attacker"),
                                           adapter_name="attacker")
    peft_model.load_adapter(str(tmp_path / "adapters" / "defender"), adapter_name="defender")
    peft_model.eval()
    with torch.no_grad():
        base = _hf(qwen_dir)(ids).logits
        for name in ("attacker", "defender"):
            peft_model.set_adapter(name)
            expected = peft_model(ids).logits
            assert (expected - base).abs().max() > 1e-3, "the adapter changes nothing: the test could not fail"
            assert_close_rel(policy.logits(ids, [name, name]), expected, PEFT_REL, f"{name} vs PEFT")


@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
def test_peft_trained_adapter_loads_with_the_same_logits(qwen_dir, tmp_path, rng_seed, rslora):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0,
                        use_rslora=rslora, task_type="CAUSAL_LM")
    peft_model = get_peft_model(_hf(qwen_dir), config)
    gen = torch.Generator().manual_seed(rng_seed)
    with torch.no_grad():  # a "trained" adapter: every LoRA weight random
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    peft_model.save_pretrained(str(tmp_path / "peft"))
    peft_model.eval()

    policy = load_policy(qwen_dir, quantize=None, device="cpu", adapters=("attacker",), rank=16)
    loaded = policy.load_adapters(tmp_path / "peft")  # PEFT's single-adapter layout: the files at the top
    assert loaded == ["peft"] and policy.adapter_names == ["attacker", "peft"]
    ids = _ids(rng_seed, (2, 8))
    with torch.no_grad():
        assert_close_rel(policy.logits(ids, ["peft", "peft"]), peft_model(ids).logits, PEFT_REL, "PEFT adapter")
        # layers PEFT did not target carry a no-op adapter; the other adapter is untouched
        assert_close_rel(policy.logits(ids, ["attacker", "attacker"]), _hf(qwen_dir)(ids).logits, FP32_REL,
                         "untouched adapter")
    # and it saves back to files PEFT reads into the same function
    policy.save_adapters(tmp_path / "again", ["peft"])
    from peft import PeftModel

    reloaded = PeftModel.from_pretrained(_hf(qwen_dir), str(tmp_path / "again" / "peft")).eval()
    with torch.no_grad():
        assert_close_rel(reloaded(ids).logits, peft_model(ids).logits, PEFT_REL, "round trip through abs-fast")


def test_load_adapters_round_trip_keeps_parameter_objects(qwen_dir, tmp_path, rng_seed):
    policy = load_policy(qwen_dir, quantize="nf4", device="cpu")
    _randomise_adapters(policy, rng_seed)
    ids = _ids(rng_seed, (2, 7))
    with torch.no_grad():
        expected = {n: policy.logits(ids, [n, n]) for n in policy.adapter_names}
    policy.save_adapters(tmp_path)
    params = policy.adapter_parameters("attacker")
    _randomise_adapters(policy, rng_seed + 1)
    assert policy.load_adapters(tmp_path) == ["attacker", "defender"]
    assert all(a is b for a, b in zip(params, policy.adapter_parameters("attacker"), strict=True))
    with torch.no_grad():
        for n, logits in expected.items():
            assert torch.equal(policy.logits(ids, [n, n]), logits)


def test_an_interrupted_save_leaves_the_previous_adapter(qwen_dir, tmp_path, monkeypatch, rng_seed):
    import abs_fast.model.adapters as adapters_module

    policy = load_policy(qwen_dir, quantize=None, device="cpu")
    _randomise_adapters(policy, rng_seed)
    policy.save_adapters(tmp_path)
    before = (tmp_path / "attacker" / "adapter_model.safetensors").read_bytes()
    _randomise_adapters(policy, rng_seed + 1)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(adapters_module, "atomic_write_text", crash)  # after the weights were written
    with pytest.raises(KeyboardInterrupt):
        policy.save_adapters(tmp_path, ["attacker"])
    assert (tmp_path / "attacker" / "adapter_model.safetensors").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["attacker", "defender"], "staging directories left behind"


# --- packing and per-token adapter ids ------------------------------------------------------


def test_packed_row_equals_each_sequence_alone(qwen_dir, rng_seed):
    policy = load_policy(qwen_dir, quantize="nf4", device="cpu")
    _randomise_adapters(policy, rng_seed)
    lengths, adapters = [5, 1, 7, 3], ["attacker", "defender", None, "attacker"]
    seqs = [_ids(rng_seed + i, (1, n)) for i, n in enumerate(lengths)]
    packed = torch.cat(seqs, dim=1)
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    per_token = torch.cat([torch.full((n,), policy.adapter_id(a)) for n, a in zip(lengths, adapters, strict=True)])
    with torch.no_grad():
        together = policy.logits(packed, per_token[None], position_ids=positions)[0]
        alone = torch.cat([policy.logits(s, [a])[0] for s, a in zip(seqs, adapters, strict=True)])
    assert_close_rel(together, alone, FP32_REL, "packed vs separate")


def test_mixed_per_token_ids_equal_separate_single_adapter_forwards(qwen_dir, rng_seed):
    policy = load_policy(qwen_dir, quantize="nf4", device="cpu")
    _randomise_adapters(policy, rng_seed)
    ids = _ids(rng_seed, (3, 9))
    gen = torch.Generator().manual_seed(rng_seed)
    mixed = torch.randint(-1, 2, (3, 9), generator=gen)  # attacker, defender and base tokens interleaved
    with torch.no_grad():
        got = policy.logits(ids, mixed)
        separate = {a: policy.logits(ids, torch.full_like(mixed, a)) for a in (-1, 0, 1)}
    # a token sees earlier tokens through attention, so a position equals a single-adapter forward
    # when its whole prefix used that adapter (the packed test covers sequences side by side)
    checked = 0
    for row in range(3):
        for t in range(9):
            prefix = mixed[row, : t + 1]
            if bool((prefix == prefix[0]).all()):
                assert_close_rel(got[row, t], separate[int(prefix[0])][row, t], FP32_REL, f"row {row} token {t}")
                checked += 1
    assert checked >= 3
    assert (got - separate[0]).abs().max() > 1e-3, "mixing changed nothing: the test could not fail"
    # and per-row ids (one adapter per sequence) equal the single-adapter forwards exactly
    rows = torch.tensor([0, 1, -1])
    with torch.no_grad():
        by_row = policy.logits(ids, rows)
    for row, a in enumerate(rows.tolist()):
        assert_close_rel(by_row[row], separate[a][row], FP32_REL, f"row {row} adapter {a}")


def test_padded_batch_equals_each_sequence_alone(qwen_dir, rng_seed):
    policy = load_policy(qwen_dir, quantize=None, device="cpu")
    _randomise_adapters(policy, rng_seed)
    lengths = [6, 2, 4]
    batch = _ids(rng_seed, (3, 6))
    mask = torch.zeros(3, 6, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, 6 - n:] = 1  # left padding, as generation batches are laid out
    with torch.no_grad():
        padded = policy.logits(batch, ["attacker", "defender", "attacker"], attention_mask=mask)
        for i, (n, a) in enumerate(zip(lengths, ["attacker", "defender", "attacker"], strict=True)):
            alone = policy.logits(batch[i:i + 1, 6 - n:], [a])[0]
            assert_close_rel(padded[i, 6 - n:], alone, FP32_REL, f"row {i}")


def test_gradient_checkpointing_gives_the_same_gradients(qwen_dir, rng_seed):
    policy = load_policy(qwen_dir, quantize="nf4", device="cpu")
    _randomise_adapters(policy, rng_seed)
    ids = _ids(rng_seed, (2, 8))
    grads = []
    for enabled in (False, True):
        policy.gradient_checkpointing(enabled)
        policy.zero_grad()
        policy.logits(ids, torch.tensor([[0] * 8, [1] * 4 + [-1] * 4])).logsumexp(-1).sum().backward()
        grads.append([p.grad.clone() for p in policy.adapter_parameters("attacker")
                      + policy.adapter_parameters("defender")])
    assert all(g.abs().max() > 0 for g in grads[0][1::2]), "B gradients are zero: the test could not fail"
    for a, b in zip(*grads, strict=True):
        assert_close_rel(b, a, FP32_REL, "checkpointed gradient")


# --- errors name what is wrong --------------------------------------------------------------


def test_load_errors_name_the_path(tmp_path, qwen_dir):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        load_policy(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty/config\.json: missing"):
        load_policy(tmp_path / "empty")
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text(Path(qwen_dir, "config.json").read_text())
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors"):
        load_policy(no_weights)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "qwen2",\n "hidden_size": }')
    with pytest.raises(ValueError, match=r"broken/config\.json: line 2"):
        load_policy(broken)
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    raw = json.loads(Path(qwen_dir, "config.json").read_text())
    (gpt2 / "config.json").write_text(json.dumps({**raw, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match=r"gpt2/config\.json: model_type 'gpt2' is not supported"):
        load_policy(gpt2)


def test_missing_and_misshapen_tensors_are_named(tmp_path, qwen_dir):
    from safetensors.torch import load_file, save_file

    tensors = load_file(f"{qwen_dir}/model.safetensors")
    config = Path(qwen_dir, "config.json").read_text()
    for case, edit in (("missing", lambda t: t.pop("model.layers.1.mlp.up_proj.weight")),
                       ("misshapen", lambda t: t.__setitem__("model.norm.weight", torch.ones(3)))):
        d = tmp_path / case
        d.mkdir()
        (d / "config.json").write_text(config)
        edited = dict(tensors)
        edit(edited)
        save_file(edited, str(d / "model.safetensors"))
        pattern = "model.layers.1.mlp.up_proj.weight" if case == "missing" else r"model\.norm\.weight.*shape \(3,\)"
        with pytest.raises(ValueError, match=pattern):
            load_policy(d, quantize=None, device="cpu")


def test_adapter_ids_are_checked(qwen_dir):
    policy = load_policy(qwen_dir, quantize=None, device="cpu")
    ids = _ids(0, (2, 4))
    with pytest.raises(KeyError, match="no adapter named 'judge'"):
        policy.logits(ids, ["judge", "attacker"])
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        policy.logits(ids, torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="3 entries for a batch of 2"):
        policy.logits(ids, torch.tensor([0, 1, 0]))
