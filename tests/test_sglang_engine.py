"""The real SGLang server against the embedded engine (needs sglang and a CUDA GPU; skipped otherwise).

Greedy decoding of the same prompts, per adapter and for the base, must give the same tokens on both
engines: float32 on both sides, on a small-vocabulary model whose large embeddings make each argmax
clear, so the comparison is exact rather than a tolerance on text.
"""

from __future__ import annotations

import pytest
import torch

from abs_fast.model import build_model, load_policy, load_qwen25_tokenizer
from abs_fast.rollout import EmbeddedEngine, RolloutRequest, SamplingParams

pytestmark = pytest.mark.sglang


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("sglang_model")
    build_model("tiny", seed=3, initializer_range=0.2).save_pretrained(directory)
    load_qwen25_tokenizer().save_pretrained(directory)
    return directory


def test_sglang_greedy_equals_the_embedded_engine_per_adapter(model_dir, tmp_path):
    from abs_fast.rollout.sglang import ServerSettings, SGLangEngine

    policy = load_policy(str(model_dir), quantize=None, adapters=("attacker", "defender"), rank=8, device="cuda",
                         dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name in ("attacker", "defender"):
            for p in policy.adapter_parameters(name):
                p.copy_(torch.randn(p.shape, generator=gen).to(p.device) * 0.05)
    tokenizer = load_qwen25_tokenizer()
    prompts = [tokenizer.encode(text) for text in ("Hello there", "Write a poem about tea", "2 + 2 =")]
    params = SamplingParams(temperature=0.0, max_new_tokens=16, ignore_eos=True)
    requests = [RolloutRequest(p, adapter, params) for adapter in (None, "attacker", "defender") for p in prompts]
    embedded = EmbeddedEngine(policy, tokenizer).generate(requests)
    settings = ServerSettings(model_path=str(model_dir), max_lora_rank=8, lora_target_modules=policy.target_modules,
                              dtype="float32", extra_args=("--disable-cuda-graph", "--mem-fraction-static", "0.3"),
                              log_path=str(tmp_path / "server.log"))
    with SGLangEngine(settings=settings, tokenizer=tokenizer) as engine:
        engine.update_adapters(policy)
        served = engine.generate(requests)
    for request, mine, theirs in zip(requests, embedded, served, strict=True):
        assert theirs.token_ids == mine.token_ids, f"adapter {request.adapter}: {theirs.text!r} vs {mine.text!r}"
        assert theirs.logprobs == pytest.approx(mine.logprobs, abs=1e-3)
    assert len({tuple(r.token_ids) for r in embedded}) > len(prompts)  # the adapters change the outputs
