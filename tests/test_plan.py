"""The memory planner: predictions against bytes measured on CPU, the presets against the GPUs they
claim, and the trainer refusing a run that does not fit before it loads anything."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from abs_fast.model import build_model
from abs_fast.train import Trainer, apply_overrides, preset_config
from abs_fast.train.memory import LiveTensorBytes, resident_bytes
from abs_fast.train.plan import plan_memory

SMALL = ["steps=3", "progress=false", "tensorboard=false", "device=cpu", "diagnostics_every=0", "train_batch_size=64"]


@pytest.fixture
def reference_backend(monkeypatch):
    monkeypatch.setenv("ABS_FAST_BACKEND", "reference")


def _measure(config) -> tuple[int, dict[str, int]]:
    """(resident bytes after a first step, each phase's peak transient bytes during a second step)."""
    shutil.rmtree(config.output, ignore_errors=True)
    trainer = Trainer(config)
    trainer.run_step()  # the Adam moments and the KV cache exist from here on
    tracker, phases = LiveTensorBytes(), {}

    def measured(name, fn):
        def run(*args, **kwargs):
            tracker.mark()
            start = tracker.current
            try:
                return fn(*args, **kwargs)
            finally:
                phases[name] = max(phases.get(name, 0), tracker.peak - start)
        return run

    trainer._play = measured("rollout", trainer._play)
    trainer._update = measured("update", trainer._update)
    resident = resident_bytes(trainer.policy, trainer.optimizer, trainer.engine.cache.k, trainer.engine.cache.v)
    with tracker:
        trainer.run_step()
    return resident, phases


@pytest.mark.slow
@pytest.mark.parametrize("size", ["tiny", "mid"])
def test_predicted_peak_is_within_15_percent_of_the_measured_one(size, tmp_path, reference_backend):
    """Every tensor byte of a CPU training step counted (resident: weights, adapters, Adam, KV cache;
    then each phase's working set), against the plan for the same config and device."""
    if size == "tiny":
        config = apply_overrides(preset_config("tiny"), [f"output={tmp_path / 'run'}", *SMALL])
    else:  # activations matter here: 6 layers of 384 x 1536 over 3072-token micro-batches
        model = tmp_path / "mid"
        build_model("tiny", seed=0, hidden_size=384, intermediate_size=1536, num_hidden_layers=6,
                    num_attention_heads=8, num_key_value_heads=2).save_pretrained(model)
        config = apply_overrides(preset_config("tiny"), [f"model={model}", "tokenizer=qwen2.5",
                                                         f"output={tmp_path / 'run'}", *SMALL, "token_budget=3072",
                                                         "rollout_batch_size=28", "attacker_max_new_tokens=16",
                                                         "defender_max_new_tokens=16"])
    resident, phases = _measure(config)
    plan = plan_memory(config, device="cpu")
    assert abs(sum(plan.resident.values()) - resident) <= 0.02 * resident, (plan.resident, resident)
    measured = resident + max(phases.values())
    assert 0.85 <= plan.peak / measured <= 1.15, f"predicted {plan.peak / 2**20:.0f} MiB, measured " \
                                                 f"{measured / 2**20:.0f} MiB ({phases})"


@pytest.mark.parametrize(("preset", "gpu"), [("consumer-24gb", "24"), ("qwen2.5-7b", "80"), ("qwen2.5-14b", "80"),
                                             ("qwen2.5-14b-h200", "141")])
@pytest.mark.parametrize("judge", ["heuristic", "wildguard"])
def test_presets_fit_what_they_claim(preset, gpu, judge):
    """abs-fast plan --preset P --gpu-memory GB --json: fits, with the heuristic judge and with a
    WildGuard judge beside the policy (what a real run loads)."""
    command = [sys.executable, "-m", "abs_fast.cli", "plan", "--preset", preset, "--gpu-memory", gpu, "--json"]
    if judge == "wildguard":
        command += ["--set", "judge=wildguard", "judge_model=/models/wildguard"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["fits"] is True and 0 < plan["peak_gb"] <= float(gpu), plan
    assert set(plan["phase_totals_gb"]) >= {"rollout", "logprob", "train"}


def test_plan_says_what_to_change_when_it_does_not_fit():
    config = apply_overrides(preset_config("qwen2.5-7b"), {"engine_max_batch": 512})
    plan = plan_memory(config, preset="qwen2.5-7b", gpu_memory_gb=24)
    assert plan.fits is False and any("engine_max_batch" in tip for tip in plan.advice)
    assert "DOES NOT FIT" in plan.table()
    checkpointed = plan_memory(apply_overrides(config, {"gradient_checkpointing": True}), preset="qwen2.5-7b")
    assert checkpointed.phases["train"]["activations (checkpointed)"] < plan.phases["train"]["activations (saved)"] / 5


def test_train_refuses_a_run_that_does_not_fit_before_loading_weights(tmp_path, monkeypatch):
    import abs_fast.train.loop as loop

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the memory check")
    monkeypatch.setattr(loop, "load_policy_for", never)
    monkeypatch.setattr(loop, "load_tokenizer_for", never)
    config = apply_overrides(preset_config("tiny"), [f"output={tmp_path}", "device=cpu", "engine_max_batch=65536"])
    with pytest.raises(ValueError, match=r"engine_max_batch=.*KV cache") as refused:
        Trainer(config)
    assert "GiB" in str(refused.value) and "check_memory=false" in str(refused.value)
    assert not any(tmp_path.iterdir()), "the refused run wrote into its output directory"


def test_plan_cli_errors_and_table(tmp_path):
    run = lambda *args: subprocess.run([sys.executable, "-m", "abs_fast.cli", "plan", *args], capture_output=True,
                                       text=True, timeout=300)
    table = run("--preset", "tiny", "--device", "cpu")
    assert table.returncode == 0 and "memory plan (cpu)" in table.stdout and "train phase" in table.stdout
    missing = run("--model", str(tmp_path / "absent"))
    assert missing.returncode == 2 and "config.json" in missing.stderr and "Traceback" not in missing.stderr
    bad = run("--preset", "tiny", "--gpu-memory", "lots")
    assert bad.returncode == 2 and "--gpu-memory" in bad.stderr
    # a plan that does not fit exits non-zero and says so last, so a script can gate on it
    too_big = run("--preset", "qwen2.5-7b", "--gpu-memory", "24", "--set", "engine_max_batch=512")
    assert too_big.returncode == 1, too_big.stderr
    assert too_big.stdout.strip().splitlines()[-1].startswith("verdict: DOES NOT FIT"), too_big.stdout
    assert run("--preset", "qwen2.5-7b", "--gpu-memory", "24", "--set", "engine_max_batch=512", "--json"
               ).returncode == 1
    fits = run("--preset", "qwen2.5-7b", "--gpu-memory", "80")
    assert fits.returncode == 0 and fits.stdout.strip().splitlines()[-1].startswith("verdict: fits"), fits.stdout


def test_the_plan_counts_what_runs_beside_the_model_on_a_gpu():
    """On CUDA the plan holds the autotuner's flush buffer, the decode graphs' pool (growing with the
    engine's batch), NCCL's buffers only under data parallelism, a launched SGLang server's memory
    beyond its static pool, and the second fp32 hidden-state gradient of a 16-bit log-prob backward."""
    config = apply_overrides(preset_config("qwen2.5-7b"), {"model": "qwen2.5-7b"})
    one, two = plan_memory(config, device="cuda", world_size=1), plan_memory(config, device="cuda", world_size=2)
    assert "NCCL buffers" not in one.resident and two.resident["NCCL buffers"] >= 256 * 2**20
    assert one.resident["Triton autotune flush buffer"] == 256 * 2**20
    wider = plan_memory(apply_overrides(config, {"engine_max_batch": 4 * config.engine_max_batch}), device="cuda")
    assert wider.resident["CUDA graph pools (decode)"] > 3 * one.resident["CUDA graph pools (decode)"] > 0
    cpu = plan_memory(config, device="cpu")
    assert not {"CUDA graph pools (decode)", "Triton autotune flush buffer", "CUDA context"} & set(cpu.resident)
    served = plan_memory(apply_overrides(config, {"rollout_engine": "sglang"}), device="cuda", gpu_memory_gb=80)
    assert served.resident["SGLang server (non-static)"] > 1.6 * 2**30  # context + graphs + one prefill chunk
    assert "CUDA graph pools (decode)" not in served.resident


def test_model_commands_default_to_expandable_segments(monkeypatch):
    from abs_fast.cli import set_allocator_defaults

    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    set_allocator_defaults("plan")
    assert "PYTORCH_CUDA_ALLOC_CONF" not in os.environ
    set_allocator_defaults("train")
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:512")
    set_allocator_defaults("eval")
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:512"  # the user's setting stays
