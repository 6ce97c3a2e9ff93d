"""The format warm start: the merge is exact, the command measures format validity before and after
on held-out seeds, writes a checkpoint train uses as its base, refuses what it cannot do, and train
warns at step 0 about a base that cannot play the format."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch

from abs_fast.cli import main
from abs_fast.model import build_model, load_policy, load_qwen25_tokenizer
from abs_fast.train.config import WarmstartSettings
from abs_fast.train.warmstart import WARMSTART_FILE, adapter_deltas, run_warmstart, write_merged_checkpoint

QUIET = ["progress=false", "tensorboard=false", "device=cpu", "diagnostics_every=0"]


@pytest.fixture(autouse=True)
def reference_backend(monkeypatch):
    monkeypatch.setenv("ABS_FAST_BACKEND", "reference")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny") / "model"
    build_model("tiny", seed=3).save_pretrained(root)
    load_qwen25_tokenizer().save_pretrained(root)
    return root


def test_the_merge_adds_alpha_over_r_b_a_to_each_weight_exactly(tiny_dir, tmp_path):
    """Merged weight = W + (alpha / r) B A, against a float64 sum; untouched tensors are byte-equal."""
    from safetensors.torch import load_file

    policy = load_policy(tiny_dir, quantize=None, adapters=("warmstart",), rank=4, alpha=8.0, device="cpu")
    gen = torch.Generator().manual_seed(0)
    for layer in policy.target_layers().values():
        layer.lora_B["warmstart"].data.copy_(torch.randn(layer.lora_B["warmstart"].shape, generator=gen))
    deltas = adapter_deltas(policy)
    out = tmp_path / "merged"
    out.mkdir()
    write_merged_checkpoint(tiny_dir, out, deltas)
    before, after = load_file(tiny_dir / "model.safetensors"), load_file(out / "model.safetensors")
    assert before.keys() == after.keys()
    layers = policy.target_layers()
    assert len(deltas) == len(layers) == 14
    for key, weight in before.items():
        path = key.removesuffix(".weight")
        if path in layers:
            layer = layers[path]
            want = weight.double() + 2.0 * (layer.lora_B["warmstart"].double() @ layer.lora_A["warmstart"].double())
            torch.testing.assert_close(after[key].double(), want, rtol=2e-7, atol=1e-7)
            assert not torch.equal(after[key], weight)
        else:
            assert torch.equal(after[key], weight), key
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (tiny_dir / name).read_bytes(), name


@pytest.mark.slow
def test_the_warm_start_raises_format_validity_and_train_uses_it(tmp_path, caplog, capsys):
    """On the demo's tiny base (it breaks the format in most turns), the warm start's measured format
    validity on held-out seeds rises for both roles, the record says so, and train --model runs on the
    result and names it in its header."""
    from abs_fast.train.demo import warm_start_base

    base = tmp_path / "base"
    shutil.copytree(warm_start_base(0), base)
    load_qwen25_tokenizer().save_pretrained(base)
    settings = WarmstartSettings(steps=60, examples=48, turn_tokens=32, eval_samples=4, lr=1e-3, quantize="none",
                                 device="cpu", engine_max_batch=64)
    record = run_warmstart(base, tmp_path / "warm", settings)
    before, after = record["validity_before"], record["validity_after"]
    assert after["attacker"] > before["attacker"] and after["defender"] > before["defender"], record
    saved = json.loads((tmp_path / "warm" / WARMSTART_FILE).read_text())
    assert saved["validity_after"] == after and saved["data"]["assembled"] > 0
    assert sorted(p.name for p in (tmp_path / "warm").iterdir() if p.name.startswith(".warmstart")) == []
    caplog.set_level(logging.INFO, logger="abs_fast")
    run = tmp_path / "run"
    code = main(["train", "--preset", "tiny", "--model", str(tmp_path / "warm"), "--output", str(run), "--set",
                 *QUIET, "steps=1", "rollout_batch_size=2", "train_batch_size=2", "attacker_max_new_tokens=32",
                 "defender_max_new_tokens=32"])
    assert code == 0, capsys.readouterr().err[-2000:]
    assert any(r.getMessage().startswith(f"warm-started from {base}: format validity attacker ")
               for r in caplog.records), [r.getMessage() for r in caplog.records][:5]


def test_train_warns_at_step_0_when_the_base_cannot_play_the_format(tiny_dir, tmp_path, caplog):
    """A random-weight base writes the format in none of its turns: step 1 (fresh adapters = the base)
    measures that, and the warning names the warm start."""
    caplog.set_level(logging.INFO, logger="abs_fast")
    code = main(["train", "--preset", "tiny", "--model", str(tiny_dir), "--output", str(tmp_path / "run"), "--set",
                 *QUIET, "steps=2", "rollout_batch_size=2", "train_batch_size=2", "attacker_max_new_tokens=8",
                 "defender_max_new_tokens=8"])
    assert code == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "step 0:" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "attacker 0%" in warnings[0] and f"abs-fast warmstart --model {tiny_dir}" in warnings[0]


def test_no_warning_for_a_base_that_plays_the_format(tiny_dir, tmp_path, caplog, monkeypatch):
    import abs_fast.train.loop as loop

    caplog.set_level(logging.INFO, logger="abs_fast")
    monkeypatch.setattr(loop, "BASE_VALIDITY_WARNING", 0.0)
    assert main(["train", "--preset", "tiny", "--model", str(tiny_dir), "--output", str(tmp_path / "run"), "--set",
                 *QUIET, "steps=1", "rollout_batch_size=2", "train_batch_size=2", "attacker_max_new_tokens=8",
                 "defender_max_new_tokens=8"]) == 0
    assert not [r for r in caplog.records if "step 0:" in r.getMessage()]


def test_the_warm_start_refuses_what_it_cannot_do(tiny_dir, tmp_path, capsys):
    quantised = tmp_path / "prequantised"
    shutil.copytree(tiny_dir, quantised)
    config = json.loads((quantised / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (quantised / "config.json").write_text(json.dumps(config))
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine\n")
    cases = [
        (["--model", str(quantised), "--output", str(tmp_path / "a")], "pre-quantised checkpoint"),
        (["--model", str(tiny_dir), "--output", str(foreign)], "holds files that are not an abs-fast run"),
        (["--model", str(tiny_dir), "--output", str(tiny_dir)], "is the source checkpoint"),
        (["--model", str(tiny_dir), "--output", str(tmp_path / "b"), "--steps", "0"], "--steps must be >= 1"),
        (["--model", str(tmp_path / "nope"), "--output", str(tmp_path / "c")], str(tmp_path / "nope")),
    ]
    for argv, culprit in cases:
        assert main(["warmstart", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert culprit in err and "Traceback" not in err, err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists() and not (tmp_path / "c").exists()
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]


def test_assembled_turns_wrap_the_models_own_replies_in_a_valid_turn():
    """Stand-in engine replies: tags inside a reply are dropped, a part cut at the length limit ends at
    its last full sentence, and the turn ends with the token the answer stopped at (or, for an answer
    cut at the limit, the end token the answers use most)."""
    from abs_fast.game import builtin_seeds, check_format
    from abs_fast.rollout import RolloutResult
    from abs_fast.train.warmstart import assemble_turns

    tokenizer = load_qwen25_tokenizer()
    im_end, eos = 151645, 151643
    replies = [  # (text, finish_reason, matched_stop), reasoning then answer, per job
        ("I should rewrite it as fiction. </think>The story", "length", None), ("A <answer>story</answer>", "stop",
                                                                             im_end),
        ("Think about the user.", "stop", im_end), ("Here is how. Then some cut", "length", None),
    ]

    class Engine:
        def generate(self, requests):
            assert len(requests) == 4 and all(r.adapter is None for r in requests)
            return [RolloutResult([], text, [], reason, 10, stop) for text, reason, stop in replies]
    settings = WarmstartSettings(examples=2, turn_tokens=64)
    turns = assemble_turns(Engine(), tokenizer, builtin_seeds(), settings, (eos, im_end))
    assert [role for _, _, role in turns] == ["attacker", "defender"]
    texts = [tokenizer.decode(response[:-1]) for _, response, _ in turns]
    assert texts == ["I should rewrite it as fiction.</think>\n<answer>A story</answer>",
                     "Think about the user.</think>\n<answer>Here is how.</answer>"]
    assert [response[-1] for _, response, _ in turns] == [im_end, im_end]  # the answers' own end token
    assert all(not check_format(text).violated for text in texts)
    from abs_fast.game import THINK_PREFILL

    assert all(tokenizer.decode(prompt).endswith(THINK_PREFILL) for prompt, _, _ in turns)  # the game's prompt
