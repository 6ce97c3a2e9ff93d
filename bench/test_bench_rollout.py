"""Rollout and scoring: the embedded engine and token_logprobs against what they replace.

CPU (always), the tiny Qwen2 preset (real 152k vocabulary), fp32:
- "rollout cpu": 32 prompts, half attacker, half defender, 32 new tokens each, greedy.
  engine (baseline): one EmbeddedEngine.generate over the mixed batch;
  hf_peft: Hugging Face generate with PEFT, one call per adapter (set_adapter), padded batches.
  extra_info["tokens"] gives tokens/s (report.py prints time ratios).
- "token logprobs cpu": 512 tokens, hidden 256, vocab 32768: token_logprobs forward+backward
  (baseline) vs log_softmax over full [T, V] logits.
- "sampler race draw" (CPU, and GPU when lent): the race's exponentials over [8, 152k] as
  -log(uniform) (baseline, the sampler's) vs torch's exponential_.
GPU (when lent), the Qwen2.5-7B shape with an NF4 base, bf16:
- "rollout 7b decode": batch 64 (32 + 32 adapters), 128 new tokens: engine vs HF generate + PEFT
  over bitsandbytes; extra_info["peak_bytes"] holds the peak CUDA memory.
- "token logprobs 7b": 8192 tokens x vocab 152064 forward+backward vs full logits + log_softmax.
Run: python -m pytest bench/test_bench_rollout.py --benchmark-only --benchmark-json=rollout.json;
     python bench/report.py rollout.json --baselines engine,fused,log_uniform
"""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, HAS_CUDA, synchronize

from abs_fast.model import build_model, load_policy
from abs_fast.ops import token_logprobs
from abs_fast.rollout import EmbeddedEngine, RolloutRequest, SamplingParams

PROMPTS, PROMPT_LEN, NEW_TOKENS = 32, 24, 32


def _run(benchmark, fn, rounds):
    def step():
        fn()
        synchronize()

    step()
    benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=1)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    build_model("tiny", seed=0, device="cpu", dtype=torch.float32).save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory):
    """A 576-wide Llama (9 query / 3 KV heads, tied embeddings, 49k vocabulary, 4 layers): the shapes
    of the smallest real instruct checkpoints, where the NF4 decode's thread start-up is a large
    share of each projection."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("small")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=4,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                         max_position_embeddings=2048)
    LlamaForCausalLM(config).save_pretrained(str(path))
    return str(path)


def _prompts(n, length, vocab=20000):
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (n, length), generator=gen)


def _greedy_half_and_half(prompts: torch.Tensor, new_tokens: int) -> list[RolloutRequest]:
    """The first half of the prompts for the attacker, the rest for the defender, greedy, no EOS."""
    params = SamplingParams(temperature=0, max_new_tokens=new_tokens, ignore_eos=True)
    half = len(prompts) // 2
    return [RolloutRequest(p.tolist(), "attacker" if i < half else "defender", params) for i, p in enumerate(prompts)]


@pytest.mark.skipif(HAS_CUDA, reason="the CPU suite runs on CPU machines")
@pytest.mark.parametrize("model", ["tiny", "small"])
@pytest.mark.parametrize("variant", ["engine", "engine_nf4", "hf_peft"])
def test_cpu_rollout(benchmark, tiny_dir, small_dir, model, variant, tmp_path):
    """engine_nf4: the same engine over an NF4 base; the small model's 8-row decode batches run the
    native CPU kernel. HF + PEFT runs the dense fp32 weights either way."""
    directory = tiny_dir if model == "tiny" else small_dir
    rows = PROMPTS if model == "tiny" else 8  # <= 16 rows: the native NF4 decode's batches
    prompts = _prompts(rows, PROMPT_LEN)
    half = rows // 2
    benchmark.group = f"rollout cpu {model} {rows} prompts x {NEW_TOKENS} tokens"
    benchmark.extra_info.update(variant=variant, tokens=rows * NEW_TOKENS)
    policy = load_policy(directory, quantize="nf4" if variant == "engine_nf4" else None, device="cpu")
    if variant.startswith("engine"):
        engine = EmbeddedEngine(policy, max_batch=rows, max_seq_len=PROMPT_LEN + NEW_TOKENS)
        requests = _greedy_half_and_half(prompts, NEW_TOKENS)
        fn = lambda: engine.generate(requests)
    else:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        policy.save_adapters(tmp_path)
        hf = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(directory), str(tmp_path / "attacker"),
                                       adapter_name="attacker")
        hf.load_adapter(str(tmp_path / "defender"), adapter_name="defender")
        hf.eval()

        def fn():
            for name, batch in (("attacker", prompts[:half]), ("defender", prompts[half:])):
                hf.set_adapter(name)
                hf.generate(batch, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                            pad_token_id=0)
    with torch.no_grad():
        _run(benchmark, fn, rounds=5)


def _logprob_problem(T, K, V, dtype):
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    hidden = (torch.randn(T, K, generator=gen, device=DEVICE)).to(dtype).requires_grad_()
    weight = (torch.randn(V, K, generator=gen, device=DEVICE) * K**-0.5).to(dtype)
    targets = torch.randint(0, V, (T,), generator=gen, device=DEVICE)
    return hidden, weight, targets


def _logprob_fn(variant, hidden, weight, targets):
    def fused():
        hidden.grad = None
        token_logprobs(hidden, weight, targets).sum().backward()

    def full_logits():
        hidden.grad = None
        logits = (hidden @ weight.T).float()
        torch.log_softmax(logits, -1).gather(1, targets[:, None]).sum().backward()

    return fused if variant == "fused" else full_logits


@pytest.mark.skipif(HAS_CUDA, reason="the CPU suite runs on CPU machines")
@pytest.mark.parametrize("variant", ["fused", "full_logits"])
def test_cpu_token_logprobs(benchmark, variant):
    T, K, V = 512, 256, 32768
    benchmark.group = f"token logprobs cpu T={T} K={K} V={V}"
    benchmark.extra_info.update(variant=variant)
    _run(benchmark, _logprob_fn(variant, *_logprob_problem(T, K, V, torch.float32)), rounds=5)


@pytest.mark.parametrize("draw", ["log_uniform", "exponential_"])
def test_sampler_race_draw(benchmark, draw):
    """The exponentials of the sampler's race over [8, 152k] rows: -log(uniform) (sample_next's draw,
    the baseline) against torch's exponential_ (its former draw), each followed by the race."""
    generator = torch.Generator(device=DEVICE).manual_seed(0)
    probs = torch.softmax(torch.randn(8, 151936, device=DEVICE), dim=-1)
    benchmark.group = "sampler race draw 8x151936"
    benchmark.extra_info.update(variant=draw)

    def race():
        if draw == "exponential_":
            exponentials = torch.empty_like(probs).exponential_(generator=generator)
        else:
            exponentials = torch.rand(probs.shape, generator=generator, device=probs.device).log_().neg_()
        return (probs / exponentials).argmax(dim=-1)

    _run(benchmark, race, rounds=20)


@pytest.mark.skipif(not HAS_CUDA, reason="GPU suite")
@pytest.mark.parametrize("variant", ["fused", "full_logits"])
def test_gpu_token_logprobs(benchmark, variant):
    T, K, V = 8192, 3584, 152064
    benchmark.group = f"token logprobs 7b T={T}"
    benchmark.extra_info.update(variant=variant)
    problem = _logprob_problem(T, K, V, torch.bfloat16)
    torch.cuda.reset_peak_memory_stats()
    _run(benchmark, _logprob_fn(variant, *problem), rounds=10)
    benchmark.extra_info["peak_bytes"] = torch.cuda.max_memory_allocated()


@pytest.mark.skipif(not HAS_CUDA, reason="GPU suite")
@pytest.mark.parametrize("variant", ["engine", "hf_peft_bnb"])
def test_gpu_rollout_7b_decode(benchmark, variant):
    batch, new_tokens, prompt_len = 64, 128, 128
    benchmark.group = f"rollout 7b nf4 decode batch {batch}"
    benchmark.extra_info.update(variant=variant, tokens=batch * new_tokens)
    prompts = _prompts(batch, prompt_len)
    half = batch // 2
    if variant == "engine":
        policy = load_policy("qwen2.5-7b", quantize="nf4", device=DEVICE)
        engine = EmbeddedEngine(policy, max_batch=batch, max_seq_len=prompt_len + new_tokens)
        requests = _greedy_half_and_half(prompts, new_tokens)
        fn = lambda: engine.generate(requests)
    else:
        peft = pytest.importorskip("peft")
        from test_bench_nf4 import hf_bnb_nf4_model

        model = hf_bnb_nf4_model("qwen2.5-7b")
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        config = lambda: peft.LoraConfig(r=16, lora_alpha=32, target_modules=targets)
        model = peft.get_peft_model(model, config(), adapter_name="attacker")
        model.add_adapter("defender", config())
        model.eval()
        rows = {"attacker": prompts[:half].to(DEVICE), "defender": prompts[half:].to(DEVICE)}

        def fn():
            for name, ids in rows.items():
                model.set_adapter(name)
                model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                               pad_token_id=0)
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        _run(benchmark, fn, rounds=3)
    benchmark.extra_info["peak_bytes"] = torch.cuda.max_memory_allocated()


@pytest.mark.skipif(not HAS_CUDA, reason="GPU suite")
def test_gpu_7b_policy_and_engine_memory(benchmark):
    """Peak memory of the 7B NF4 policy plus an engine with a 4k-token KV budget for 32 rows."""
    policy = load_policy("qwen2.5-7b", quantize="nf4", device=DEVICE)
    engine = EmbeddedEngine(policy, max_batch=32, max_seq_len=4096)
    params = SamplingParams(temperature=1.0, max_new_tokens=16, ignore_eos=True)
    requests = [RolloutRequest(p.tolist(), "attacker" if i % 2 else "defender", params)
                for i, p in enumerate(_prompts(32, 512))]
    torch.cuda.reset_peak_memory_stats()
    benchmark.group = "7b nf4 policy + engine memory"
    benchmark.extra_info.update(variant="engine", kv_cache_bytes=engine.kv_cache_bytes())
    with torch.no_grad():
        _run(benchmark, lambda: engine.generate(requests), rounds=1)
    benchmark.extra_info["peak_bytes"] = torch.cuda.max_memory_allocated()
