"""The embedded rollout engine against Hugging Face generate and a teacher-forced forward."""

from __future__ import annotations

import copy

import pytest
import torch

from abs_fast.model import build_model, load_policy
from abs_fast.rollout import EmbeddedEngine, RolloutEngine, RolloutRequest, SamplingParams

pytestmark = pytest.mark.usefixtures("reference_backend")


@pytest.fixture
def reference_backend(monkeypatch):
    monkeypatch.setenv("ABS_FAST_BACKEND", "reference")


@pytest.fixture(scope="module")
def hf_and_dir(tmp_path_factory):
    """A tiny Qwen2 whose logits are spread enough that greedy choices are not near-ties, saved."""
    hf = build_model("tiny", seed=11)
    with torch.no_grad():
        hf.model.embed_tokens.weight.mul_(8)  # tied head: larger logits
    path = tmp_path_factory.mktemp("model")
    hf.save_pretrained(str(path))
    return hf, str(path)


def _policy(path, quantize=None, seed=0):
    policy = load_policy(path, quantize=quantize, device="cpu")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in policy.target_layers().values():
            for name in layer.adapter_names:
                layer.lora_B[name].copy_(torch.randn(layer.lora_B[name].shape, generator=gen) * 0.1)
    return policy


def _prompts(seed, lengths):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 20000, (n,), generator=gen).tolist() for n in lengths]


def _merged(hf, policy, adapter):
    """A Hugging Face copy with the adapter merged into its dense weights."""
    model = copy.deepcopy(hf)
    if adapter is not None:
        with torch.no_grad():
            for path, layer in policy.target_layers().items():
                a = layer.adapter_id(adapter)
                model.get_submodule(path).weight += layer.scaling[a] * layer.lora_B[adapter] @ layer.lora_A[adapter]
    return model


def _assert_same_greedy(hf_model, prompt, tokens):
    """Token for token; a divergence is accepted only at a genuine tie of Hugging Face's logits."""
    expected = hf_model.generate(torch.tensor([prompt]), max_new_tokens=len(tokens), do_sample=False,
                                 eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    for i, (ours, theirs) in enumerate(zip(tokens, expected, strict=True)):
        if ours != theirs:
            with torch.no_grad():
                logits = hf_model(torch.tensor([prompt + expected[:i]])).logits[0, -1]
            gap = (logits[theirs] - logits[ours]).abs().item()
            assert gap < 1e-4, f"step {i}: engine chose {ours}, HF {theirs}, logit gap {gap:.2e}"
            return


def test_engine_is_a_rollout_engine(hf_and_dir):
    assert isinstance(EmbeddedEngine(_policy(hf_and_dir[1])), RolloutEngine)


def test_greedy_mixed_adapter_batch_equals_hf_generate_per_adapter(hf_and_dir, rng_seed):
    hf, path = hf_and_dir
    policy = _policy(path, seed=rng_seed)
    prompts = _prompts(rng_seed, [3, 9, 5, 1, 12, 7])
    adapters = ["attacker", "defender", None, "defender", "attacker", None]
    params = SamplingParams(temperature=0, max_new_tokens=10, ignore_eos=True)
    engine = EmbeddedEngine(policy, max_batch=8, max_seq_len=64)
    results = engine.generate([RolloutRequest(p, a, params) for p, a in zip(prompts, adapters, strict=True)])
    merged = {a: _merged(hf, policy, a) for a in set(adapters)}
    outputs = {tuple(r.token_ids) for r in results}
    assert len(outputs) > 1
    for p, a, r in zip(prompts, adapters, results, strict=True):
        assert r.finish_reason == "length" and len(r.token_ids) == 10 and r.prompt_tokens == len(p)
        _assert_same_greedy(merged[a], p, r.token_ids)


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_logprobs_equal_a_teacher_forced_forward(hf_and_dir, rng_seed, quantize):
    _, path = hf_and_dir
    policy = _policy(path, quantize, seed=rng_seed)
    prompts = _prompts(rng_seed, [4, 2, 8, 6])
    adapters = ["attacker", "defender", None, "attacker"]
    temperatures = [0.7, 1.0, 1.3, 0]
    requests = [RolloutRequest(p, a, SamplingParams(temperature=t, max_new_tokens=9, ignore_eos=True))
                for p, a, t in zip(prompts, adapters, temperatures, strict=True)]
    results = EmbeddedEngine(policy, max_batch=4, max_seq_len=32, seed=rng_seed).generate(requests)
    for req, r, t in zip(requests, results, temperatures, strict=True):
        full = torch.tensor([list(req.prompt_ids) + r.token_ids])
        with torch.no_grad():
            logits = policy.logits(full, [req.adapter])[0, len(req.prompt_ids) - 1: -1]
        expected = torch.log_softmax(logits / (t if t > 0 else 1.0), -1).gather(
            1, torch.tensor(r.token_ids)[:, None]).squeeze(1)
        got = torch.tensor(r.logprobs)
        assert got.shape == expected.shape
        assert (got - expected).abs().max() <= 1e-4, f"temperature {t}: {got} vs {expected}"
    assert min(min(r.logprobs) for r in results[:3]) < -0.5, "only near-certain tokens: the test is weak"


def test_rows_finishing_at_very_different_lengths_with_refill(hf_and_dir, rng_seed):
    """More requests than rows: finished rows leave at once and waiting ones take their slots; every
    row must equal the same request generated alone."""
    _, path = hf_and_dir
    policy = _policy(path, seed=rng_seed)
    lengths = [1, 30, 2, 17, 5, 3, 24, 1, 9]
    prompts = _prompts(rng_seed, [2, 6, 3, 5, 1, 8, 4, 2, 7])
    adapters = ["attacker", "defender", None] * 3
    requests = [RolloutRequest(p, a, SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True))
                for p, a, n in zip(prompts, adapters, lengths, strict=True)]
    engine = EmbeddedEngine(policy, max_batch=3, max_seq_len=48)
    together = engine.generate(requests)
    assert engine.stats.decode_tokens == sum(lengths) - len(lengths)  # no finished row is decoded again
    alone_engine = EmbeddedEngine(policy, max_batch=1, max_seq_len=48)
    for req, r in zip(requests, together, strict=True):
        (alone,) = alone_engine.generate([req])
        assert r.token_ids == alone.token_ids and len(r.token_ids) == req.sampling.max_new_tokens
        assert max(abs(a - b) for a, b in zip(r.logprobs, alone.logprobs, strict=True)) <= 1e-4


def test_stop_strings_stop_ids_and_the_kv_budget(hf_and_dir):
    from abs_fast.model import load_qwen25_tokenizer

    tokenizer = load_qwen25_tokenizer()
    _, path = hf_and_dir
    policy = _policy(path)
    prompt = _prompts(0, [5])[0]
    engine = EmbeddedEngine(policy, tokenizer=tokenizer, max_batch=4, max_seq_len=40)
    free = engine.generate([RolloutRequest(prompt, "attacker",
                                           SamplingParams(temperature=0, max_new_tokens=20, ignore_eos=True))])[0]
    assert free.text == tokenizer.decode(free.token_ids)
    # a stop string: the text of the first token (after the first) not seen earlier in the run
    k = next(k for k in range(2, 21) if tokenizer.decode(free.token_ids[k - 1:k])
             and tokenizer.decode(free.token_ids[k - 1:k]) not in tokenizer.decode(free.token_ids[:k - 1]))
    prefix_text = tokenizer.decode(free.token_ids[:k])
    stop = tokenizer.decode(free.token_ids[k - 1:k])
    stopped, by_id, budget = engine.generate([
        RolloutRequest(prompt, "attacker", SamplingParams(temperature=0, max_new_tokens=20, stop=(stop,),
                                                          ignore_eos=True)),
        RolloutRequest(prompt, "attacker", SamplingParams(temperature=0, max_new_tokens=20,
                                                          stop_token_ids=(free.token_ids[3],), ignore_eos=True)),
        RolloutRequest(prompt, "attacker", SamplingParams(temperature=0, max_new_tokens=100, ignore_eos=True)),
    ])
    assert stopped.finish_reason == "stop" and stopped.matched_stop == stop
    assert stopped.token_ids == free.token_ids[:k] and stopped.text == prefix_text[: prefix_text.find(stop)]
    first = free.token_ids.index(free.token_ids[3])
    assert by_id.finish_reason == "stop" and by_id.token_ids == free.token_ids[: first + 1]
    assert by_id.text == tokenizer.decode(free.token_ids[:first])  # the stop token is not in the text
    assert budget.finish_reason == "length" and len(prompt) + len(budget.token_ids) == 40
    assert budget.token_ids[:20] == free.token_ids


def test_eos_stops_unless_ignored(hf_and_dir):
    _, path = hf_and_dir
    policy = _policy(path)
    prompt = _prompts(1, [4])[0]
    engine = EmbeddedEngine(policy, max_batch=2, max_seq_len=32)
    free = engine.generate([RolloutRequest(prompt, None, SamplingParams(temperature=0, max_new_tokens=8,
                                                                        ignore_eos=True))])[0]
    policy.model.config.__dict__["eos_token_ids"] = (free.token_ids[2],)  # frozen dataclass: test-only edit
    try:
        (r,) = engine.generate([RolloutRequest(prompt, None, SamplingParams(temperature=0, max_new_tokens=8))])
    finally:
        policy.model.config.__dict__["eos_token_ids"] = ()
    first = free.token_ids.index(free.token_ids[2])
    assert r.finish_reason == "stop" and r.token_ids == free.token_ids[: first + 1]


def test_sampling_filters_and_seeds(hf_and_dir, rng_seed):
    _, path = hf_and_dir
    policy = _policy(path)
    prompts = _prompts(rng_seed, [3, 6])

    def run(params, seed=0):
        engine = EmbeddedEngine(policy, max_batch=2, max_seq_len=32, seed=seed)
        return [r.token_ids for r in engine.generate([RolloutRequest(p, "defender", params) for p in prompts])]

    greedy = run(SamplingParams(temperature=0, max_new_tokens=8, ignore_eos=True))
    assert run(SamplingParams(temperature=1.5, top_k=1, max_new_tokens=8, ignore_eos=True)) == greedy
    assert run(SamplingParams(temperature=1.5, top_p=1e-6, max_new_tokens=8, ignore_eos=True)) == greedy
    hot = SamplingParams(temperature=2.0, max_new_tokens=8, ignore_eos=True)
    assert run(hot, seed=rng_seed) == run(hot, seed=rng_seed)
    assert run(hot, seed=rng_seed) != run(hot, seed=rng_seed + 1)


def test_sampling_frequencies_follow_the_filtered_distribution(rng_seed):
    from abs_fast.rollout.sampling import sample_next

    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]]).repeat(20000, 1)
    gen = torch.Generator().manual_seed(rng_seed)
    n = logits.shape[0]
    tokens, logprobs = sample_next(logits, torch.full((n,), 0.8), torch.full((n,), 3), torch.full((n,), 0.9), gen)
    probs = torch.softmax(logits[0] / 0.8, -1)
    kept = probs[:3] / probs[:3].sum()  # top-3, then top-p 0.9 keeps them all (mass before the third < 0.9)
    counts = torch.bincount(tokens, minlength=5).double() / n
    assert counts[3:].sum() == 0
    assert (counts[:3] - kept).abs().max() < 0.015  # about 4 standard deviations at n = 20000
    assert torch.allclose(logprobs, torch.log(probs)[tokens])  # unfiltered log-prob at the temperature


def test_request_errors_name_the_request(hf_and_dir):
    _, path = hf_and_dir
    engine = EmbeddedEngine(_policy(path), max_batch=2, max_seq_len=16)
    ok = RolloutRequest([1, 2, 3])
    with pytest.raises(ValueError, match="request 1: empty prompt"):
        engine.generate([ok, RolloutRequest([])])
    with pytest.raises(KeyError, match="request 0: no adapter named 'judge'"):
        engine.generate([RolloutRequest([1], "judge")])
    with pytest.raises(ValueError, match="request 0: prompt of 16 tokens"):
        engine.generate([RolloutRequest(list(range(16)))])
    with pytest.raises(ValueError, match="need a tokenizer"):
        engine.generate([RolloutRequest([1], None, SamplingParams(stop=("x",)))])
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(TypeError, match="sequences"):
        SamplingParams(stop="</answer>")


def test_nf4_engine_on_the_default_dispatch_matches_the_reference(hf_and_dir, monkeypatch, rng_seed):
    """Decode steps of an NF4 policy go to the native library (or Triton) by default; the tokens and
    log-probs must be those of the PyTorch reference."""
    _, path = hf_and_dir
    policy = _policy(path, "nf4", seed=rng_seed)
    requests = [RolloutRequest(p, a, SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True))
                for p, a in zip(_prompts(rng_seed, [3, 5, 2]), ["attacker", "defender", None], strict=True)]
    reference = EmbeddedEngine(policy, max_batch=3, max_seq_len=16).generate(requests)
    monkeypatch.setenv("ABS_FAST_BACKEND", "auto")
    dispatched = EmbeddedEngine(policy, max_batch=3, max_seq_len=16).generate(requests)
    for a, b in zip(reference, dispatched, strict=True):
        assert a.token_ids == b.token_ids
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs, strict=True)) <= 1e-4
