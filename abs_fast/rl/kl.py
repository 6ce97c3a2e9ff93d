"""Per-token KL estimators between the policy and the reference (the base, adapter off).

With samples drawn from the policy and log_ratio = logp - logp_ref:
k1 = log_ratio (unbiased, can be negative); k3 = exp(-log_ratio) - 1 + log_ratio (unbiased, >= 0,
lower variance), as in Schulman's "Approximating KL divergence".
"""

from __future__ import annotations

import torch

__all__ = ["kl_k1", "kl_k3"]


def kl_k1(logp: torch.Tensor, logp_ref: torch.Tensor) -> torch.Tensor:
    return logp - logp_ref


def kl_k3(logp: torch.Tensor, logp_ref: torch.Tensor) -> torch.Tensor:
    log_ratio = logp_ref - logp
    return torch.expm1(log_ratio) - log_ratio
