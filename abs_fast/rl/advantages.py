"""Advantages for a batch of sampled responses, as padded [N, L] tensors with a token mask.

REINFORCE++: per-token reward -beta * k1 KL plus the (clipped) game reward on the last token,
returns with gamma 1, then normalised over the valid tokens of each role separately. RLOO, as
upstream (OpenRLHF / Self-RedTeam) computes it: each game reward minus the mean of the other samples
of its group (same seed, same role), clipped, then the same KL-penalised returns and per-role
normalisation as REINFORCE++. GRPO: one group-normalised scalar per sample, spread over its tokens
(its KL is a loss term, not part of the advantage).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from abs_fast.rl.kl import kl_k1

__all__ = ["ADVANTAGE_ESTIMATORS", "compute_advantages", "grpo_advantages", "kl_penalized_returns",
           "normalize_per_role", "reinforce_pp_advantages", "rloo_advantages"]

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


def normalize_per_role(values: torch.Tensor, mask: torch.Tensor, roles: torch.Tensor, eps: float = 1e-8,
                       num_roles: int | None = None,
                       reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """(values - mean) / std over the valid tokens of each role (roles [N] ints) separately.

    The statistics are float64 sums (count, sum, sum of squares) per role; `reduce` (e.g. an
    all-reduce over data-parallel ranks) turns local sums into the whole batch's, in which case
    num_roles must be the same on every rank."""
    valid = mask.bool()
    if num_roles is None:
        num_roles = int(roles.max()) + 1 if roles.numel() else 0
    stats = torch.zeros(num_roles, 3, dtype=torch.float64, device=values.device)
    for role in range(num_roles):
        picked = values[valid & (roles == role)[:, None]].double()
        stats[role] = torch.stack([picked.new_tensor(float(picked.numel())), picked.sum(), (picked * picked).sum()])
    if reduce is not None:
        stats = reduce(stats)
    out = torch.zeros_like(values)
    for role in range(num_roles):
        count, total, squares = stats[role]
        if count == 0:
            continue
        mean = total / count
        std = (squares / count - mean * mean).clamp(min=0).sqrt()
        selected = valid & (roles == role)[:, None]
        out[selected] = ((values[selected].double() - mean) / (std + eps)).to(values.dtype)
    return out


def reinforce_pp_advantages(rewards: torch.Tensor, logp_old: torch.Tensor, logp_ref: torch.Tensor,
                            mask: torch.Tensor, roles: torch.Tensor, kl_beta: float = 0.01,
                            num_roles: int | None = None,
                            reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    returns = kl_penalized_returns(rewards, logp_old, logp_ref, mask, kl_beta)
    return normalize_per_role(returns, mask, roles, num_roles=num_roles, reduce=reduce)


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


def compute_advantages(algorithm: str, rewards: torch.Tensor, groups: torch.Tensor, logp_old: torch.Tensor,
                       logp_ref: torch.Tensor, mask: torch.Tensor, roles: torch.Tensor, kl_beta: float,
                       reward_clip: float, num_roles: int,
                       reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """[N, L] advantages of `algorithm` for game rewards [N] (unclipped), groups [N] (GRPO / RLOO
    comparison sets) and roles [N]; `reduce` sums per-role statistics over data-parallel ranks (groups
    never span ranks, so group statistics stay local)."""
    if algorithm == "reinforce++":
        clipped = rewards.clamp(-reward_clip, reward_clip)
        return reinforce_pp_advantages(clipped, logp_old, logp_ref, mask, roles, kl_beta, num_roles, reduce)
    if algorithm == "grpo":
        return grpo_advantages(rewards.clamp(-reward_clip, reward_clip), groups)[:, None] * mask
    if algorithm == "rloo":
        baselined = rloo_advantages(rewards, groups).clamp(-reward_clip, reward_clip)
        return reinforce_pp_advantages(baselined, logp_old, logp_ref, mask, roles, kl_beta, num_roles, reduce)
    raise ValueError(f"unknown algorithm {algorithm!r}; choose one of {', '.join(ADVANTAGE_ESTIMATORS)}")
