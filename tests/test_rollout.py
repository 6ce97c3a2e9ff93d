"""The embedded rollout engine against Hugging Face generate and a teacher-forced forward."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from abs_fast.model import build_model, load_policy
from abs_fast.rollout import EmbeddedEngine, RolloutEngine, RolloutRequest, SamplingParams

pytestmark = pytest.mark.usefixtures("reference_backend")


@pytest.fixture
def reference_backend(monkeypatch):
    monkeypatch.setenv("ABS_FAST_BACKEND", "reference")


def _spread_model(tmp_path_factory, name, **overrides):
    """A tiny Qwen2 (GQA: 4 query heads, 2 KV heads) whose logits are spread enough that greedy
    choices are not near-ties, saved."""
    hf = build_model("tiny", seed=11, **overrides)
    with torch.no_grad():
        hf.model.embed_tokens.weight.mul_(8)  # tied head: larger logits
    path = tmp_path_factory.mktemp(name)
    hf.save_pretrained(str(path))
    return hf, str(path)


@pytest.fixture(scope="module")
def hf_and_dir(tmp_path_factory):
    return _spread_model(tmp_path_factory, "model")


@pytest.fixture(scope="module")
def windowed(tmp_path_factory):
    """The same shape with its second layer a sliding-window layer (window 4, shorter than the runs)."""
    hf, path = _spread_model(tmp_path_factory, "windowed", use_sliding_window=True, sliding_window=4,
                             max_window_layers=1)
    assert hf.config.layer_types == ["full_attention", "sliding_attention"]
    return hf, path


@pytest.fixture(params=["sdpa", "triton"])
def decode_attention(request, monkeypatch):
    """Both decode attention paths: the CPU path (SDPA over the grouped query layout) and the Triton
    kernel the CUDA path runs (here under the interpreter)."""
    monkeypatch.setenv("ABS_FAST_DECODE_ATTENTION", request.param)
    return request.param


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


@pytest.mark.parametrize("model", ["full", "sliding-window"])
def test_greedy_mixed_adapter_batch_equals_hf_generate_per_adapter(hf_and_dir, windowed, model, decode_attention,
                                                                   rng_seed):
    """GQA (4 query heads on 2 KV heads), a sliding-window layer, both decode attention paths, and
    polls every 3 steps (rows finish between polls): token for token Hugging Face's generate."""
    hf, path = hf_and_dir if model == "full" else windowed
    policy = _policy(path, seed=rng_seed)
    prompts = _prompts(rng_seed, [3, 9, 5, 1, 12, 7])
    adapters = ["attacker", "defender", None, "defender", "attacker", None]
    params = SamplingParams(temperature=0, max_new_tokens=10, ignore_eos=True)
    engine = EmbeddedEngine(policy, max_batch=8, max_seq_len=64, poll_every=3)
    assert engine.attention == decode_attention
    results = engine.generate([RolloutRequest(p, a, params) for p, a in zip(prompts, adapters, strict=True)])
    merged = {a: _merged(hf, policy, a) for a in set(adapters)}
    outputs = {tuple(r.token_ids) for r in results}
    assert len(outputs) > 1
    for p, a, r in zip(prompts, adapters, results, strict=True):
        assert r.finish_reason == "length" and len(r.token_ids) == 10 and r.prompt_tokens == len(p)
        _assert_same_greedy(merged[a], p, r.token_ids)


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_logprobs_equal_a_teacher_forced_forward(windowed, rng_seed, quantize, decode_attention):
    _, path = windowed
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
    engine = EmbeddedEngine(policy, max_batch=3, max_seq_len=48, poll_every=1)
    together = engine.generate(requests)
    assert engine.stats.decode_tokens == sum(lengths) - len(lengths)  # polled every step: nothing decoded twice
    polled = EmbeddedEngine(policy, max_batch=3, max_seq_len=48, poll_every=4)
    assert [r.token_ids for r in polled.generate(requests)] == [r.token_ids for r in together]
    assert polled.stats.polls < engine.stats.polls
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
    from abs_fast.rollout.sampling import SamplingSettings, sample_next

    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]]).repeat(20000, 1)
    gen = torch.Generator().manual_seed(rng_seed)
    n = logits.shape[0]
    settings = SamplingSettings.build([0.8] * n, [3] * n, [0.9] * n, "cpu")
    tokens, logprobs = sample_next(logits, settings, gen)
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


# --- the decode step at GPU speed: structure, counted on CPU ----------------------------------------

_SYNCING_METHODS = ("item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__")
_SYNCING_OPS = ("aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::unique",
                "aten::_unique2", "aten::bincount", "aten::repeat_interleave")


class _Recorder(torch.utils._python_dispatch.TorchDispatchMode):
    """Every aten op's outputs (shape, dtype), and every op that makes the host wait for the device
    (a scalar read, or an output whose size depends on the data)."""

    def __init__(self):
        super().__init__()
        self.outputs, self.syncs = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func._schema.name
        boolean_index = name == "aten::index" and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                                      for i in (args[1] if len(args) > 1 else ()) if i is not None)
        if name in _SYNCING_OPS or boolean_index:
            self.syncs.append(name)
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor):
                self.outputs.append((name, tuple(t.shape), t.dtype))
        return out


@pytest.fixture
def sync_counter(monkeypatch):
    """Counts host synchronisations by phase of the engine: calls of the Tensor methods that read
    device data on the host, and syncing aten ops, separately inside decode steps and inside polls."""
    counts = {"step": [], "poll": [], "phase": None, "outputs": []}
    for method in _SYNCING_METHODS:
        original = getattr(torch.Tensor, method)

        def counted(self, *args, _original=original, _method=method, **kwargs):
            if counts["phase"] is not None:
                counts[counts["phase"]].append(_method)
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, method, counted)
    for phase, attribute in (("step", "_decode_step"), ("poll", "_poll")):
        original = getattr(EmbeddedEngine, attribute)

        def wrapped(self, *args, _original=original, _phase=phase, **kwargs):
            counts["phase"] = _phase
            recorder = _Recorder()
            try:
                with recorder:
                    return _original(self, *args, **kwargs)
            finally:
                counts["phase"] = None
                counts[_phase] += recorder.syncs
                if _phase == "step":
                    counts["outputs"] += recorder.outputs
        monkeypatch.setattr(EmbeddedEngine, attribute, wrapped)
    return counts


@pytest.mark.parametrize("poll_every", [1, 4, 8])
def test_decode_steps_do_not_synchronise_and_polls_sync_once(hf_and_dir, sync_counter, poll_every, rng_seed):
    """Inside a decode step: no host synchronisation at all (sampling, stop checks and bookkeeping on
    the device); a poll reads everything in one transfer. So at most one sync every poll_every steps."""
    _, path = hf_and_dir
    policy = _policy(path, seed=rng_seed)
    requests = [RolloutRequest(p, a, SamplingParams(temperature=t, top_k=k, top_p=tp, max_new_tokens=n,
                                                    stop_token_ids=(7,)))
                for p, a, t, k, tp, n in zip(_prompts(rng_seed, [3, 6, 2, 5]), ["attacker", "defender", None, None],
                                             [0.0, 1.0, 0.7, 1.3], [0, 5, 0, 40], [1.0, 0.9, 0.8, 1.0],
                                             [17, 9, 24, 12], strict=True)]
    engine = EmbeddedEngine(policy, max_batch=2, max_seq_len=64, poll_every=poll_every)
    engine.generate(requests)
    steps, polls = engine.stats.decode_steps, engine.stats.polls
    assert steps > 3 * poll_every and sync_counter["step"] == []
    assert len(sync_counter["poll"]) == polls  # one transfer per poll
    # polls happen every poll_every steps, or earlier when every live row must have finished
    assert polls <= steps / poll_every + 2 * len(requests)


def test_decode_step_copies_neither_kv_nor_the_head(hf_and_dir, sync_counter, rng_seed):
    """A bf16 model: no tensor of a decode step holds K or V expanded to every query head, and no fp32
    copy of the bf16 LM head exists (only the [rows, vocab] logits are fp32)."""
    _, path = hf_and_dir
    policy = load_policy(path, quantize=None, device="cpu", dtype=torch.bfloat16)
    config = policy.config
    prompts = _prompts(rng_seed, [9, 4, 6])
    requests = [RolloutRequest(p, a, SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True))
                for p, a in zip(prompts, ["attacker", "defender", None], strict=True)]
    engine = EmbeddedEngine(policy, max_batch=3, max_seq_len=32, poll_every=4)
    engine.generate(requests)
    outputs = sync_counter["outputs"]
    assert outputs and engine.stats.decode_steps >= 10
    for name, shape, dtype in outputs:
        expanded = len(shape) == 4 and shape[1] == config.num_heads and shape[2] > 1 and shape[3] == config.head_dim
        assert not expanded, f"{name} made {shape}: K/V expanded to every query head"
        head_copy = dtype == torch.float32 and sorted(shape) == sorted((config.vocab_size, config.hidden_size))
        assert not head_copy, f"{name} made an fp32 {shape}: a copy of the head"
    logits = [shape for name, shape, dtype in outputs if dtype == torch.float32 and config.vocab_size in shape]
    assert logits and all(shape[0] <= 3 for shape in logits)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graph_replay_equals_eager_decoding(hf_and_dir, rng_seed):
    """The same requests (greedy and seeded sampling, both adapters and the base, rows finishing at
    different lengths so batches shrink across graph buckets) through graph replay and through eager
    decode steps: the same tokens, log-probs equal to rounding."""
    _, path = hf_and_dir
    policy = load_policy(path, quantize="nf4", device="cuda")
    gen = torch.Generator().manual_seed(rng_seed)
    with torch.no_grad():
        for layer in policy.target_layers().values():
            for name in layer.adapter_names:
                layer.lora_B[name].copy_(torch.randn(layer.lora_B[name].shape, generator=gen) * 0.1)
    prompts = _prompts(rng_seed, [3, 9, 5, 2, 7, 4])
    requests = [RolloutRequest(p, a, SamplingParams(temperature=t, top_k=k, max_new_tokens=n, ignore_eos=True))
                for p, a, t, k, n in zip(prompts, ["attacker", "defender", None, "attacker", "defender", None],
                                         [0, 1.0, 0.7, 0, 1.0, 0.9], [0, 20, 0, 0, 5, 0], [12, 5, 20, 3, 17, 9],
                                         strict=True)]
    graphed = EmbeddedEngine(policy, max_batch=8, max_seq_len=40, seed=rng_seed, cuda_graphs=True)
    eager = EmbeddedEngine(policy, max_batch=8, max_seq_len=40, seed=rng_seed, cuda_graphs=False)
    assert graphed.cuda_graphs, "the Triton decode attention (the graph-capturable path) was not chosen"
    for a, b in zip(graphed.generate(requests), eager.generate(requests), strict=True):
        assert a.token_ids == b.token_ids
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs, strict=True)) <= 1e-3


class _ReadStorages(torch.utils._python_dispatch.TorchDispatchMode):
    """The storages an op reads that no op inside the mode made: what a CUDA graph of the region
    would read by address from outside it."""

    def __init__(self):
        super().__init__()
        self.made, self.read = set(), {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves((args, kwargs)):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.made:
                self.read.setdefault(t.untyped_storage().data_ptr(), (str(func), tuple(t.shape)))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.made.add(t.untyped_storage().data_ptr())
        return out


def _decode_reads(engine, count):
    with _ReadStorages() as mode:
        engine._decode_logits(count)
    return mode.read


def test_graph_fingerprint_covers_what_a_decode_step_reads_and_adapter_reloads_reach_it(hf_and_dir, tmp_path):
    """Every storage the decode step (the region a CUDA graph captures) reads from outside is in the
    engine's graph fingerprint, but for the process-lifetime NF4 code table. Loading new adapter
    weights (new values, a new alpha, same rank) leaves the fingerprint and the storages read as they
    were, holding the new values, so a captured graph's replay sees them; a new rank changes the
    fingerprint, so the graphs are captured again."""
    from abs_fast.quant.nf4 import code_table

    _, path = hf_and_dir
    policy = load_policy(path, quantize="nf4", device="cpu", rank=4, alpha=8)
    engine = EmbeddedEngine(policy, max_batch=4, max_seq_len=24, seed=0)
    engine.generate([RolloutRequest(p, a, SamplingParams(max_new_tokens=2, ignore_eos=True))
                     for p, a in zip(_prompts(0, [3, 5]), ["attacker", "defender"], strict=True)])
    fingerprint = engine._graph_fingerprint()
    reads = _decode_reads(engine, 2)
    lifetime = {code_table("cpu").untyped_storage().data_ptr()}
    outside = {ptr: what for ptr, what in reads.items() if ptr not in set(fingerprint) | lifetime}
    assert not outside, f"read by the decode step but not in the fingerprint: {list(outside.values())[:5]}"

    donor = load_policy(path, quantize=None, device="cpu", rank=4, alpha=8, adapters=("attacker",), seed=3)
    with torch.no_grad():
        for layer in donor.target_layers().values():
            layer.lora_B["attacker"].normal_(0, 0.1)
    donor.save_adapters(tmp_path / "same-rank")
    config = json.loads((tmp_path / "same-rank" / "attacker" / "adapter_config.json").read_text())
    config["lora_alpha"] = 20  # a new scaling for every layer
    (tmp_path / "same-rank" / "attacker" / "adapter_config.json").write_text(json.dumps(config))
    scaling_before = [layer.scaling.clone() for layer in policy.target_layers().values()]
    policy.load_adapter(tmp_path / "same-rank" / "attacker", "attacker")
    assert engine._graph_fingerprint() == fingerprint
    assert set(_decode_reads(engine, 2)) == set(reads), "a reload moved a tensor the captured graph reads"
    layer = next(iter(policy.target_layers().values()))
    assert layer.scaling[layer.adapter_id("attacker")] == 5.0 and not torch.equal(layer.scaling, scaling_before[0])

    wider = load_policy(path, quantize=None, device="cpu", rank=8, alpha=8, adapters=("attacker",), seed=4)
    wider.save_adapters(tmp_path / "wider")
    policy.load_adapter(tmp_path / "wider" / "attacker", "attacker")
    assert engine._graph_fingerprint() != fingerprint  # new stacks: the graphs are captured again


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graphs_on_the_real_decode_path_see_adapters_loaded_after_capture(hf_and_dir, tmp_path, monkeypatch,
                                                                             rng_seed):
    """The decode path the engine takes on a GPU (no forced backend: Triton or native NF4 decode,
    Triton decode attention) captured in CUDA graphs equals eager decoding, before and after new
    adapter weights (new values and alpha, same rank) are loaded into the captured policy."""
    monkeypatch.setenv("ABS_FAST_BACKEND", "auto")
    _, path = hf_and_dir
    policy = load_policy(path, quantize="nf4", device="cuda", rank=4, alpha=8)
    donor = load_policy(path, quantize=None, device="cpu", rank=4, alpha=16, adapters=("defender",), seed=rng_seed)
    with torch.no_grad():
        for layer in donor.target_layers().values():
            layer.lora_B["defender"].normal_(0, 0.2)
    donor.save_adapters(tmp_path)
    prompts = _prompts(rng_seed, [3, 9, 5, 2])
    requests = [RolloutRequest(p, a, SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True))
                for p, a, n in zip(prompts, ["attacker", "defender", None, "defender"], [12, 5, 9, 7], strict=True)]
    graphed = EmbeddedEngine(policy, max_batch=8, max_seq_len=40, seed=rng_seed, cuda_graphs=True)
    eager = EmbeddedEngine(policy, max_batch=8, max_seq_len=40, seed=rng_seed, cuda_graphs=False)
    assert graphed.cuda_graphs
    for reload in (False, True):
        if reload:
            policy.load_adapter(tmp_path / "defender", "defender")
        for a, b in zip(graphed.generate(requests), eager.generate(requests), strict=True):
            assert a.token_ids == b.token_ids, f"after reload={reload}"
            assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs, strict=True)) <= 1e-3
        assert graphed.stats.graph_replays > 0  # the graphs ran (reset by each generate)
