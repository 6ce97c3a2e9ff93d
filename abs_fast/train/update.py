"""One RL update over a batch of sampled responses of both roles (docs/DESIGN.md, "One self-play step", 4 and 5).

1. One no-grad pass over packed rows for the old-policy log-probs (each sample under its own
   adapter) and the reference log-probs (the same tokens under adapter id -1, the base): both in
   the same packed rows, so one pass serves both roles and the anchor.
2. Advantages per the configured estimator.
3. Train batches of `train_batch_size` samples, each split into packed micro-batches of at most
   `token_budget` tokens; one forward+backward per micro-batch over rows that mix both roles; one
   optimizer with one param group per adapter. An adapter whose roles have no tokens in a train
   batch gets no gradient (None), so its parameters and optimizer state stay untouched.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from abs_fast.game import ROLES
from abs_fast.model.scoring import micro_batches, packed_logprobs
from abs_fast.rl import aggregate_token_mean, compute_advantages, kl_k3, kl_loss, ppo_clip_loss
from abs_fast.train.distributed import SINGLE_PROCESS, Collective

__all__ = ["Sample", "UpdateSettings", "policy_update"]

logger = logging.getLogger(__name__)



@dataclass
class Sample:
    """One sampled response to train on. adapter: the adapter that produced it and learns from it."""

    role: str
    adapter: str
    prompt_ids: Sequence[int]
    response_ids: Sequence[int]
    reward: float
    group: int = 0  # samples of one seed and role: the comparison set of GRPO / RLOO
    logprobs: Sequence[float] | None = None  # the sampler's, of response_ids (UpdateSettings.reuse_sampler_logprobs)

    def __len__(self) -> int:  # tokens the packed forward reads
        return len(self.prompt_ids) + len(self.response_ids) - 1


@dataclass
class UpdateSettings:
    algorithm: str = "reinforce++"
    kl_beta: float = 0.01
    clip_eps: float = 0.2
    reward_clip: float = 10.0
    train_batch_size: int = 32
    token_budget: int = 8192
    grad_clip: float = 1.0
    temperature: float = 1.0
    # The sampler's log-probs serve as the old policy's (the policy has not changed since sampling):
    # the no-grad pass then computes only the reference (adapter id -1) half. The first train batch
    # takes the training forward's own values as old (ratio exactly 1, the policy being unchanged);
    # later batches, after an optimizer step, the sampler's.
    reuse_sampler_logprobs: bool = False


def _pad(rows: list[torch.Tensor], length: int, device: torch.device) -> torch.Tensor:
    out = torch.zeros(len(rows), length, dtype=torch.float32, device=device)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def policy_update(policy, optimizer: torch.optim.Optimizer, samples: Sequence[Sample], settings: UpdateSettings,
                  generator: torch.Generator, collective: Collective = SINGLE_PROCESS) -> dict[str, float]:
    """Train on `samples` (both roles mixed). The optimizer has one param group per trained adapter,
    named after it (`name`); each sample trains the group of its `adapter`. Returns metrics.

    Data parallel (collective.world_size > 1): `samples` are this rank's share. Advantage
    statistics, per-adapter token counts and the number of optimizer steps are the whole step's; each
    rank's loss is its tokens' share of the whole step's per-adapter token mean, and adapter gradients
    are summed over ranks before clipping, so every rank takes the step one process would take on
    the union of the shares (with train batches of ceil(train_batch_size / world_size) per rank)."""
    metrics: dict[str, float] = {}
    if not samples and not collective.enabled:
        return metrics
    device = policy.device
    temperature = settings.temperature if settings.temperature > 0 else 1.0
    role_index = {role: i for i, role in enumerate(ROLES)}
    roles = torch.tensor([role_index[s.role] for s in samples], device=device, dtype=torch.long)
    adapter_ids = [policy.adapter_id(s.adapter) for s in samples]
    group_names = [g["name"] for g in optimizer.param_groups]
    unknown = sorted({s.adapter for s in samples} - set(group_names))
    if unknown:
        raise ValueError(f"samples of adapter(s) {unknown} have no optimizer param group (groups: {group_names})")
    loss_groups = torch.tensor([group_names.index(s.adapter) for s in samples], device=device, dtype=torch.long)
    reduce = collective.sum if collective.enabled else None

    # 1. log-probs before the update, in packed no-grad passes: the reference (adapter id -1, the
    #    anchor) always; the old policy's (each sample's own adapter) only when the sampler's are not reused
    start = time.perf_counter()
    reuse = settings.reuse_sampler_logprobs
    N = len(samples)
    if reuse:
        for i, s in enumerate(samples):
            if s.logprobs is None or len(s.logprobs) != len(s.response_ids):
                raise ValueError(f"sample {i}: reuse_sampler_logprobs needs the sampler's log-prob of every response "
                                 "token")
    items = [] if reuse else [(s.prompt_ids, s.response_ids, a) for s, a in zip(samples, adapter_ids, strict=True)]
    items += [(s.prompt_ids, s.response_ids, -1) for s in samples]
    scored: list[torch.Tensor] = [None] * len(items)
    entropy: list[torch.Tensor] = [None] * N
    with torch.no_grad():
        for batch in micro_batches([len(items[i][0]) + len(items[i][1]) - 1 for i in range(len(items))],
                                   settings.token_budget):
            logps, ents = packed_logprobs(policy, [items[i] for i in batch], temperature, return_entropy=True)
            for i, lp, ent in zip(batch, logps, ents, strict=True):
                scored[i] = lp
                if not reuse and i < N:
                    entropy[i] = ent
    L = max((len(s.response_ids) for s in samples), default=1)
    if reuse:
        old_rows = [torch.tensor(s.logprobs, dtype=torch.float32, device=device) for s in samples]
        logp_old, logp_ref = _pad(old_rows, L, device), _pad(scored, L, device)
    else:
        logp_old, logp_ref = _pad(scored[:N], L, device), _pad(scored[N:], L, device)
    mask = _pad([torch.ones(len(s.response_ids), device=device) for s in samples], L, device)
    metrics["seconds/logprob"] = time.perf_counter() - start
    token_total = float(collective.sum(torch.tensor([float(sum(len(s) for s in samples))], device=device)))
    metrics["tokens_per_second/logprob"] = len(items) / max(N, 1) * token_total / max(metrics["seconds/logprob"],
                                                                                       1e-9)

    # 2. advantages
    rewards = torch.tensor([s.reward for s in samples], device=device, dtype=torch.float32)
    groups = torch.tensor([s.group for s in samples], device=device, dtype=torch.long)
    advantages = compute_advantages(settings.algorithm, rewards, groups, logp_old, logp_ref, mask, roles,
                                    settings.kl_beta, settings.reward_clip, num_roles=len(ROLES), reduce=reduce)
    role_stats = torch.zeros(len(ROLES), 4, dtype=torch.float64, device=device)  # kl, entropy, tokens, samples
    # the reported KL (kl/<role>): k3, non-negative per token like the KL itself; the penalty in the
    # advantages keeps the estimator its algorithm uses (k1 for REINFORCE++ / RLOO, k3 for GRPO)
    kl_tokens = kl_k3(logp_old, logp_ref)
    for i in role_index.values():
        chosen = (roles == i)[:, None] & mask.bool()
        entropy_sum = _pad(entropy, L, device)[chosen].double().sum() if not reuse else role_stats.new_zeros(())
        role_stats[i] = torch.stack([kl_tokens[chosen].double().sum(), entropy_sum, chosen.sum().double(),
                                     (roles == i).sum().double()])

    # 3. train batches -> packed micro-batches -> one optimizer step per train batch
    start = time.perf_counter()
    order = torch.randperm(N, generator=generator).tolist()
    local_batch = -(-settings.train_batch_size // collective.world_size)
    steps = int(collective.max(torch.tensor([-(-N // local_batch)], device=device)))
    losses, clipped, tokens_seen, steps_taken, skipped, rolled_back = [], 0.0, 0, 0, 0, 0
    norms: dict[str, list[float]] = {name: [] for name in group_names}
    response_lengths = mask.sum(1)
    for step in range(steps):
        batch = order[step * local_batch:(step + 1) * local_batch]
        counts = torch.zeros(len(group_names), device=device)
        if batch:
            counts.index_add_(0, loss_groups[batch], response_lengths[batch])
        group_tokens = dict(enumerate(collective.sum(counts).long().tolist()))
        finite = True
        batch_loss = 0.0
        for micro in micro_batches([len(samples[j]) for j in batch], settings.token_budget):
            chosen = [batch[k] for k in micro]
            items = [(samples[j].prompt_ids, samples[j].response_ids, adapter_ids[j]) for j in chosen]
            scored_now = packed_logprobs(policy, items, temperature, return_entropy=reuse)
            logps, ents = scored_now if reuse else (scored_now, None)
            logp = torch.cat(logps)
            valid = mask[chosen].bool()
            old, adv, ref = logp_old[chosen][valid], advantages[chosen][valid], logp_ref[chosen][valid]
            if reuse:
                if steps_taken == 0:  # the policy is the sampling policy: its own values, ratio exactly 1
                    old = logp.detach()
                token_role = roles[chosen][:, None].expand_as(valid)[valid]
                role_stats[:, 1] += torch.zeros(len(ROLES), dtype=torch.float64, device=device).index_add_(
                    0, token_role, torch.cat(ents).detach().double())
            token_loss, was_clipped = ppo_clip_loss(logp, old, adv, settings.clip_eps)
            if settings.algorithm == "grpo" and settings.kl_beta > 0:
                token_loss = token_loss + settings.kl_beta * kl_loss(logp, ref)
            token_groups = loss_groups[chosen][:, None].expand_as(valid)[valid]
            loss = aggregate_token_mean(token_loss, token_groups, group_tokens)
            if not torch.isfinite(loss):
                finite = False
                break
            loss.backward()
            batch_loss += float(loss.detach())
            clipped += was_clipped.float().sum().item()
            tokens_seen += int(valid.sum())
        finite = int(collective.sum(torch.tensor([0.0 if finite else 1.0], device=device))) == 0
        if finite:
            for index, group in enumerate(optimizer.param_groups):
                name = group["name"]
                if not group_tokens[index]:
                    for p in group["params"]:
                        p.grad = None  # this adapter played no trained role here: leave it untouched
                    continue
                collective.sum_gradients(group["params"])
                params = [p for p in group["params"] if p.grad is not None]
                max_norm = settings.grad_clip if settings.grad_clip > 0 else math.inf
                norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm)) if params else 0.0
                if not math.isfinite(norm):
                    finite = False
                norms[name].append(norm)
        if finite:
            before = _optimizer_snapshot(optimizer)
            optimizer.step()
            if _parameters_finite(optimizer):
                steps_taken += 1
                losses.append(batch_loss)
            else:
                _restore(optimizer, before)
                rolled_back += 1
                logger.warning("train batch %d: the optimizer step made adapter parameters non-finite; rolled back "
                               "(parameters and Adam state as before the step)", step)
        else:
            skipped += 1
            logger.warning("non-finite loss or gradient in train batch %d: optimizer step skipped (adapters unchanged)",
                           step)
        optimizer.zero_grad(set_to_none=True)
    metrics["seconds/train"] = time.perf_counter() - start
    role_stats = collective.sum(role_stats)
    for role, i in role_index.items():
        kl_sum, entropy_sum, tokens, count = role_stats[i].tolist()
        if tokens:
            metrics[f"kl/{role}"] = kl_sum / tokens
            metrics[f"entropy/{role}"] = entropy_sum / tokens
            metrics[f"response_tokens/{role}"] = tokens / count
    metrics["tokens_per_second/train"] = token_total / max(metrics["seconds/train"], 1e-9)
    summed = collective.sum(torch.tensor([sum(losses), clipped, float(tokens_seen)], dtype=torch.float64,
                                         device=device)).tolist()
    if losses:  # no step taken: no loss to report (the summary says n/a)
        metrics["loss"] = summed[0] / len(losses)
    metrics["clip_fraction"] = summed[1] / max(summed[2], 1)
    metrics["optimizer_steps"] = steps_taken
    metrics["nonfinite_skipped"] = skipped
    metrics["nonfinite_rolled_back"] = rolled_back
    for name, values in norms.items():
        if values:
            metrics[f"grad_norm/{name}"] = max(values)
    return metrics


def _optimizer_snapshot(optimizer: torch.optim.Optimizer) -> list[tuple[torch.Tensor, dict]]:
    """Copies of every trained parameter and its optimizer state (LoRA-sized: cheap beside the step)."""
    return [(p.detach().clone(), {k: v.clone() if isinstance(v, torch.Tensor) else v
                                  for k, v in optimizer.state.get(p, {}).items()})
            for group in optimizer.param_groups for p in group["params"]]


def _parameters_finite(optimizer: torch.optim.Optimizer) -> bool:
    params = [p.detach() for group in optimizer.param_groups for p in group["params"]]
    if not params:
        return True
    return bool(torch.stack([torch.isfinite(p).all() for p in params]).all())  # one host sync per step


def _restore(optimizer: torch.optim.Optimizer, snapshot: list[tuple[torch.Tensor, dict]]) -> None:
    params = [p for group in optimizer.param_groups for p in group["params"]]
    with torch.no_grad():
        for p, (value, state) in zip(params, snapshot, strict=True):
            p.copy_(value)
            if state:
                optimizer.state[p] = state
            else:
                optimizer.state.pop(p, None)
