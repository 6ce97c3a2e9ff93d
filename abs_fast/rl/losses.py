"""Policy losses per token: the PPO-clip surrogate and the k3 KL term; token-level aggregation per adapter."""

from __future__ import annotations

import torch

from abs_fast.rl.kl import kl_k3

__all__ = ["aggregate_token_mean", "kl_loss", "ppo_clip_loss"]


def ppo_clip_loss(logp: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor, clip_eps: float = 0.2
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A), and whether each token was clipped."""
    ratio = torch.exp(logp - logp_old)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * advantages
    return -torch.minimum(unclipped, clipped), clipped < unclipped


def kl_loss(logp: torch.Tensor, logp_ref: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(policy || reference), differentiable in logp (GRPO's loss term)."""
    return kl_k3(logp, logp_ref)


def aggregate_token_mean(token_loss: torch.Tensor, groups: torch.Tensor, group_tokens: dict[int, int]) -> torch.Tensor:
    """Token-level aggregation per loss group (one group per trained adapter): the sum over each
    group's tokens divided by that group's token count in the whole train batch (`group_tokens`),
    summed over groups. Each adapter's gradient is then the mean over all of its tokens, however they
    are split into micro-batches; an adapter that plays both roles (shared mode) pools the tokens of
    both, as upstream Self-RedTeam pools every token of its one model."""
    total = token_loss.new_zeros(())
    for group, count in group_tokens.items():
        if count:
            total = total + token_loss[groups == group].sum() / count
    return total
