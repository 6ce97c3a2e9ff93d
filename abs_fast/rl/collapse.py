"""Collapse diagnostics: how close the two roles' policies have come to each other.

ABS keeps the attacker and the defender as separate adapters; when one set of weights plays both
roles (the `shared` baseline) the roles can merge. role_kl measures it directly: the KL between the
defender's and the attacker's next-token distributions on the same inputs (the defender's own
turns), near zero when the roles have merged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from abs_fast.model.scoring import micro_batches, packed_logprobs
from abs_fast.rl.kl import kl_k3

__all__ = ["role_kl"]


@torch.no_grad()
def role_kl(policy, turns: Sequence[tuple[Sequence[int], Sequence[int]]], sampled_from: str | None,
            other: str | None, temperature: float = 1.0, token_budget: int = 8192) -> tuple[float, int]:
    """Per-token KL(sampled_from || other) on (prompt_ids, response_ids) turns whose responses were
    sampled from adapter `sampled_from` at `temperature` (k3 estimator: unbiased and >= 0).
    Returns (mean over response tokens, tokens); (nan, 0) without tokens."""
    turns = [(list(p), list(r)) for p, r in turns if len(r) > 0]
    if not turns:
        return float("nan"), 0
    own, against = policy.adapter_id(sampled_from), policy.adapter_id(other)
    if own == against:  # one set of weights: the distributions are identical, not just close
        return 0.0, sum(len(r) for _, r in turns)
    total, tokens = 0.0, 0
    # each turn is read twice (under both adapters) in one packed row
    for batch in micro_batches([2 * (len(p) + len(r)) for p, r in turns], token_budget):
        items = [(turns[i][0], turns[i][1], own) for i in batch] + [(turns[i][0], turns[i][1], against)
                                                                   for i in batch]
        logprobs = packed_logprobs(policy, items, temperature=temperature)
        n = len(batch)
        for logp, logq in zip(logprobs[:n], logprobs[n:], strict=True):
            total += float(kl_k3(logp.double(), logq.double()).sum())
            tokens += logp.numel()
    return total / tokens, tokens
