"""Scoring token sequences with the policy: packed rows of (prompt, response) items, each under its
own adapter, and the log-probability of every response token (no [tokens, vocab] logits).

Shared by the RL update, the collapse diagnostics and evaluation."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from abs_fast.model.attention import Documents, PackedBatch
from abs_fast.ops.backend import matmul_fp32_out
from abs_fast.ops.logprobs import token_logprobs
from abs_fast.ops.routing import AdapterRouting

__all__ = ["head_logits", "micro_batches", "packed_logprobs"]


def head_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """fp32 logits [rows, vocab] from the LM head in the model's dtype, without a copy of the head:
    on CUDA one GEMM with fp32 output (16-bit logits are never rounded), elsewhere the product in
    the model's dtype, then fp32."""
    if hidden.dtype != torch.float32 and hidden.is_cuda and matmul_fp32_out(hidden.device.type):
        return torch.mm(hidden.reshape(-1, hidden.shape[-1]), weight.t(),
                        out_dtype=torch.float32).view(*hidden.shape[:-1], -1)
    return F.linear(hidden, weight).float()


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
    """Log-probs of each item's response tokens, all items packed into one forward.

    items: (prompt_ids, response_ids, adapter_id); the batch holds prompt + response[:-1] of each
    item as its own causal document. Returns a list of [L_i] tensors (and a list of entropies)."""
    device = policy.device
    tokens, positions, ids, gather, targets, lengths = [], [], [], [], [], []
    offset = 0
    for prompt, response, adapter_id in items:
        sequence = list(prompt) + list(response[:-1])
        n = len(sequence)
        tokens += sequence
        positions += range(n)
        ids += [adapter_id] * n
        lengths.append(n)
        start = offset + len(prompt) - 1
        gather += range(start, start + len(response))
        targets += list(response)
        offset += n
    as_tensor = lambda values: torch.tensor(values, dtype=torch.int64, device=device)
    routing = AdapterRouting.from_ids(ids, len(policy.adapter_names), device=device)
    batch = PackedBatch(Documents.from_lengths(lengths, device))
    hidden = policy.model(as_tensor(tokens), routing, as_tensor(positions), batch)
    out = token_logprobs(hidden[as_tensor(gather)], policy.model.lm_head_weight, as_tensor(targets),
                         temperature=temperature, return_entropy=return_entropy)
    sizes = [len(response) for _, response, _ in items]
    if return_entropy:
        return list(out[0].split(sizes)), list(out[1].split(sizes))
    return list(out.split(sizes))
