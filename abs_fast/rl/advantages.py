"""Advantages for a batch of sampled responses, as padded [N, L] tensors with a token mask.

REINFORCE++: per-token reward -beta * k1 KL plus the (clipped) game reward on the last token,
returns with gamma 1, then normalised over the valid tokens of each role separately. GRPO and RLOO:
one scalar per sample from its group (same seed, same role), spread over the sample's tokens.
"""

from __future__ import annotations

import torch

from abs_fast.rl.kl import kl_k1

__all__ = ["ADVANTAGE_ESTIMATORS", "grpo_advantages", "kl_penalized_returns", "normalize_per_role",
           "reinforce_pp_advantages", "rloo_advantages"]

ADVANTAGE_ESTIMATORS = ("reinforce++", "grpo", "rloo")


def kl_penalized_returns(rewards: torch.Tensor, logp_old: torch.Tensor, logp_ref: torch.Tensor, mask: torch.Tensor,
                         kl_beta: float) -> torch.Tensor:
    """Returns-to-go [N, L] (gamma 1) of per-token rewards -kl_beta * k1_t, plus rewards[n] on each
    sample's last valid token."""
    mask = mask.to(logp_old.dtype)
    token_rewards = -kl_beta * kl_k1(logp_old, logp_ref) * mask
    lengths = mask.sum(1).long()
    has_tokens = lengths > 0
    rows = torch.arange(len(rewards), device=rewards.device)[has_tokens]
    token_rewards[rows, lengths[has_tokens] - 1] += rewards[has_tokens].to(token_rewards.dtype)
    returns = token_rewards.flip(1).cumsum(1).flip(1)
    return returns * mask


def normalize_per_role(values: torch.Tensor, mask: torch.Tensor, roles: torch.Tensor, eps: float = 1e-8
                       ) -> torch.Tensor:
    """(values - mean) / std over the valid tokens of each role (roles [N] ints) separately."""
    out = torch.zeros_like(values)
    valid = mask.bool()
    for role in roles.unique().tolist():
        selected = valid & (roles == role)[:, None]
        picked = values[selected]
        if picked.numel() == 0:
            continue
        std = picked.std(unbiased=False) if picked.numel() > 1 else picked.new_tensor(0.0)
        out[selected] = (picked - picked.mean()) / (std + eps)
    return out


def reinforce_pp_advantages(rewards: torch.Tensor, logp_old: torch.Tensor, logp_ref: torch.Tensor,
                            mask: torch.Tensor, roles: torch.Tensor, kl_beta: float = 0.01) -> torch.Tensor:
    returns = kl_penalized_returns(rewards, logp_old, logp_ref, mask, kl_beta)
    return normalize_per_role(returns, mask, roles)


def _group_stats(rewards: torch.Tensor, groups: torch.Tensor):
    _, inverse, counts = groups.unique(return_inverse=True, return_counts=True)
    sums = torch.zeros(len(counts), dtype=rewards.dtype, device=rewards.device).index_add_(0, inverse, rewards)
    squares = torch.zeros_like(sums).index_add_(0, inverse, rewards * rewards)
    return inverse, counts.to(rewards.dtype), sums, squares


def grpo_advantages(rewards: torch.Tensor, groups: torch.Tensor, eps: float = 1e-6,
                    scale_by_std: bool = True) -> torch.Tensor:
    """[N]: (r - group mean) / (group std + eps) (population std); 0 for a group of one."""
    inverse, counts, sums, squares = _group_stats(rewards, groups)
    mean = sums / counts
    centred = rewards - mean[inverse]
    if not scale_by_std:
        return centred
    std = (squares / counts - mean * mean).clamp(min=0).sqrt()
    return centred / (std[inverse] + eps)


def rloo_advantages(rewards: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """[N]: r minus the mean reward of the other samples of its group (0 for a group of one)."""
    inverse, counts, sums, _ = _group_stats(rewards, groups)
    n = counts[inverse]
    others = (sums[inverse] - rewards) / (n - 1).clamp(min=1)
    return torch.where(n > 1, rewards - others, torch.zeros_like(rewards))
