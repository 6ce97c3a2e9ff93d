"""Advantage estimators, KL estimators and losses against plain per-element loops (float64)."""

import math

import pytest
import torch

from abs_fast.model.scoring import micro_batches
from abs_fast.rl import (
    aggregate_token_mean,
    compute_advantages,
    grpo_advantages,
    kl_k1,
    kl_k3,
    kl_penalized_returns,
    normalize_per_role,
    ppo_clip_loss,
    reinforce_pp_advantages,
    rloo_advantages,
)


def _batch(gen, N=7, L=9):
    lengths = torch.randint(1, L + 1, (N,), generator=gen)
    lengths[0] = L
    mask = (torch.arange(L)[None] < lengths[:, None]).double()
    logp_old = -torch.rand(N, L, generator=gen, dtype=torch.float64) * 3 * mask
    logp_ref = -torch.rand(N, L, generator=gen, dtype=torch.float64) * 3 * mask
    rewards = torch.randn(N, generator=gen, dtype=torch.float64) * 2
    return lengths, mask, logp_old, logp_ref, rewards


def test_kl_penalized_returns_match_a_loop(rng_seed):
    gen = torch.Generator().manual_seed(rng_seed)
    lengths, mask, logp_old, logp_ref, rewards = _batch(gen)
    beta = 0.05
    returns = kl_penalized_returns(rewards, logp_old, logp_ref, mask, beta)
    for n in range(len(rewards)):
        length = int(lengths[n])
        for t in range(returns.shape[1]):
            if t >= length:
                assert returns[n, t] == 0
                continue
            expected = sum(-beta * (float(logp_old[n, s]) - float(logp_ref[n, s])) for s in range(t, length))
            expected += float(rewards[n])  # the game reward sits on the last token; gamma = 1
            assert math.isclose(float(returns[n, t]), expected, rel_tol=1e-12, abs_tol=1e-12)


def test_normalisation_is_separate_per_role(rng_seed):
    gen = torch.Generator().manual_seed(rng_seed)
    _lengths, mask, logp_old, logp_ref, rewards = _batch(gen, N=10)
    roles = torch.tensor([0, 1] * 5)
    adv = reinforce_pp_advantages(rewards, logp_old, logp_ref, mask, roles, kl_beta=0.01)
    for role in (0, 1):
        chosen = mask.bool() & (roles == role)[:, None]
        values = adv[chosen]
        assert abs(float(values.mean())) < 1e-12
        assert math.isclose(float(values.std(unbiased=False)), 1.0, rel_tol=1e-6)  # std + 1e-8
    # the defender's rewards do not move the attacker's advantages
    shifted = rewards.clone()
    shifted[roles == 1] += 100.0
    again = reinforce_pp_advantages(shifted, logp_old, logp_ref, mask, roles, kl_beta=0.01)
    assert torch.equal(again[roles == 0], adv[roles == 0])
    assert torch.all(adv[~mask.bool()] == 0)
    # one valid token in a role: nothing to normalise against, advantage 0
    single = normalize_per_role(torch.ones(1, 3, dtype=torch.float64), torch.tensor([[1.0, 0, 0]]), torch.tensor([1]))
    assert torch.all(single == 0)


def test_rloo_is_upstreams_baseline_then_reinforce_pp_returns(rng_seed):
    """OpenRLHF / Self-RedTeam's RLOO: reward minus the mean of the group's other rewards, clipped,
    then the per-token -beta * KL penalty, returns with gamma 1, and normalisation per role."""
    gen = torch.Generator().manual_seed(rng_seed)
    lengths, mask, logp_old, logp_ref, rewards = _batch(gen, N=8)
    rewards = rewards * 4  # some baselined rewards exceed the clip
    groups = torch.tensor([0, 0, 1, 1, 1, 2, 2, 3])
    roles = torch.tensor([0, 0, 1, 1, 1, 0, 0, 1])
    beta, clip = 0.05, 3.0
    got = compute_advantages("rloo", rewards, groups, logp_old, logp_ref, mask, roles, beta, clip, num_roles=2)
    returns = torch.zeros_like(logp_old)
    for n in range(8):
        others = [float(rewards[m]) for m in range(8) if groups[m] == groups[n] and m != n]
        shaped = float(rewards[n]) - sum(others) / len(others) if others else 0.0
        shaped = min(max(shaped, -clip), clip)
        length = int(lengths[n])
        for t in range(length):
            returns[n, t] = shaped + sum(-beta * float(logp_old[n, s] - logp_ref[n, s]) for s in range(t, length))
    expected = torch.zeros_like(returns)
    for role in (0, 1):
        chosen = mask.bool() & (roles == role)[:, None]
        values = returns[chosen]
        expected[chosen] = (values - values.mean()) / (values.std(unbiased=False) + 1e-8)
    assert torch.allclose(got, expected, rtol=1e-9, atol=1e-9)


def test_grpo_and_rloo_match_loops(rng_seed):
    gen = torch.Generator().manual_seed(rng_seed)
    groups = torch.tensor([3, 3, 3, 3, 8, 8, 5, 1, 1, 1])
    rewards = torch.randn(len(groups), generator=gen, dtype=torch.float64)
    grpo = grpo_advantages(rewards, groups)
    rloo = rloo_advantages(rewards, groups)
    for i in range(len(groups)):
        members = [float(rewards[j]) for j in range(len(groups)) if groups[j] == groups[i]]
        mean = sum(members) / len(members)
        std = math.sqrt(sum((m - mean) ** 2 for m in members) / len(members))
        assert math.isclose(float(grpo[i]), (float(rewards[i]) - mean) / (std + 1e-6), rel_tol=1e-9, abs_tol=1e-9)
        others = [float(rewards[j]) for j in range(len(groups)) if groups[j] == groups[i] and j != i]
        expected = float(rewards[i]) - sum(others) / len(others) if others else 0.0
        assert math.isclose(float(rloo[i]), expected, rel_tol=1e-9, abs_tol=1e-12)
    assert grpo[6] == 0 and rloo[6] == 0  # a group of one


def test_kl_estimators_and_ppo_clip(rng_seed):
    gen = torch.Generator().manual_seed(rng_seed)
    logp = -torch.rand(50, generator=gen, dtype=torch.float64) * 4
    logp_ref = -torch.rand(50, generator=gen, dtype=torch.float64) * 4
    assert torch.equal(kl_k1(logp, logp_ref), logp - logp_ref)
    k3 = kl_k3(logp, logp_ref)
    for a, b, value in zip(logp.tolist(), logp_ref.tolist(), k3.tolist(), strict=True):
        assert math.isclose(value, math.exp(b - a) - 1 - (b - a), rel_tol=1e-9, abs_tol=1e-15)
        assert value >= 0
    # k3 is an unbiased estimate of KL(p || q) under samples from p: check on a small categorical
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    q = torch.tensor([0.2, 0.2, 0.6], dtype=torch.float64)
    exact = float((p * (p / q).log()).sum())
    assert math.isclose(float((p * kl_k3(p.log(), q.log())).sum()), exact, rel_tol=1e-12)

    logp_old = logp + torch.randn(50, generator=gen, dtype=torch.float64) * 0.3
    adv = torch.randn(50, generator=gen, dtype=torch.float64)
    loss, was_clipped = ppo_clip_loss(logp, logp_old, adv, clip_eps=0.2)
    for i in range(50):
        ratio = math.exp(float(logp[i] - logp_old[i]))
        a = float(adv[i])
        expected = -min(ratio * a, min(max(ratio, 0.8), 1.2) * a)
        assert math.isclose(float(loss[i]), expected, rel_tol=1e-12, abs_tol=1e-15)
        assert bool(was_clipped[i]) == (min(max(ratio, 0.8), 1.2) * a < ratio * a)


def test_aggregate_token_mean_is_each_groups_token_mean_across_micro_batches(rng_seed):
    gen = torch.Generator().manual_seed(rng_seed)
    loss = torch.randn(20, generator=gen, dtype=torch.float64)
    groups = torch.randint(0, 2, (20,), generator=gen)
    groups[0], groups[1] = 0, 1
    counts = {0: int((groups == 0).sum()), 1: int((groups == 1).sum())}
    whole = aggregate_token_mean(loss, groups, counts)
    expected = float(loss[groups == 0].mean() + loss[groups == 1].mean())
    assert math.isclose(float(whole), expected, rel_tol=1e-12)
    split = aggregate_token_mean(loss[:7], groups[:7], counts) + aggregate_token_mean(loss[7:], groups[7:], counts)
    assert math.isclose(float(split), expected, rel_tol=1e-12)
    # one group holding every token (shared mode: one adapter, both roles): the plain token mean
    pooled = aggregate_token_mean(loss, torch.zeros_like(groups), {0: 20})
    assert math.isclose(float(pooled), float(loss.mean()), rel_tol=1e-12)


@pytest.mark.parametrize("lengths,budget,expected", [
    ([3, 3, 3], 6, [[0, 1], [2]]),
    ([10, 2, 2], 4, [[0], [1, 2]]),
    ([1], 1, [[0]]),
    ([], 5, []),
])
def test_micro_batches(lengths, budget, expected):
    assert micro_batches(lengths, budget) == expected
