"""The trainer: learning on a verifiable reward, role separation, NaN guard, config checking,
checkpoints and exact resume (also after SIGKILL), and the demo command."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from abs_fast.model import build_model, load_policy
from abs_fast.rollout import EmbeddedEngine, RolloutRequest, SamplingParams
from abs_fast.train import (
    Sample,
    Trainer,
    UpdateSettings,
    apply_overrides,
    config_from_file,
    latest_checkpoint,
    policy_update,
    preset_config,
    read_metrics,
)
from abs_fast.train.metrics import TIMING_PREFIXES

VOCAB = 256


@pytest.fixture(autouse=True)
def reference_backend(monkeypatch):
    """Whole models under the Triton interpreter would take minutes; the kernels have their own tests."""
    monkeypatch.setenv("ABS_FAST_BACKEND", "reference")


@pytest.fixture(scope="module")
def small_vocab_model(tmp_path_factory):
    """A tiny Qwen2 checkpoint with a 256-token vocabulary and embeddings large enough (std 0.2) that
    an adapter can make any single token likely."""
    directory = tmp_path_factory.mktemp("small_vocab")
    build_model("tiny", seed=3, initializer_range=0.2, vocab_size=VOCAB, bos_token_id=0,
                eos_token_id=1).save_pretrained(directory)
    return directory


def _optimizer(policy, names, lr):
    groups = [{"params": policy.adapter_parameters(n), "lr": lr, "name": n} for n in names]
    return torch.optim.AdamW(groups, betas=(0.9, 0.95), weight_decay=0.0)


def _play(engine, prompts, roles, samples_per_prompt, target, new_tokens=8):
    """Sample responses for every (prompt, role) and reward the share of the role's target token."""
    params = SamplingParams(temperature=1.0, max_new_tokens=new_tokens, ignore_eos=True)
    requests, meta = [], []
    for i, prompt in enumerate(prompts):
        for role in roles:
            for _ in range(samples_per_prompt):
                requests.append(RolloutRequest(prompt, role, params))
                meta.append((i, role))
    samples, rewards = [], {role: [] for role in roles}
    for (i, role), result in zip(meta, engine.generate(requests), strict=True):
        reward = sum(t == target[role] for t in result.token_ids) / len(result.token_ids)
        rewards[role].append(reward)
        samples.append(Sample(role, role, prompts[i], result.token_ids, reward, group=2 * i + roles.index(role),
                              logprobs=result.logprobs))
    return samples, {role: sum(v) / len(v) for role, v in rewards.items()}


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["reinforce++", "grpo"])
def test_both_adapters_learn_a_verifiable_reward_in_one_batched_pass(small_vocab_model, algorithm, rng_seed):
    """Reward = share of generated tokens equal to the role's chosen token (attacker and defender
    have different tokens). Base rate about 1/256; both must pass 0.5 (mean of the last three steps)
    within 60 steps, trained together: every update packs both roles' samples into the same
    micro-batches. Learning takes off suddenly, at a step that depends on the draw: most draws pass
    0.9 by step 40; seed 1693163320 (reinforce++) was at 0.19 on step 40 and 0.94 on step 50."""
    policy = load_policy(small_vocab_model, quantize=None, rank=8, alpha=16, seed=1)
    engine = EmbeddedEngine(policy, max_batch=64, max_seq_len=32, seed=rng_seed)
    optimizer = _optimizer(policy, ("attacker", "defender"), 1e-2)
    gen = torch.Generator().manual_seed(rng_seed)
    prompts = [torch.randint(2, VOCAB, (6,), generator=gen).tolist() for _ in range(16)]
    target = {"attacker": 5, "defender": 77}
    settings = UpdateSettings(algorithm=algorithm, train_batch_size=128, token_budget=4096)
    history = []

    def recent(role):
        return sum(h[role] for h in history[-3:]) / 3

    for _ in range(60):
        samples, mean_reward = _play(engine, prompts, ("attacker", "defender"), 4, target)
        metrics = policy_update(policy, optimizer, samples, settings, gen)
        assert metrics["optimizer_steps"] == 1  # one train batch holding both roles
        history.append(mean_reward)
        if len(history) > 3 and all(recent(role) > 0.5 for role in target):
            break
    for role in target:
        start = sum(h[role] for h in history[:3]) / 3
        assert start < 0.05, (role, start)
        assert recent(role) > 0.5, (role, [round(h[role], 3) for h in history])


def _update_gradients(policy, samples, settings, seed) -> dict[str, torch.Tensor]:
    """The adapter gradients policy_update hands to its (only) optimizer step."""
    names = policy.adapter_names
    optimizer = _optimizer(policy, names, 1e-3)
    captured = {}

    def capture():
        captured.update({f"{n}.{i}": p.grad.clone() for n in names
                         for i, p in enumerate(policy.adapter_parameters(n)) if p.grad is not None})
    optimizer.step = capture
    metrics = policy_update(policy, optimizer, samples, settings, torch.Generator().manual_seed(seed))
    assert metrics["optimizer_steps"] == 1
    return captured


def test_shared_mode_pools_both_roles_tokens(small_vocab_model, rng_seed):
    """One adapter playing both roles takes the mean over all its tokens (upstream's loss), not the
    sum of per-role means: relabelling every defender sample as an attacker sample must not change
    its gradient. (GRPO with kl_beta 0: advantages depend on the groups only, not on the roles.)"""
    policy = load_policy(small_vocab_model, quantize=None, adapters=("shared",), rank=4, alpha=8, seed=2)
    with torch.no_grad():  # B != 0, so every parameter has a gradient
        for p in policy.adapter_parameters("shared"):
            p.normal_(0, 0.05)
    gen = torch.Generator().manual_seed(rng_seed)

    def sample(role, length, group):
        prompt = torch.randint(2, VOCAB, (5,), generator=gen).tolist()
        response = torch.randint(2, VOCAB, (length,), generator=gen).tolist()
        return Sample(role, "shared", prompt, response, float(torch.randn(1, generator=gen)), group=group)

    mixed = [sample("attacker", 2, g) for g in range(2) for _ in range(2)]
    mixed += [sample("defender", 9, g) for g in range(2, 4) for _ in range(2)]
    relabelled = [Sample("attacker", s.adapter, s.prompt_ids, s.response_ids, s.reward, s.group) for s in mixed]
    settings = UpdateSettings(algorithm="grpo", kl_beta=0.0, grad_clip=0.0, train_batch_size=64)
    ours = _update_gradients(policy, mixed, settings, rng_seed)
    pooled = _update_gradients(policy, relabelled, settings, rng_seed)
    assert ours.keys() == pooled.keys() and ours
    for key, grad in pooled.items():
        assert torch.allclose(ours[key], grad, rtol=1e-5, atol=1e-7 * grad.abs().max()), key


def test_reported_kl_is_the_nonnegative_k3_estimate(small_vocab_model, rng_seed):
    """kl/<role> is the k3 estimate of KL(sampler || base): non-negative, and here where the sampler's
    log-probs lie below the base's (a negative k1 mean) it equals mean(exp(d) - 1 - d), d = ref - old,
    with the base's log-probs computed from its full logits."""
    policy = load_policy(small_vocab_model, quantize=None, adapters=("attacker", "defender"), rank=4, alpha=8, seed=1)
    gen = torch.Generator().manual_seed(rng_seed)
    samples = []
    for i, role in enumerate(["attacker", "attacker", "defender", "defender"]):
        prompt = torch.randint(2, VOCAB, (3 + i,), generator=gen).tolist()
        response = torch.randint(2, VOCAB, (4 + i,), generator=gen).tolist()
        old = (-8.0 - torch.rand(len(response), generator=gen)).tolist()  # below log(1/256) = -5.5
        samples.append(Sample(role, role, prompt, response, float(i), group=i, logprobs=old))
    settings = UpdateSettings(train_batch_size=64, grad_clip=0.0, reuse_sampler_logprobs=True)
    metrics = policy_update(policy, _optimizer(policy, ("attacker", "defender"), 1e-3), samples, settings,
                            torch.Generator().manual_seed(rng_seed))
    for role in ("attacker", "defender"):
        k1, k3 = [], []
        for s in (s for s in samples if s.role == role):
            with torch.no_grad():
                logits = policy.logits(torch.tensor([s.prompt_ids + s.response_ids]), [-1])[0].double()
            positions = torch.arange(len(s.prompt_ids) - 1, len(s.prompt_ids) + len(s.response_ids) - 1)
            ref = logits.log_softmax(-1)[positions, torch.tensor(s.response_ids)]
            d = ref - torch.tensor(s.logprobs, dtype=torch.float64)
            k1 += (-d).tolist()
            k3 += (torch.expm1(d) - d).tolist()
        assert sum(k1) / len(k1) < 0  # what was reported before: a "KL" below zero
        assert metrics[f"kl/{role}"] >= 0
        assert metrics[f"kl/{role}"] == pytest.approx(sum(k3) / len(k3), rel=1e-4)


def test_reused_sampler_logprobs_halve_the_no_grad_pass_and_give_ratio_one(small_vocab_model, monkeypatch, rng_seed):
    """With the sampler's log-probs as the old policy's: the no-grad pass forwards only the reference
    (adapter id -1) copy of each sample, half the tokens of the pass that also scores the old policy;
    the PPO ratio of the first epoch is exactly 1; and the step equals the one without reuse."""
    import abs_fast.train.update as update

    policy = load_policy(small_vocab_model, quantize=None, adapters=("attacker", "defender"), rank=4, alpha=8, seed=1)
    gen = torch.Generator().manual_seed(rng_seed)
    prompts = [torch.randint(2, VOCAB, (n,), generator=gen).tolist() for n in (3, 6, 4)]
    engine = EmbeddedEngine(policy, max_batch=8, max_seq_len=32, seed=rng_seed)
    samples, _ = _play(engine, prompts, ("attacker", "defender"), 2, {"attacker": 5, "defender": 9}, new_tokens=6)
    for s in samples:  # rewards that vary within each role: the advantages then carry no numerical noise
        s.reward = float(torch.randn(1, generator=gen))
    counted, ratios = {"no_grad": 0}, []
    original_forward, original_loss = policy.model.forward, update.ppo_clip_loss

    def forward(input_ids, *args, **kwargs):
        if not torch.is_grad_enabled():
            counted["no_grad"] += input_ids.numel()
        return original_forward(input_ids, *args, **kwargs)

    def loss(logp, old, advantages, clip_eps):
        ratios.append(torch.exp(logp - old).detach())
        return original_loss(logp, old, advantages, clip_eps)
    monkeypatch.setattr(policy.model, "forward", forward)
    monkeypatch.setattr(update, "ppo_clip_loss", loss)
    gradients, tokens = {}, {}
    for reuse in (False, True):
        counted["no_grad"], ratios[:] = 0, []
        settings = UpdateSettings(train_batch_size=64, grad_clip=0.0, reuse_sampler_logprobs=reuse)
        gradients[reuse] = _update_gradients(policy, samples, settings, rng_seed)
        tokens[reuse] = counted["no_grad"]
        assert ratios and all(torch.equal(r, torch.ones_like(r)) for r in ratios), "PPO ratio is not exactly 1"
    assert tokens[False] == sum(len(s) for s in samples) * 2 and tokens[True] * 2 == tokens[False]
    for key, grad in gradients[False].items():
        assert torch.allclose(gradients[True][key], grad, rtol=1e-4, atol=1e-6 * grad.abs().max()), key
    with pytest.raises(ValueError, match="sample 0: reuse_sampler_logprobs"):
        policy_update(policy, _optimizer(policy, ("attacker", "defender"), 1e-3),
                      [Sample("attacker", "attacker", [3], [4, 5], 1.0)], UpdateSettings(reuse_sampler_logprobs=True),
                      torch.Generator())


def _defender_logits(policy, prompt):
    ids = torch.tensor([prompt])
    with torch.no_grad():
        return policy.logits(ids, ["defender" if "defender" in policy.adapter_names else "shared"])


@pytest.mark.parametrize("mode", ["bipolicy", "shared"])
def test_role_separation(small_vocab_model, mode, rng_seed):
    """bipolicy: a train batch of attacker samples only leaves the defender adapter (parameters,
    optimizer state, outputs) bit-identical, even after both were trained (Adam momentum is live).
    shared: the one adapter plays both roles, so the same batch changes the defender's outputs."""
    names = ("attacker", "defender") if mode == "bipolicy" else ("shared",)
    policy = load_policy(small_vocab_model, quantize=None, adapters=names, rank=4, alpha=8, seed=2)
    adapters = {"attacker": names[0], "defender": names[-1]}
    optimizer = _optimizer(policy, names, 1e-2)
    gen = torch.Generator().manual_seed(rng_seed)
    prompt = torch.randint(2, VOCAB, (5,), generator=gen).tolist()

    def samples_for(roles):
        return [Sample(role, adapters[role], prompt, torch.randint(2, VOCAB, (4,), generator=gen).tolist(),
                       float(torch.randn(1, generator=gen)), group=i) for i, role in enumerate(roles * 4)]

    settings = UpdateSettings(train_batch_size=64)
    policy_update(policy, optimizer, samples_for(["attacker", "defender"]), settings, gen)
    defender_params = [p.detach().clone() for p in policy.adapter_parameters(adapters["defender"])]
    attacker_params = [p.detach().clone() for p in policy.adapter_parameters(adapters["attacker"])]
    defender_state = [{k: v.clone() for k, v in optimizer.state[p].items()}
                      for p in policy.adapter_parameters(adapters["defender"])]
    before = _defender_logits(policy, prompt)
    metrics = policy_update(policy, optimizer, samples_for(["attacker"]), settings, gen)
    assert metrics["optimizer_steps"] == 1
    after = _defender_logits(policy, prompt)
    moved = [not torch.equal(a, p) for a, p in zip(attacker_params, policy.adapter_parameters(adapters["attacker"]),
                                                   strict=True)]
    assert any(moved)
    same = [torch.equal(d, p) for d, p in zip(defender_params, policy.adapter_parameters(adapters["defender"]),
                                              strict=True)]
    if mode == "bipolicy":
        assert all(same)
        assert torch.equal(before, after)
        for state, p in zip(defender_state, policy.adapter_parameters("defender"), strict=True):
            assert all(torch.equal(v, optimizer.state[p][k]) for k, v in state.items())
    else:
        assert not all(same)
        assert not torch.equal(before, after)


def test_nonfinite_step_is_skipped_and_reported(small_vocab_model, caplog):
    policy = load_policy(small_vocab_model, quantize=None, adapters=("attacker", "defender"), rank=4, alpha=8)
    optimizer = _optimizer(policy, ("attacker", "defender"), 1e-2)
    gen = torch.Generator().manual_seed(0)
    samples = [Sample("attacker", "attacker", [3, 4, 5], [6, 7], float("nan"), group=0),
               Sample("defender", "defender", [3, 4, 5], [8, 9], 1.0, group=1)]
    params = [p.detach().clone() for p in policy.adapter_parameters("attacker") + policy.adapter_parameters("defender")]
    metrics = policy_update(policy, optimizer, samples, UpdateSettings(), gen)
    assert metrics["nonfinite_skipped"] == 1 and metrics["optimizer_steps"] == 0
    assert any("skipped" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)
    after = policy.adapter_parameters("attacker") + policy.adapter_parameters("defender")
    assert all(torch.equal(a, b) for a, b in zip(params, after, strict=True))
    assert all(p.grad is None for p in after)


# --- configuration ------------------------------------------------------------------------------

def test_config_errors_name_the_key_and_the_choices(tmp_path):
    config = preset_config("tiny")
    with pytest.raises(KeyError, match=r"unknown key 'stepz'; valid keys: .*steps"):
        apply_overrides(config, ["stepz=3"])
    with pytest.raises(ValueError, match=r"steps must be an integer, got '3\.5'"):
        apply_overrides(config, ["steps=3.5"])
    with pytest.raises(ValueError, match="mode must be one of bipolicy, shared, defender-only, attacker-only"):
        apply_overrides(config, ["mode=solo"])
    with pytest.raises(ValueError, match="gradient_checkpointing must be true or false"):
        apply_overrides(config, ["gradient_checkpointing=maybe"])
    with pytest.raises(ValueError, match="expected key=value"):
        apply_overrides(config, ["steps"])
    with pytest.raises(KeyError, match=r"unknown preset 'huge'; choose one of tiny, qwen2\.5-3b"):
        preset_config("huge")
    changed = apply_overrides(config, ["steps=7", "lr_defender=1e-4", "seeds=builtin,harmful=x.jsonl",
                                       "reasoning=false"])
    assert (changed.steps, changed.lr_defender, changed.seeds, changed.reasoning) == \
        (7, 1e-4, ["builtin", "harmful=x.jsonl"], False)
    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "steps": 3,\n  "mode": \n}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.json:4: not valid JSON"):
        config_from_file(bad)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"preset": "tiny", "steps": "many"}), encoding="utf-8")
    with pytest.raises(ValueError, match=r"wrong\.json: steps must be an integer"):
        config_from_file(wrong)
    toml = tmp_path / "run.toml"
    toml.write_text('preset = "tiny"\nsteps = 5\nmode = "shared"\nseeds = ["builtin"]\n', encoding="utf-8")
    loaded = config_from_file(toml)
    assert (loaded.steps, loaded.mode, loaded.rollout_batch_size) == (5, "shared", 8)
    with pytest.raises(ValueError, match="samples_per_prompt >= 2"):
        apply_overrides(config, ["algorithm=grpo"]).validate()
    with pytest.raises(ValueError, match="--model LOCAL_DIR"):
        preset_config("qwen2.5-7b").validate()


# --- the loop: checkpoints and resume --------------------------------------------------------------

SMALL = ["rollout_batch_size=4", "attacker_max_new_tokens=6", "defender_max_new_tokens=6", "progress=false",
         "tensorboard=false", "train_batch_size=4"]


def _config(output, *extra):
    return apply_overrides(preset_config("tiny"), [f"output={output}", *SMALL, *extra])


def _comparable(record):
    return {k: v for k, v in record.items() if not k.startswith(TIMING_PREFIXES)}


def _same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        x, y = a[key], b[key]
        assert x == y or (isinstance(x, float) and math.isnan(x) and math.isnan(y)), (key, x, y)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["bipolicy", "shared"])
def test_resume_gives_the_same_next_step(tmp_path, mode):
    straight = Trainer(_config(tmp_path / "a", "steps=3", "checkpoint_every=2", f"mode={mode}")).train()
    Trainer(_config(tmp_path / "b", "steps=2", "checkpoint_every=2", f"mode={mode}")).train()
    resumed = Trainer(_config(tmp_path / "b", "steps=3", "checkpoint_every=2", f"mode={mode}"), resume=True)
    assert resumed.step == 2
    after = resumed.train()
    assert len(after) == 1 and after[0]["step"] == 3
    _same(_comparable(straight[2]), _comparable(after[0]))
    assert "reward/defender" in after[0] and "kl/defender" in after[0]
    for name in resumed.policy.adapter_names:
        a = (tmp_path / "a" / name / "adapter_model.safetensors").read_bytes()
        b = (tmp_path / "b" / name / "adapter_model.safetensors").read_bytes()
        assert a == b
    steps = [r["step"] for r in read_metrics(tmp_path / "b" / "metrics.jsonl")]
    assert steps == [1, 2, 3]
    with pytest.raises(FileExistsError, match="--resume"):
        Trainer(_config(tmp_path / "b", "steps=4", f"mode={mode}"))


class _Recording:
    """Wraps an engine and keeps every request it serves."""

    def __init__(self, engine):
        self.engine, self.requests = engine, []

    def generate(self, requests):
        self.requests += requests
        return self.engine.generate(requests)

    def update_adapters(self, policy, names=None):
        self.engine.update_adapters(policy, names)


class _AbortFirst(_Recording):
    """The first request of every engine call comes back aborted, as a server engine reports it."""

    def generate(self, requests):
        from abs_fast.rollout import RolloutResult

        results = super().generate(requests)
        if results:
            results[0] = RolloutResult([], "", [], "abort", len(requests[0].prompt_ids), error="aborted: test")
        return results


def test_an_aborted_turn_drops_its_game_and_is_counted(tmp_path):
    trainer = Trainer(_config(tmp_path / "run", "steps=1", "diagnostics_every=0"))
    trainer.engine = _AbortFirst(trainer.engine)
    record = trainer.run_step()
    calls = 2  # wave 1 and wave 2, each with its first turn aborted
    assert record["games/dropped_aborted"] == calls
    assert record["samples/defender"] <= record["games"] - calls


@pytest.mark.parametrize("frozen", [False, True], ids=["base-defender", "frozen-defender"])
def test_attacker_only_defender_prompt(tmp_path, frozen, qwen_tokenizer):
    """attacker-only against the base: the defender gets the raw query (upstream's no_defender_turn),
    still with the pre-filled reasoning opening; a frozen trained defender keeps the format instruction."""
    from abs_fast.game.prompts import THINK_PREFILL

    extra = []
    if frozen:
        donor = Trainer(_config(tmp_path / "donor", "steps=1"))
        donor.policy.save_adapters(tmp_path / "adapters")
        extra = [f"frozen_defender={tmp_path / 'adapters' / 'defender'}"]
    trainer = Trainer(_config(tmp_path / "run", "steps=1", "mode=attacker-only", *extra))
    trainer.engine = _Recording(trainer.engine)
    trainer.train()
    defender = [r for r in trainer.engine.requests if r.adapter == trainer.adapters["defender"]]
    assert defender and len(defender) == len([r for r in trainer.engine.requests if r.adapter == "attacker"])
    for request in defender:
        text = qwen_tokenizer.decode(request.prompt_ids)
        assert text.endswith(THINK_PREFILL)
        assert ("<answer> </answer> tags" in text) == frozen, text


def test_resume_takes_the_new_learning_rate(tmp_path, caplog):
    """`train --resume --set lr_defender=...` trains with the new rate (the saved Adam moments stay)."""
    Trainer(_config(tmp_path, "steps=1", "checkpoint_every=1", "lr_defender=1e-3", "warmup_ratio=0")).train()
    caplog.set_level("INFO", logger="abs_fast")
    resumed = Trainer(_config(tmp_path, "steps=2", "lr_defender=2e-4", "adam_beta2=0.9", "warmup_ratio=0"),
                      resume=True)
    messages = [r.getMessage() for r in caplog.records]
    groups = {g["name"]: g for g in resumed.optimizer.param_groups}
    assert groups["defender"]["base_lr"] == 2e-4 and groups["attacker"]["base_lr"] == 1e-3
    assert groups["defender"]["betas"] == (0.9, 0.9)
    assert any("defender base_lr 0.001 -> 0.0002" in m for m in messages), messages
    assert len(resumed.optimizer.state) > 0  # Adam moments restored
    record = resumed.train()[-1]
    assert record["lr/defender"] == 2e-4 and record["lr/attacker"] == 1e-3


class _CudaGeneratorDouble:
    """Stands in for a CUDA torch.Generator: its device is cuda, and, as torch's, set_state takes only a
    CPU ByteTensor (the state of a CUDA generator lives on the host)."""

    def __init__(self, inner: torch.Generator):
        self.inner, self.device, self.states = inner, torch.device("cuda", 0), []

    def set_state(self, state: torch.Tensor) -> None:
        if state.device.type != "cpu" or state.dtype != torch.uint8:
            raise RuntimeError(f"expected a CPU ByteTensor, got {state.dtype} on {state.device}")
        self.states.append(state.clone())
        self.inner.set_state(state)

    def get_state(self) -> torch.Tensor:
        return self.inner.get_state()

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_resume_restores_a_cuda_generator_from_host_state(tmp_path, monkeypatch):
    """--resume hands the engine's generator its saved state as a CPU ByteTensor, as a CUDA generator
    requires (moving it to the generator's device fails there)."""
    import abs_fast.train.loop as loop

    Trainer(_config(tmp_path, "steps=1", "checkpoint_every=1")).train()

    class Engine(loop.EmbeddedEngine):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.generator = _CudaGeneratorDouble(self.generator)
    monkeypatch.setattr(loop, "EmbeddedEngine", Engine)
    resumed = Trainer(_config(tmp_path, "steps=2"), resume=True)
    saved = load_checkpoint_rng(latest_checkpoint(tmp_path))["engine"]
    assert len(resumed.engine.generator.states) == 1
    assert torch.equal(resumed.engine.generator.states[0], saved)


def load_checkpoint_rng(checkpoint) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(checkpoint / "rng.safetensors")


@pytest.mark.slow
def test_sigkill_mid_run_then_resume(tmp_path):
    """Kill -9 a training process right after its second checkpoint (every step checkpoints, so the
    kill lands in step 3 or its checkpoint write). The resumed run ends where an uninterrupted one does."""
    run = tmp_path / "run"
    cli = [sys.executable, "-m", "abs_fast.cli", "train", "--preset", "tiny", "--output", str(run), "--set",
           *SMALL, "steps=5", "checkpoint_every=1"]
    env = {**os.environ, "ABS_FAST_BACKEND": "reference"}
    process = subprocess.Popen(cli, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline:
            checkpoint = latest_checkpoint(run) if (run / "checkpoints" / "latest").exists() else None
            if checkpoint is not None and checkpoint.name >= "step_000002":
                break
            assert process.poll() is None, process.stderr.read().decode()
            time.sleep(0.05)
        else:
            pytest.fail("no second checkpoint within 300 s")
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL
    checkpoint = latest_checkpoint(run)
    assert checkpoint.name in ("step_000002", "step_000003")
    resumed = subprocess.run([sys.executable, "-m", "abs_fast.cli", "train", "--resume", "--output", str(run)],
                             env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2, 3, 4, 5]
    straight = Trainer(_config(tmp_path / "straight", "steps=5", "checkpoint_every=1")).train()
    killed = read_metrics(run / "metrics.jsonl")
    _same(_comparable(straight[-1]), _comparable(killed[-1]))
    for name in ("attacker", "defender"):
        assert (run / name / "adapter_model.safetensors").read_bytes() == \
            (tmp_path / "straight" / name / "adapter_model.safetensors").read_bytes()


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_an_interrupt_prints_one_line_and_the_checkpoint_resumes(tmp_path, sig, code):
    """Ctrl-C or SIGTERM after the second checkpoint: exit 130 / 143 with one line naming the step, the
    intact checkpoint and the command that continues; no traceback; the resume runs from it."""
    run = tmp_path / "run"
    cli = [sys.executable, "-m", "abs_fast.cli", "train", "--preset", "tiny", "--output", str(run), "--set",
           *SMALL, "steps=40", "checkpoint_every=1"]
    env = {**os.environ, "ABS_FAST_BACKEND": "reference"}
    # a suite started in the background by a non-interactive shell inherits SIGINT ignored: give the
    # run the default disposition a terminal's Ctrl-C meets
    process = subprocess.Popen(cli, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if (run / "checkpoints" / "latest").exists() and latest_checkpoint(run).name >= "step_000002":
            break
        assert process.poll() is None, process.stderr.read()
        time.sleep(0.05)
    else:
        process.kill()
        pytest.fail("no second checkpoint within 300 s")
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == code, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("abs-fast train: interrupted at step "), last
    step = int(last.split("interrupted at step ")[1].split(";")[0])
    saved = latest_checkpoint(run)
    assert f"the checkpoint of step {int(saved.name.removeprefix('step_'))} is intact" in last, last
    assert f"`abs-fast train --output {run} --resume` continues" in last, last
    assert int(saved.name.removeprefix("step_")) in (step, step - 1) and step >= 2
    resumed = subprocess.run([*cli[:4], "--output", str(run), "--resume", "--set", f"steps={step + 1}"], env=env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == list(range(1, step + 2))


def test_refusals_that_need_no_weights_come_before_any_load(tmp_path, monkeypatch, capsys, test_data):
    """train into a run with checkpoints (no --resume), --resume of a run without one, and eval / crossplay
    / exploit with a missing judge directory are refused before any weights load, and leave no
    output directory behind."""
    import abs_fast.evaluate.commands as commands
    import abs_fast.train.loop as loop
    from abs_fast.cli import main

    def never(*args, **kwargs):
        raise AssertionError("weights were loaded before the refusal")
    monkeypatch.setattr(loop, "load_policy_for", never)
    monkeypatch.setattr(commands, "load_policy_for", never)
    run = tmp_path / "run"
    (run / "checkpoints" / "step_000001").mkdir(parents=True)
    (run / "checkpoints" / "step_000001" / "state.json").write_text("{}")
    (run / "checkpoints" / "latest").write_text("step_000001\n")
    (run / ".abs-fast-run").write_text('{"kind": "train"}\n')
    with pytest.raises(FileExistsError, match="pass --resume"):
        Trainer(_config(run, "steps=1"))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        Trainer(_config(tmp_path / "fresh", "steps=1"), resume=True)
    no_judge = ["--set", "judge=wildguard", f"judge_model={tmp_path / 'no-judge'}"]
    for argv in (["eval", "--base-only", "--suite", f"xstest={test_data / 'xstest_prompts.csv'}", "--output",
                  str(tmp_path / "eval"), *no_judge],
                 ["crossplay", "--attackers", "base", "--defenders", "base", "--seeds", "builtin", "--output",
                  str(tmp_path / "cross"), *no_judge],
                 ["exploit", "--defender", "base", "--steps", "1", "--output", str(tmp_path / "exploit"), *no_judge]):
        capsys.readouterr()
        assert main(argv) == 2, argv
        assert "judge_model=" in capsys.readouterr().err, argv
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_torn_metrics_line_is_ignored(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "rew', encoding="utf-8")
    assert [r["step"] for r in read_metrics(path)] == [1, 2]
    path.write_text('{"step": 1}\n{"step": \n{"step": 3}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2"):
        read_metrics(path)


# --- the demo ---------------------------------------------------------------------------------------

@pytest.mark.slow
def test_demo_writes_everything_and_its_adapters_load_into_peft(tmp_path, capsys):
    from peft import PeftModel
    from safetensors.torch import load_file

    from abs_fast.cli import main

    output = tmp_path / "demo"
    assert main(["demo", "--output", str(output), "--steps", "2", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "attacker reward" in printed and "defender reward" in printed
    records = read_metrics(output / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    for key in ("reward/attacker", "reward/defender", "attack_success", "refusal_rate/harmful_prompt",
                "format_violation/defender", "kl/attacker", "entropy/defender", "tokens_per_second/rollout",
                "seconds/judge", "peak_memory_gb", "outcome/correct_refusal", "ties", "judge_parse_errors"):
        assert key in records[-1], key
    assert (output / "rewards.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((output / "tensorboard").glob("events.out.tfevents.*"))
    assert latest_checkpoint(output).name == "step_000002"
    model = build_model("tiny", seed=0)
    peft_model = PeftModel.from_pretrained(model, output / "attacker", adapter_name="attacker")
    peft_model.load_adapter(output / "defender", adapter_name="defender")
    for name in ("attacker", "defender"):
        saved = load_file(output / name / "adapter_model.safetensors")
        key = next(k for k in saved if "lora_B" in k)
        assert saved[key].abs().sum() > 0  # trained: B started at zero
        module_path = key.replace("base_model.model.", "").replace(".lora_B.weight", "")
        loaded = peft_model.base_model.model.get_submodule(module_path).lora_B[name].weight
        assert torch.equal(loaded, saved[key])
    # each adapter directory carries its base: eval and crossplay take it as they take the run directory
    base_info = json.loads((output / "defender" / "abs-fast-base.json").read_text())
    assert base_info["tokenizer"] == "qwen2.5" and "demo-base" in base_info["model"]
    assert "<|im_start|>" in base_info["chat_template"]
    xstest = Path(__file__).parent / "data" / "xstest_prompts.csv"
    common = ["--limit", "2", "--max-new-tokens", "4", "--quiet"]
    assert main(["eval", "--policy", str(output), "--suite", f"xstest={xstest}", "--attack-samples", "2",
                 *common]) == 0
    assert main(["eval", "--policy", str(output / "defender"), "--suite", f"xstest={xstest}", "--output",
                 str(tmp_path / "eval-adapter"), *common]) == 0
    assert main(["crossplay", "--attackers", str(output / "attacker"), "--defenders", "base", str(output / "defender"),
                 "--seeds", "builtin", "--output", str(tmp_path / "cross"), *common]) == 0
    assert (output / "eval" / "eval.json").is_file() and (tmp_path / "cross" / "crossplay.json").is_file()
    # a second demo into the same directory replaces the first's outputs and keeps what was made from it
    assert main(["demo", "--output", str(output), "--steps", "1", "--quiet"]) == 0
    assert [r["step"] for r in read_metrics(output / "metrics.jsonl")] == [1]
    assert (output / "eval" / "eval.json").is_file()


def test_demo_warm_start_loss_is_the_full_vocabulary_cross_entropy(rng_seed):
    """The warm start trains a head whose unused rows are zero: its loss over the used rows plus a
    count equals the full-vocabulary cross-entropy, value and gradient."""
    from abs_fast.train.demo import zero_rest_cross_entropy

    gen = torch.Generator().manual_seed(rng_seed)
    vocab, width, used = 3000, 16, torch.randperm(3000, generator=gen)[:50]
    hidden = torch.randn(7, width, generator=gen, dtype=torch.float64, requires_grad=True)
    rows = torch.randn(len(used), width, generator=gen, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(len(used), (7,), generator=gen)
    full = torch.zeros(vocab, width, dtype=torch.float64).index_put((used,), rows)
    want = torch.nn.functional.cross_entropy(hidden @ full.T, used[targets])
    got = zero_rest_cross_entropy(hidden, rows, vocab - len(used), targets)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    grads_want = torch.autograd.grad(want, (hidden, rows))
    grads_got = torch.autograd.grad(got, (hidden, rows))
    for g, w in zip(grads_got, grads_want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-14)


@pytest.mark.gpu
@pytest.mark.slow
def test_two_runs_with_one_seed_are_bitwise_equal_and_resume_is_exact_on_gpu(tmp_path):
    """deterministic=true (the default) on a GPU: two runs of two steps with one seed write identical
    adapters, and the first run's step-1 checkpoint resumed to step 2 writes them too (three short
    runs: gpu-check's test stage has about a minute and a half for every gpu test)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    gpu = ["device=cuda", "checkpoint_every=1", "diagnostics_every=0", "keep_checkpoints=2"]
    Trainer(_config(tmp_path / "a", "steps=2", *gpu)).train()
    Trainer(_config(tmp_path / "b", "steps=2", *gpu)).train()
    resumed = tmp_path / "c"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "a" / "checkpoints" / "step_000001", resumed / "checkpoints" / "step_000001")
    (resumed / "checkpoints" / "latest").write_text("step_000001\n")
    for name in ("config.json", ".abs-fast-run"):
        shutil.copy2(tmp_path / "a" / name, resumed / name)
    Trainer(_config(resumed, "steps=2", *gpu), resume=True).train()
    for name in ("attacker", "defender"):
        a = (tmp_path / "a" / name / "adapter_model.safetensors").read_bytes()
        assert (tmp_path / "b" / name / "adapter_model.safetensors").read_bytes() == a, f"{name}: runs differ"
        assert (resumed / name / "adapter_model.safetensors").read_bytes() == a, f"{name}: resume differs"
