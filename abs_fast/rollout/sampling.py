"""Batched next-token sampling where every row has its own temperature, top-k and top-p."""

from __future__ import annotations

import torch

__all__ = ["sample_next"]


def sample_next(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, V] fp32; temperature [B] (0 = greedy), top_k [B] int (0 = off), top_p [B] in (0, 1].

    Returns (tokens [B] int64, logprobs [B] fp32): each token's log-prob under softmax(logits / T),
    the distribution before filtering (temperature 1 for greedy rows), which a teacher-forced
    forward at the same temperature reproduces."""
    greedy = temperature <= 0
    scaled = logits / torch.where(greedy, 1.0, temperature)[:, None]
    logp = torch.log_softmax(scaled, dim=-1)
    tokens = scaled.argmax(dim=-1)
    sampled_rows = ~greedy
    if bool(sampled_rows.any()):
        filtered = scaled
        k_max = int(top_k.max())
        if k_max > 0:
            V = scaled.shape[-1]
            top_values = scaled.topk(min(k_max, V), dim=-1).values
            kth = top_values.gather(1, (top_k.clamp(1, min(k_max, V)) - 1)[:, None])
            filtered = torch.where((top_k[:, None] > 0) & (filtered < kth), float("-inf"), filtered)
        if bool((top_p < 1).any()):
            sorted_logits, order = filtered.sort(dim=-1, descending=True)
            probs = torch.softmax(sorted_logits, dim=-1)
            mass_before = probs.cumsum(dim=-1) - probs  # keep a token while the mass before it < top_p
            drop_sorted = mass_before >= top_p[:, None]
            drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
            filtered = filtered.masked_fill(drop, float("-inf"))
        probs = torch.softmax(filtered, dim=-1)
        # exponential race: argmax p / E with E ~ Exp(1) draws from p, without a cumulative sum
        race = torch.empty_like(probs).exponential_(generator=generator)
        drawn = (probs / race).argmax(dim=-1)
        tokens = torch.where(sampled_rows, drawn, tokens)
    return tokens, logp.gather(1, tokens[:, None]).squeeze(1)
