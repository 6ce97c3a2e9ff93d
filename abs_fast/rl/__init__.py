"""RL for the game: advantage estimators (REINFORCE++, GRPO, RLOO), KL estimators, policy losses."""

from abs_fast.rl.advantages import (
    ADVANTAGE_ESTIMATORS,
    compute_advantages,
    grpo_advantages,
    kl_penalized_returns,
    normalize_per_role,
    reinforce_pp_advantages,
    rloo_advantages,
)
from abs_fast.rl.kl import kl_k1, kl_k3
from abs_fast.rl.losses import aggregate_token_mean, kl_loss, ppo_clip_loss

__all__ = ["ADVANTAGE_ESTIMATORS", "aggregate_token_mean", "compute_advantages", "grpo_advantages", "kl_k1",
           "kl_k3", "kl_loss", "kl_penalized_returns", "normalize_per_role", "ppo_clip_loss", "reinforce_pp_advantages",
           "rloo_advantages"]
