"""Comparison helpers shared by the test files."""

from __future__ import annotations

import torch

# fp32 results of the same sums in different orders: ~sqrt(K) * 2^-24 relative to the magnitudes
# summed; 1e-5 of the largest output leaves a wide margin and still catches any wrong term.
FP32_REL = 1e-5


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rel: float, what: str, floor: float = 0.0) -> None:
    """max |actual - expected| <= rel * max(max |expected|, floor) (elementwise-relative checks flake
    on values that are small only because their terms cancelled). floor: the magnitude of the terms
    the values are computed from, for results that can all be small through cancellation."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = max(expected.abs().max().item() if expected.numel() else 0.0, floor)
    err = (actual.double() - expected.double()).abs().max().item() if expected.numel() else 0.0
    assert err <= rel * max(scale, 1e-30), f"{what}: max error {err:.3e} > {rel:.1e} * {scale:.3e}"
