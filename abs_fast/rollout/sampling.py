"""Batched next-token sampling where every row has its own temperature, top-k and top-p, with no
host synchronisation: what depends on the rows' settings (is any row sampled? the largest top-k?
is top-p on anywhere?) is known on the host when the rows are admitted (`SamplingSettings`), so
the sampler never reads a device value."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["SamplingSettings", "sample_next"]


@dataclass(frozen=True, eq=False)
class SamplingSettings:
    """Per-row temperature [B] (0 = greedy), top_k [B] (0 = off), top_p [B] on the device, and the
    host-side facts the sampler branches on."""

    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    any_sampled: bool
    k_max: int  # the largest top_k of a sampled row (0 = no row uses top-k)
    any_top_p: bool

    @classmethod
    def build(cls, temperatures: Sequence[float], top_ks: Sequence[int], top_ps: Sequence[float],
              device: torch.device | str) -> SamplingSettings:
        sampled = [t > 0 for t in temperatures]
        return cls(torch.tensor(list(temperatures), dtype=torch.float32, device=device),
                   torch.tensor(list(top_ks), dtype=torch.int64, device=device),
                   torch.tensor(list(top_ps), dtype=torch.float32, device=device),
                   any(sampled), max((k for k, s in zip(top_ks, sampled, strict=True) if s), default=0),
                   any(p < 1 for p, s in zip(top_ps, sampled, strict=True) if s))

    def rows(self, count: int) -> SamplingSettings:
        """The settings of the first `count` rows (the host facts stay upper bounds)."""
        return SamplingSettings(self.temperature[:count], self.top_k[:count], self.top_p[:count], self.any_sampled,
                                self.k_max, self.any_top_p)


def sample_next(logits: torch.Tensor, settings: SamplingSettings, generator: torch.Generator | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, V] fp32 -> (tokens [B] int64, logprobs [B] fp32): each token's log-prob under
    softmax(logits / T), the distribution before filtering (temperature 1 for greedy rows), which a
    teacher-forced forward at the same temperature reproduces."""
    temperature = settings.temperature
    greedy = temperature <= 0
    scaled = logits / torch.where(greedy, torch.ones_like(temperature), temperature)[:, None]
    logp = torch.log_softmax(scaled, dim=-1)
    tokens = scaled.argmax(dim=-1)
    if settings.any_sampled:
        filtered = scaled
        V = scaled.shape[-1]
        if settings.k_max > 0:
            k_max = min(settings.k_max, V)
            top_values = scaled.topk(k_max, dim=-1).values
            kth = top_values.gather(1, (settings.top_k.clamp(1, k_max) - 1)[:, None])
            filtered = torch.where((settings.top_k[:, None] > 0) & (filtered < kth), float("-inf"), filtered)
        if settings.any_top_p:
            sorted_logits, order = filtered.sort(dim=-1, descending=True)
            probs = torch.softmax(sorted_logits, dim=-1)
            mass_before = probs.cumsum(dim=-1) - probs  # keep a token while the mass before it < top_p
            drop_sorted = mass_before >= settings.top_p[:, None]
            drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
            filtered = filtered.masked_fill(drop, float("-inf"))
        probs = logp.exp() if filtered is scaled else torch.softmax(filtered, dim=-1)
        # exponential race: argmax p / E with E ~ Exp(1) draws from p, without a cumulative sum;
        # E = -log U from uniforms (on CPU, torch's exponential_ draws about 4x slower than rand)
        race = torch.rand(probs.shape, generator=generator, device=probs.device).log_().neg_()
        drawn = (probs / race).argmax(dim=-1)
        tokens = torch.where(greedy, tokens, drawn)
    return tokens, logp.gather(1, tokens[:, None]).squeeze(1)
