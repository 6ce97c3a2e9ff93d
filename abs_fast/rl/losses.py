"""Policy losses per token: the PPO-clip surrogate and the k3 KL term; token-level aggregation."""

from __future__ import annotations

import torch

from abs_fast.rl.kl import kl_k3

__all__ = ["aggregate_per_role", "kl_loss", "ppo_clip_loss"]


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


def aggregate_per_role(token_loss: torch.Tensor, roles: torch.Tensor, role_tokens: dict[int, int]) -> torch.Tensor:
    """Token-level aggregation, per role: sum over the tokens of each role divided by that role's
    token count in the whole train batch (`role_tokens`), summed over roles. Each adapter's gradient
    is then its own token mean, however its tokens are split into micro-batches."""
    total = token_loss.new_zeros(())
    for role, count in role_tokens.items():
        if count:
            total = total + token_loss[roles == role].sum() / count
    return total
