"""One full self-play step, phase by phase, against the same step done the straightforward way.

The step (fixed shapes; random prompt ids; every response exactly NEW tokens, so both sides do the
same work): wave 1 = attacker turns for half the games + defender turns of the vanilla half; wave 2
= defender turns answering the attacker outputs; the heuristic judge on the decoded texts; old-policy
and reference log-probs; one PPO train pass over both roles and one optimizer step; adapter sync.
- abs_fast (baseline): EmbeddedEngine (both adapters in one batch per wave) and train.policy_update
  (both roles and the id -1 reference rows in the same packed passes).
- hf_peft: Hugging Face generate + PEFT, one adapter after the other (set_adapter), the reference
  through disable_adapter(), full [T, vocab] logits, one forward+backward per adapter.
extra_info["phases"]: mean seconds per phase (rollout, judge, logprob, train, sync).
CPU: the tiny preset (152k vocabulary), fp32. GPU: the Qwen2.5-7B shape, random weights, NF4 base
(abs-fast's NF4 vs bitsandbytes Linear4bit under PEFT), bf16.
Run: python -m pytest bench/test_bench_selfplay.py --benchmark-only --benchmark-json=selfplay.json;
     python bench/report.py selfplay.json --baselines abs_fast
"""

from __future__ import annotations

import time

import pytest
import torch
from conftest import DEVICE, HAS_CUDA, synchronize

from abs_fast.game import HeuristicJudge
from abs_fast.model import build_model, load_policy, load_qwen25_tokenizer
from abs_fast.rollout import EmbeddedEngine, RolloutRequest, SamplingParams
from abs_fast.train import Sample, UpdateSettings, policy_update

PHASES = ("rollout", "judge", "logprob", "train", "sync")


class _Workload:
    def __init__(self, games: int, prompt_len: int, new_tokens: int, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.attack_prompts = torch.randint(0, 20000, (games // 2, prompt_len), generator=gen).tolist()
        self.vanilla_prompts = torch.randint(0, 20000, (games - games // 2, prompt_len), generator=gen).tolist()
        self.defender_prefix = torch.randint(0, 20000, (prompt_len // 2,), generator=gen).tolist()
        self.new_tokens = new_tokens
        self.rewards = torch.randn(2 * games, generator=gen).tolist()


def _timed(phases, name, fn):
    synchronize()
    start = time.perf_counter()
    out = fn()
    synchronize()
    phases[name] = phases.get(name, 0.0) + time.perf_counter() - start
    return out


def _judge(judge, tokenizer, queries, answers):
    return judge.classify([tokenizer.decode(q) for q in queries], [tokenizer.decode(a) for a in answers])


def _abs_fast_step(policy, tokenizer, work: _Workload, token_budget: int):
    engine = EmbeddedEngine(policy, tokenizer, max_batch=len(work.attack_prompts) + len(work.vanilla_prompts),
                            max_seq_len=2 * len(work.attack_prompts[0]) + 2 * work.new_tokens + 8)
    optimizer = torch.optim.AdamW([{"params": policy.adapter_parameters(n), "lr": 1e-5, "name": n}
                                   for n in ("attacker", "defender")], betas=(0.9, 0.95))
    params = SamplingParams(temperature=1.0, max_new_tokens=work.new_tokens, ignore_eos=True)
    judge, gen = HeuristicJudge(), torch.Generator().manual_seed(0)
    settings = UpdateSettings(train_batch_size=10**6, token_budget=token_budget)

    def step(phases):
        wave1 = [RolloutRequest(p, "attacker", params) for p in work.attack_prompts]
        wave1 += [RolloutRequest(p, "defender", params) for p in work.vanilla_prompts]
        first = _timed(phases, "rollout", lambda: engine.generate(wave1))
        attacks = [work.defender_prefix + r.token_ids for r in first[: len(work.attack_prompts)]]
        second = _timed(phases, "rollout", lambda: engine.generate([RolloutRequest(p, "defender", params)
                                                                    for p in attacks]))
        queries = attacks + work.vanilla_prompts
        answers = [r.token_ids for r in second] + [r.token_ids for r in first[len(work.attack_prompts):]]
        _timed(phases, "judge", lambda: _judge(judge, tokenizer, queries, answers))
        samples = [Sample("attacker", "attacker", p, r.token_ids, 0.0) for p, r in zip(work.attack_prompts, first,
                                                                                          strict=False)]
        samples += [Sample("defender", "defender", q, a, 0.0) for q, a in zip(queries, answers, strict=True)]
        for s, reward in zip(samples, work.rewards, strict=False):
            s.reward = reward
        metrics = policy_update(policy, optimizer, samples, settings, gen)
        phases["logprob"] = phases.get("logprob", 0.0) + metrics["seconds/logprob"]
        phases["train"] = phases.get("train", 0.0) + metrics["seconds/train"]
        _timed(phases, "sync", lambda: engine.update_adapters(policy))

    return step


def _padded(rows, device):
    length = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids.to(device), mask.to(device)


def _response_logprobs(model, prompts, responses, device):
    """Full-logits log-probs of each response token, one padded forward (the straightforward way)."""
    ids, mask = _padded([p + r for p, r in zip(prompts, responses, strict=True)], device)
    logits = model(input_ids=ids, attention_mask=mask).logits.float()
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    start = len(prompts[0]) - 1
    return logp[:, start:start + len(responses[0])]


def _hf_peft_step(model, tokenizer, work: _Workload, device):
    optimizer = torch.optim.AdamW([p for n, p in model.named_parameters() if "lora_" in n], lr=1e-5,
                                  betas=(0.9, 0.95))
    judge = HeuristicJudge()
    n = work.new_tokens

    def generate(adapter, prompts):
        model.set_adapter(adapter)
        ids, mask = _padded(prompts, device)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                 do_sample=True, temperature=1.0, top_k=0, top_p=1.0, pad_token_id=0)
        return out[:, ids.shape[1]:].tolist()

    def step(phases):
        attacks_out = _timed(phases, "rollout", lambda: generate("attacker", work.attack_prompts))
        vanilla_out = _timed(phases, "rollout", lambda: generate("defender", work.vanilla_prompts))
        attacks = [work.defender_prefix + a for a in attacks_out]
        answers_out = _timed(phases, "rollout", lambda: generate("defender", attacks))
        queries, answers = attacks + work.vanilla_prompts, answers_out + vanilla_out
        _timed(phases, "judge", lambda: _judge(judge, tokenizer, queries, answers))
        roles = {"attacker": (work.attack_prompts, attacks_out), "defender": (queries, answers)}

        def old_and_ref():
            out = {}
            with torch.no_grad():
                for name, (prompts, responses) in roles.items():
                    model.set_adapter(name)
                    old = _response_logprobs(model, prompts, responses, device)
                    with model.disable_adapter():
                        ref = _response_logprobs(model, prompts, responses, device)
                    out[name] = (old, ref)
            return out

        logps = _timed(phases, "logprob", old_and_ref)

        def train():
            for name, (prompts, responses) in roles.items():
                model.set_adapter(name)
                logp = _response_logprobs(model, prompts, responses, device)
                old, _ = logps[name]
                adv = torch.randn(logp.shape[0], 1, device=device)
                ratio = torch.exp(logp - old)
                loss = -torch.minimum(ratio * adv, ratio.clamp(0.8, 1.2) * adv).mean()
                loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        _timed(phases, "train", train)
        phases["sync"] = phases.get("sync", 0.0)

    return step


def _measure(benchmark, step, rounds):
    phases: dict[str, float] = {}
    step({})  # warm-up
    benchmark.pedantic(lambda: step(phases), rounds=rounds, iterations=1)
    benchmark.extra_info["phases"] = {name: phases.get(name, 0.0) / rounds for name in PHASES}


def _peft_model(base, adapters_dir):
    """PEFT over `base` with the attacker and defender adapters saved in adapters_dir, both trainable."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(base, str(adapters_dir / "attacker"), adapter_name="attacker",
                                      is_trainable=True)
    model.load_adapter(str(adapters_dir / "defender"), adapter_name="defender", is_trainable=True)
    return model


@pytest.mark.skipif(HAS_CUDA, reason="the CPU suite runs on CPU machines")
@pytest.mark.parametrize("variant", ["abs_fast", "hf_peft"])
def test_cpu_selfplay_step(benchmark, variant, tmp_path):
    games, prompt_len, new_tokens = 16, 32, 16
    work = _Workload(games, prompt_len, new_tokens)
    tokenizer = load_qwen25_tokenizer()
    benchmark.group = f"self-play step cpu tiny {games} games x {new_tokens} tokens"
    benchmark.extra_info.update(variant=variant)
    policy = load_policy("tiny", quantize=None, device="cpu", dtype=torch.float32)
    if variant == "abs_fast":
        step = _abs_fast_step(policy, tokenizer, work, token_budget=4096)
    else:
        policy.save_adapters(tmp_path)
        base = build_model("tiny", seed=0, device="cpu", dtype=torch.float32)
        step = _hf_peft_step(_peft_model(base, tmp_path), tokenizer, work, "cpu")
    _measure(benchmark, step, rounds=3)


@pytest.mark.skipif(not HAS_CUDA, reason="GPU suite")
@pytest.mark.parametrize("variant", ["abs_fast", "hf_peft"])
def test_gpu_selfplay_step_7b(benchmark, variant, tmp_path):
    games, prompt_len, new_tokens = 64, 256, 128
    work = _Workload(games, prompt_len, new_tokens)
    tokenizer = load_qwen25_tokenizer()
    benchmark.group = f"self-play step 7b nf4 {games} games x {new_tokens} tokens"
    benchmark.extra_info.update(variant=variant)
    policy = load_policy("qwen2.5-7b", quantize="nf4", device=DEVICE)
    if variant == "abs_fast":
        policy.gradient_checkpointing(True)
        step = _abs_fast_step(policy, tokenizer, work, token_budget=16384)
    else:
        from test_bench_nf4 import hf_bnb_nf4_model

        policy.save_adapters(tmp_path)
        del policy
        torch.cuda.empty_cache()
        base = hf_bnb_nf4_model("qwen2.5-7b")
        base.gradient_checkpointing_enable()
        step = _hf_peft_step(_peft_model(base, tmp_path), tokenizer, work, DEVICE)
    torch.cuda.reset_peak_memory_stats()
    _measure(benchmark, step, rounds=2)
    benchmark.extra_info["peak_bytes"] = torch.cuda.max_memory_allocated()
