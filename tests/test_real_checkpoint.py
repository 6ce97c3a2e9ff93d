"""A real-format checkpoint nobody here wrote the settings for: Llama architecture, tied embeddings,
GQA ratio 3, a ChatML template in chat_template.jinja, config.json naming one eos id and
generation_config.json two (Llama-3 style). Checks the derived settings, the stop ids and the run
header; and that settings derived for a device fit its memory plan."""

from __future__ import annotations

import json

import pytest
import torch

from abs_fast.cli import main

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
END_OF_TEXT, IM_END = 151643, 151645


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    from abs_fast.model import load_qwen25_tokenizer

    root = tmp_path_factory.mktemp("llama") / "ckpt"
    tokenizer = load_qwen25_tokenizer()
    config = LlamaConfig(vocab_size=151936, hidden_size=96, intermediate_size=192, num_hidden_layers=2,
                         num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=True,
                         max_position_embeddings=4096, bos_token_id=END_OF_TEXT, eos_token_id=END_OF_TEXT)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(root)
    tokenizer.save_pretrained(root)
    (root / "chat_template.jinja").write_text(CHATML)
    tokenizer_config = json.loads((root / "tokenizer_config.json").read_text())
    tokenizer_config.pop("chat_template", None)
    tokenizer_config["eos_token"] = "<|endoftext|>"  # a base-model tokenizer: its eos is not the turn's end
    (root / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    (root / "generation_config.json").write_text(json.dumps({"bos_token_id": END_OF_TEXT,
                                                             "eos_token_id": [END_OF_TEXT, IM_END]}))
    return root


def test_stop_ids_come_from_generation_config_all_of_them(llama_dir):
    from abs_fast.model.policy import read_arch_config
    from abs_fast.train import TrainConfig
    from abs_fast.train.build import checkpoint_stop_ids, load_tokenizer_for

    arch = read_arch_config(llama_dir)[2]
    tokenizer = load_tokenizer_for(TrainConfig(model=str(llama_dir)))
    assert tokenizer.eos_token_id == END_OF_TEXT
    assert checkpoint_stop_ids(arch, tokenizer) == ((END_OF_TEXT, IM_END), "generation_config.json")
    (llama_dir / "generation_config.json").rename(llama_dir / "generation_config.json.off")
    try:  # then config.json's
        assert checkpoint_stop_ids(read_arch_config(llama_dir)[2], tokenizer) == ((END_OF_TEXT,), "config.json")
    finally:
        (llama_dir / "generation_config.json.off").rename(llama_dir / "generation_config.json")


def test_the_engine_stops_at_an_eos_id_only_generation_config_names(llama_dir, tmp_path):
    """Greedy decoding's first token, named as an eos id in generation_config.json alone, ends the turn
    there (config.json and the tokenizer name another)."""
    import shutil

    from abs_fast.model import load_policy
    from abs_fast.rollout import EmbeddedEngine, RolloutRequest, SamplingParams

    greedy = RolloutRequest(prompt_ids=[1, 2, 3], sampling=SamplingParams(max_new_tokens=6, temperature=0.0))
    policy = load_policy(llama_dir, quantize=None, adapters=(), device="cpu")
    [free] = EmbeddedEngine(policy, None, max_batch=1, max_seq_len=32, seed=0).generate([greedy])
    first = free.token_ids[0]
    assert first not in (END_OF_TEXT, IM_END) and len(free.token_ids) == 6
    copy = tmp_path / "ckpt"
    shutil.copytree(llama_dir, copy)
    (copy / "generation_config.json").write_text(json.dumps({"eos_token_id": [END_OF_TEXT, first]}))
    policy = load_policy(copy, quantize=None, adapters=(), device="cpu")
    [out] = EmbeddedEngine(policy, None, max_batch=1, max_seq_len=32, seed=0).generate([greedy])
    assert out.token_ids == [first] and out.finish_reason == "stop"


def test_train_without_a_preset_derives_real_settings_and_prints_the_header(llama_dir, tmp_path, capsys,
                                                                            monkeypatch):
    monkeypatch.setenv("ABS_FAST_BACKEND", "reference")
    run = tmp_path / "run"
    code = main(["train", "--model", str(llama_dir), "--output", str(run), "--set", "device=cpu", "steps=1",
                 "rollout_batch_size=2", "train_batch_size=2", "attacker_max_new_tokens=8", "defender_max_new_tokens=8",
                 "diagnostics_every=0", "progress=false", "tensorboard=false"])
    err = capsys.readouterr().err
    assert code == 0, err[-3000:]
    saved = json.loads((run / "config.json").read_text())
    # derived (not the tiny preset's lr 1e-3, 24-token turns, 512-token prompts, 16 engine rows) ...
    assert saved["lr_attacker"] == saved["lr_defender"] == 5e-5
    assert saved["max_prompt_tokens"] == 1024 and saved["engine_max_batch"] == 16 and saved["token_budget"] == 2048
    assert saved["steps"] == 1 and saved["attacker_max_new_tokens"] == 8  # ... and --set still wins
    assert "settings derived from the checkpoint" in err and "turns 256 tokens" in err, err[-3000:]
    header = next(line for line in err.splitlines() if line.startswith("checkpoint "))
    assert f"checkpoint {llama_dir}: llama," in header
    assert "tied embeddings" in header and "GQA 3:1 (6 query / 2 KV heads)" in header
    assert f"chat template from {llama_dir / 'chat_template.jinja'}" in header
    assert "stop ids 151643 <|endoftext|>, 151645 <|im_end|> (from generation_config.json)" in header


def test_info_describes_the_checkpoint(llama_dir, capsys):
    assert main(["info", "--model", str(llama_dir), "--json"]) == 0
    described = json.loads(capsys.readouterr().out)["checkpoint"]
    assert described["architecture"] == "llama" and described["tied_embeddings"] is True
    assert described["gqa_ratio"] == 3 and described["stop_ids"] == [END_OF_TEXT, IM_END]
    assert described["stop_source"] == "generation_config.json"
    assert main(["info", "--model", str(llama_dir)]) == 0
    assert "GQA 3:1" in capsys.readouterr().out


@pytest.mark.parametrize("shape", ["qwen2.5-3b", "qwen2.5-7b", "qwen2.5-14b"])
def test_derived_settings_fit_the_device_and_grow_with_it(tmp_path, shape):
    """Settings derived for a GPU of 24, 48, 80 or 141 GiB fit its memory plan wherever any rung does,
    and more memory never buys a smaller rung."""
    from abs_fast.model.tiny import qwen2_config
    from abs_fast.train import TrainConfig
    from abs_fast.train.defaults import derive_settings
    from abs_fast.train.plan import plan_memory

    qwen2_config(shape).save_pretrained(tmp_path)  # config.json only: nothing reads weights
    base = TrainConfig(model=str(tmp_path))
    previous = None
    for gib in (24, 48, 80, 141):
        derived = derive_settings(base, device="cuda", gpu_memory_gb=gib)
        values = derived.values
        config = TrainConfig(model=str(tmp_path), **values).validate()
        plan = plan_memory(config, gpu_memory_gb=gib, device="cuda")
        assert plan.fits is derived.fits
        assert values["attacker_max_new_tokens"] >= 256 and values["max_prompt_tokens"] == 1024
        assert 1e-5 <= values["lr_attacker"] <= 1e-4
        if previous is not None and previous.fits:
            assert derived.fits and values["engine_max_batch"] >= previous.values["engine_max_batch"]
        previous = derived
    assert previous.fits, f"{shape} fits no rung on 141 GiB"
