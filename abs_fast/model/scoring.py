"""Scoring token sequences with the policy: packed rows of (prompt, response) items, each under its
own adapter, and the log-probability of every response token (no [tokens, vocab] logits).

Shared by the RL update, the collapse diagnostics and evaluation."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from abs_fast.ops.logprobs import token_logprobs

__all__ = ["micro_batches", "packed_logprobs"]


def micro_batches(lengths: Sequence[int], token_budget: int) -> list[list[int]]:
    """Consecutive index groups whose lengths sum to at most token_budget (a longer item alone)."""
    batches: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i, n in enumerate(lengths):
        if current and used + n > token_budget:
            batches.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    if current:
        batches.append(current)
    return batches


def packed_logprobs(policy, items: Sequence[tuple[Sequence[int], Sequence[int], int]], temperature: float = 1.0,
                    return_entropy: bool = False):
    """Log-probs of each item's response tokens, all items packed into one row.

    items: (prompt_ids, response_ids, adapter_id); the row holds prompt + response[:-1] of each
    item with positions restarting at 0 (attention stays within an item). Returns a list of [L_i]
    tensors (and a list of entropies)."""
    device = policy.device
    tokens, positions, ids, gather, targets = [], [], [], [], []
    offset = 0
    for prompt, response, adapter_id in items:
        sequence = list(prompt) + list(response[:-1])
        n = len(sequence)
        tokens += sequence
        positions += range(n)
        ids += [adapter_id] * n
        start = offset + len(prompt) - 1
        gather += range(start, start + len(response))
        targets += list(response)
        offset += n
    as_row = lambda values: torch.tensor(values, device=device)[None]
    hidden = policy(as_row(tokens), as_row(ids).to(torch.int32), as_row(positions))
    picked = hidden[0, torch.tensor(gather, device=device)]
    out = token_logprobs(picked, policy.model.lm_head_weight, torch.tensor(targets, device=device),
                         temperature=temperature, return_entropy=return_entropy)
    lengths = [len(response) for _, response, _ in items]
    if return_entropy:
        return list(out[0].split(lengths)), list(out[1].split(lengths))
    return list(out.split(lengths))
