"""The self-play loop (docs/DESIGN.md, "One self-play step").

Per step: take seeds, split them into generated and vanilla games; wave 1 (attacker turns of
generated games with defender turns of vanilla games, one engine batch); wave 2 (defender turns of
generated games); format checks, the judge, rewards; one RL update over both roles; metrics;
a checkpoint on schedule. Modes: bipolicy (ABS), shared (one adapter plays both roles),
defender-only and attacker-only (the other role is the frozen base).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import resource
import sys
import time
import uuid
from pathlib import Path

import torch

from abs_fast.game import (
    ROLES,
    Judge,
    SeedStream,
    attacker_messages,
    defender_messages,
    encode_turn,
    parse_seed_spec,
    turn_answer,
)
from abs_fast.io import RunDirectory, atomic_write_text, remove_stale_staging
from abs_fast.rollout import EmbeddedEngine, RolloutRequest, SamplingParams
from abs_fast.train.build import (
    adapter_base_info,
    check_before_loading,
    checkpoint_header,
    describe_checkpoint,
    load_judge,
    load_policy_for,
    load_tokenizer_for,
    sglang_engine_for,
    stop_token_ids,
)
from abs_fast.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from abs_fast.train.config import TrainConfig, check_resume, role_adapters
from abs_fast.train.distributed import init_distributed
from abs_fast.train.games import Game, deal_games, game_metrics, score_games
from abs_fast.train.metrics import MetricsLog
from abs_fast.train.update import Sample, UpdateSettings, policy_update
from abs_fast.train.warmstart import read_warmstart_record

__all__ = ["NonFiniteTrainingError", "Trainer", "TrainingInterrupted"]

logger = logging.getLogger(__name__)


class _Clock:
    """Seconds per named phase of a step (`with clock("rollout"): ...`) and since the step began."""

    def __init__(self):
        self.start = time.perf_counter()
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


class NonFiniteTrainingError(RuntimeError):
    """Training stopped: updates kept coming out non-finite (exit status 3 on the command line)."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM, which the command line turns into an interrupt with exit_code 143) during
    training: the step the run had finished and its newest checkpoint, which an interrupt never
    damages (checkpoints are replaced atomically)."""

    def __init__(self, step: int, run_dir: Path, checkpoint: Path | None, exit_code: int = 130):
        super().__init__(f"interrupted at step {step}")
        self.step, self.run_dir, self.checkpoint, self.exit_code = step, run_dir, checkpoint, exit_code


BASE_VALIDITY_WARNING = 0.10  # the share of turns in the format under which train suggests the warm start


class Trainer:
    """Builds the policy, engine, judge and optimizer from a TrainConfig and runs steps.

    judge / policy / tokenizer may be passed in (tests); otherwise they come from the config.
    resume=True continues from the newest checkpoint in config.output.

    Under torchrun (WORLD_SIZE > 1) each process is one data-parallel rank: it plays its share of
    every step's games on its own GPU, adapter gradients are summed over ranks (train/distributed.py),
    and rank 0 alone writes metrics, checkpoints and the final adapters.
    """

    def __init__(self, config: TrainConfig, judge: Judge | None = None, policy=None, tokenizer=None,
                 resume: bool = False, run_directory: RunDirectory | None = None, run_kind: str = "train"):
        self.config = config.validate()
        self.run_dir, self.run_kind = Path(config.output), run_kind
        check_before_loading(config)
        if resume and latest_checkpoint(self.run_dir) is None:
            raise FileNotFoundError(f"--resume: no checkpoint in {self.run_dir / 'checkpoints'}")
        if resume:
            check_resume(config, self.run_dir / "config.json")
        if not resume and latest_checkpoint(self.run_dir) is not None:
            raise FileExistsError(f"{self.run_dir} already holds a run with checkpoints; pass --resume to continue "
                                  "it, or choose another output directory")
        seeds = [s for spec in config.seeds for s in parse_seed_spec(spec)]  # a bad seed file fails before any load
        # collectives wait at least as long as a rank may take to start its SGLang server
        timeout = max(600.0, config.sglang_startup_timeout + 120.0) if config.rollout_engine == "sglang" else 600.0
        self.collective, device = init_distributed(config.device, timeout)
        self.rank_device = None if device == "auto" else device
        rank = self.collective.rank
        # rank 0 alone writes into the run directory: checked now (nothing written), claimed (created, marked,
        # locked) just before the weights load, once every check that needs no weights has passed
        self.run_directory = None
        self._owns_run_directory = run_directory is None
        if self.collective.is_main:
            self.run_directory = run_directory or RunDirectory(self.run_dir, run_kind)
        try:
            self._build(config, judge, policy, tokenizer, resume, device, rank, seeds)
        except BaseException:
            if self.run_directory is not None and self._owns_run_directory:
                self.run_directory.close(failed=True)
            raise

    def _claim_run_directory(self) -> None:
        if self.run_directory is None:
            return
        self.run_directory.claim()
        for stale in (*remove_stale_staging(self.run_dir), *remove_stale_staging(self.run_dir / "checkpoints")):
            logger.info("removed %s, left by a run killed mid-write", stale)

    def _build(self, config: TrainConfig, judge, policy, tokenizer, resume: bool, device: str, rank: int,
               seeds: list) -> None:
        if config.check_memory:
            self._check_memory(device)
        self.adapters = role_adapters(config.mode)
        self.trained_roles = tuple(role for role in ROLES if self.adapters[role] is not None)
        self.trained_adapters = tuple(dict.fromkeys(self.adapters[role] for role in self.trained_roles))
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer_for(config)
        self.base_info = adapter_base_info(config, self.tokenizer)  # saved beside every adapter
        if self.collective.is_main:  # the run header: what the checkpoint is, read from its files
            logger.info("%s", checkpoint_header(describe_checkpoint(config, self.tokenizer)))
            warm = read_warmstart_record(config.model)
            if warm is not None:
                before, after = warm.get("validity_before", {}), warm.get("validity_after", {})
                logger.info("warm-started from %s: format validity %s", warm.get("source"), ", ".join(
                    f"{role} {before.get(role, float('nan')):.0%} -> {after.get(role, float('nan')):.0%}"
                    for role in ROLES))
        self._check_prompt_budget(seeds)
        self._claim_run_directory()
        self.engine = None
        if config.rollout_engine == "sglang":  # first: the server sizes its memory pool from what is free at start
            self.engine = self._sglang_engine()
        self.policy = policy if policy is not None else load_policy_for(config, self.trained_adapters,
                                                                        device=self.rank_device)
        if config.frozen_defender:  # exploitability: the defender plays a fixed adapter and is not trained
            self.policy.load_adapter(config.frozen_defender, "defender")
            self.adapters["defender"] = "defender"
        self.collective.broadcast_parameters([p for name in self.policy.adapter_names
                                              for p in self.policy.adapter_parameters(name)])
        self.policy.gradient_checkpointing(config.gradient_checkpointing)
        if self.engine is None:
            max_seq_len = config.max_prompt_tokens + config.attacker_max_new_tokens + config.defender_max_new_tokens
            self.engine = EmbeddedEngine(self.policy, self.tokenizer, max_batch=config.engine_max_batch,
                                         max_seq_len=max_seq_len, seed=config.seed + rank,
                                         prefill_tokens=config.token_budget)
        # the embedded engine samples from the policy's own weights: its log-probs are the old policy's
        self.reuse_sampler_logprobs = config.reuse_sampler_logprobs and isinstance(self.engine, EmbeddedEngine)
        self.judge = judge if judge is not None else load_judge(config, device=self.rank_device)
        self.stream = SeedStream(seeds, config.seed)
        self.rng = torch.Generator().manual_seed(config.seed)  # the games of a step: the same on every rank
        self.update_rng = torch.Generator().manual_seed(config.seed * 1_000_003 + 101 + rank)  # this rank's batches
        self.optimizer = self._build_optimizer()
        self.stop_ids = stop_token_ids(self.tokenizer, self.policy)
        self.step = 0
        self.nonfinite_streak = 0
        resume_step = None
        if resume:
            resume_step = self._resume()
            self.rng.set_state(self.collective.broadcast(self.rng.get_state()))  # one game stream for all ranks
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics = None
        if self.collective.is_main:
            atomic_write_text(self.run_dir / "config.json", json.dumps(config.to_dict(), indent=2) + "\n")
            self.metrics = MetricsLog(self.run_dir, tensorboard=config.tensorboard, resume_step=resume_step)
        # the engine samples from the starting (or resumed) adapters, the frozen defender included
        self._push_adapters(tuple(dict.fromkeys(a for a in self.adapters.values() if a is not None)))

    # --- construction ----------------------------------------------------------------------

    def _check_prompt_budget(self, seeds: list) -> None:
        """Refuse, before loading weights, a max_prompt_tokens that no game prompt fits (every game would
        be dropped and the run would train on nothing)."""
        config = self.config
        shortest = None
        for seed in seeds[:64]:
            messages = attacker_messages(seed.prompt, seed.type, config.reasoning)
            length = len(encode_turn(self.tokenizer, messages, config.reasoning))
            shortest = length if shortest is None else min(shortest, length)
        if shortest is not None and shortest > config.max_prompt_tokens:
            raise ValueError(f"max_prompt_tokens={config.max_prompt_tokens} is shorter than every attacker prompt "
                             f"(the shortest of the first seeds is {shortest} tokens): every game would be dropped. "
                             f"Raise max_prompt_tokens to at least {shortest}")

    def _check_memory(self, device: str) -> None:
        """Refuse a run whose memory plan does not fit the device this rank sees, before loading anything."""
        from abs_fast.train.plan import GIB, free_memory, plan_memory

        kind, free = free_memory(device)
        if free is None:
            return
        target = torch.device(kind if device == "auto" else device)
        plan = plan_memory(self.config, gpu_memory_gb=free / GIB, device=kind, world_size=self.collective.world_size)
        if not plan.fits:
            raise ValueError(f"this run needs about {plan.peak / GIB:.1f} GiB in its {plan.peak_phase} phase but "
                             f"{target} has {free / GIB:.1f} GiB free. " + " ".join(f"Try {tip}." for tip in
                                                                               plan.advice[:-1])
                             + " (abs-fast plan shows every part; --set check_memory=false skips this check)")

    def _sglang_engine(self):
        config, collective = self.config, self.collective
        # one fleet for every rank (sglang_url): rank 0 pushes the adapters, the others use its names
        tag = collective.broadcast(uuid.uuid4().hex[:8]) if config.sglang_url else None
        # the server runs on this process's GPU (cuda:N, or the local rank's under torchrun)
        gpu = torch.device(self.rank_device).index if (self.rank_device or "").startswith("cuda") else None
        adapters = [*self.trained_adapters, *(["defender"] if config.frozen_defender else [])]
        log_path = self.run_dir / f"sglang-server-rank{collective.rank}.log"
        engine = sglang_engine_for(config, self.tokenizer, adapters, log_path, rank=collective.rank, gpu=gpu,
                                   owner=collective.is_main, name_tag=tag)
        self._share_gpu_with(engine)
        return engine

    def _share_gpu_with(self, engine) -> None:
        """Cap this process's CUDA allocator at what the launched server left free, so the trainer never
        grows into the memory the server needs again when it restarts."""
        free = engine.gpu_free_after_start
        if free is None:
            return
        device = torch.device(self.rank_device) if (self.rank_device or "").startswith("cuda") else \
            torch.device("cuda", torch.cuda.current_device())
        total = torch.cuda.get_device_properties(device).total_memory
        fraction = min(1.0, (free + torch.cuda.memory_reserved(device)) / total)
        torch.cuda.set_per_process_memory_fraction(fraction, device)
        logger.info("sharing %s with the SGLang server: this process may use %.1f of %.1f GiB", device,
                    fraction * total / 2**30, total / 2**30)

    def _push_adapters(self, names: tuple[str, ...]) -> None:
        """Make the engine sample from the policy's current `names`."""
        self.engine.update_adapters(self.policy, names=names)
        if self.config.rollout_engine == "sglang" and self.config.sglang_url:
            self.collective.barrier()  # rank 0 has pushed the versions every rank now names

    def _group_settings(self, name: str) -> dict:
        """The config's optimizer settings of adapter `name`'s param group."""
        config = self.config
        roles = tuple(role for role in self.trained_roles if self.adapters[role] == name)
        return {"base_lr": config.lr_defender if "defender" in roles else config.lr_attacker,
                "betas": (config.adam_beta1, config.adam_beta2), "weight_decay": config.weight_decay}

    def _build_optimizer(self) -> torch.optim.Optimizer:
        """AdamW with one param group per trained adapter, named after it (policy_update's contract)."""
        groups = []
        for name in self.trained_adapters:
            settings = self._group_settings(name)
            groups.append({"params": self.policy.adapter_parameters(name), "lr": settings["base_lr"], "name": name,
                           **settings})
        return torch.optim.AdamW(groups, eps=1e-8)

    def _apply_config_to_optimizer(self) -> None:
        """After a resume: the saved Adam moments stay, the settings come from this run's config
        (`--resume --set lr_defender=...` takes effect), and each change is logged."""
        for group in self.optimizer.param_groups:
            for key, value in self._group_settings(group["name"]).items():
                saved = tuple(group[key]) if isinstance(group[key], list | tuple) else group[key]
                if saved != value:
                    logger.info("resume: %s %s %s -> %s (from this run's config)", group["name"], key, saved, value)
                group[key] = value

    # --- checkpoints -----------------------------------------------------------------------

    def _rng_states(self) -> dict[str, torch.Tensor]:
        states = {"torch": torch.get_rng_state(), "trainer": self.rng.get_state(),
                  "update": self.update_rng.get_state()}
        if isinstance(self.engine, EmbeddedEngine):
            states["engine"] = self.engine.generator.get_state().cpu()
        if torch.cuda.is_available():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                states[f"cuda{i}"] = s
        return states

    def save(self) -> Path | None:
        """Write a checkpoint (rank 0; every rank must call it: it gathers the ranks' RNG states)."""
        per_rank = self.collective.gather(self._rng_states())
        if not self.collective.is_main:
            return None
        rng = dict(per_rank[0])
        for rank, states in enumerate(per_rank[1:], 1):
            rng.update({f"rank{rank}.{key}": value for key, value in states.items()})
        state = {"data_position": self.stream.position, "mode": self.config.mode, "seed": self.config.seed,
                 "world_size": self.collective.world_size}
        return save_checkpoint(self.run_dir, self.step, self.policy, self.optimizer, rng, state,
                               keep=self.config.keep_checkpoints, base_info=self.base_info)

    def _resume(self) -> int:
        checkpoint = latest_checkpoint(self.run_dir)
        if checkpoint is None:
            raise FileNotFoundError(f"--resume: no checkpoint in {self.run_dir / 'checkpoints'}")
        state, rng = load_checkpoint(checkpoint, self.policy, self.optimizer)
        self._apply_config_to_optimizer()
        if state.get("mode") != self.config.mode:
            raise ValueError(f"{checkpoint}: saved by a {state.get('mode')!r} run, this run's mode is "
                             f"{self.config.mode!r}")
        self.step = int(state["step"])
        self.stream.position = int(state["data_position"])
        prefix = f"rank{self.collective.rank}." if self.collective.rank else ""
        if prefix + "torch" not in rng:
            logger.warning("%s has no random state for rank %d (saved by %d processes): this rank starts fresh "
                           "random streams", checkpoint, self.collective.rank, state.get("world_size", 1))
        else:
            rng = {key.removeprefix(prefix): value for key, value in rng.items() if key.startswith(prefix) or
                   (not prefix and not key.startswith("rank"))}
            torch.set_rng_state(rng["torch"])
            self.rng.set_state(rng["trainer"])
            if "update" in rng:
                self.update_rng.set_state(rng["update"])
            if isinstance(self.engine, EmbeddedEngine) and "engine" in rng:
                self.engine.generator.set_state(rng["engine"].cpu())  # a CUDA generator's state is a CPU tensor too
            if torch.cuda.is_available():
                torch.cuda.set_rng_state_all([rng[f"cuda{i}"] for i in range(torch.cuda.device_count())
                                              if f"cuda{i}" in rng])
        logger.info("resumed from %s (step %d)", checkpoint, self.step)
        return self.step

    # --- one step ------------------------------------------------------------------------

    def run_step(self) -> dict:
        """Play one batch of games, judge and score them, train on them, record; returns the step's metrics."""
        clock = _Clock()
        if self.policy.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.policy.device)
        games = self._deal()
        with clock("rollout"):
            generated_tokens = self._play(games)
        with clock("judge"):
            played = self._judge(games)
        samples = self._samples(played)
        diagnostics = self._diagnostics_on_schedule(played)
        update = self._update(samples)
        with clock("sync"):
            self._push_adapters(self.trained_adapters)
        self.step += 1
        record = self._record(games, samples, update, diagnostics, clock, generated_tokens)
        if self.step == 1 and self.collective.is_main and self.run_kind != "demo":  # the demo explains its own base
            self._warn_if_the_base_cannot_play(record, games)
        bad = update.get("nonfinite_skipped", 0) + update.get("nonfinite_rolled_back", 0)
        self.nonfinite_streak = self.nonfinite_streak + 1 if bad and not update.get("optimizer_steps") else 0
        if self.nonfinite_streak >= self.config.max_nonfinite_steps:
            raise NonFiniteTrainingError(
                f"{self.nonfinite_streak} steps in a row had only non-finite updates (loss, gradients or the adapters "
                f"after a step); stopped at step {self.step}. The adapters were left as they were before those "
                f"updates; the newest checkpoint in {self.run_dir / 'checkpoints'} is good. Lower the learning "
                "rates or check the model (max_nonfinite_steps sets the patience).")
        if self.step % self.config.checkpoint_every == 0 or self.step == self.config.steps:
            self.save()
        return record

    def _warn_if_the_base_cannot_play(self, record: dict, games: list[Game]) -> None:
        """Step 1's turns came from fresh adapters (B = 0), which is the base itself: its format validity,
        measured before any update. Under 10% every reward is mostly the format penalty, which self-play
        learns little from; the format warm start is the fix."""
        validity = {role: 1.0 - record[f"format_violation/{role}"] for role in ROLES
                    if record.get(f"format_violation/{role}") is not None}
        low = {role: v for role, v in validity.items() if v < BASE_VALIDITY_WARNING}
        if low:
            turns = {"attacker": sum(g.attacker_violated is not None for g in games),
                     "defender": sum(g.defender_violated is not None for g in games)}
            shown = ", ".join(f"{role} {v:.0%} of {turns[role]}" for role, v in validity.items())
            logger.warning("step 0: the base writes the game's <think>/<answer> format in %s turns (measured "
                           "on step 1's games, before any update); under %.0f%%, the format penalty is nearly every "
                           "reward and self-play learns little. Warm-start the base first: `abs-fast warmstart "
                           "--model %s --output DIR`, then train --model DIR (README, 'Format warm start').", shown,
                           100 * BASE_VALIDITY_WARNING, self.config.model)

    def _deal(self) -> list[Game]:
        """This step's games (the same on every rank) and this rank's share of them: whole seeds, with
        all their samples, round robin."""
        config = self.config
        fraction = 1.0 if config.mode == "attacker-only" else config.generated_fraction
        games = deal_games(self.stream.take(config.rollout_batch_size), fraction, config.samples_per_prompt, self.rng)
        if self.collective.enabled:
            games = [g for g in games if g.group % self.collective.world_size == self.collective.rank]
        return games

    def _play(self, games: list[Game]) -> int:
        """Wave 1 (attacker turns of generated games with defender turns of vanilla games, one engine
        batch), then wave 2 (defender turns of generated games). Returns the tokens generated."""
        config = self.config
        wave1 = []
        for game in games:
            if game.kind == "generated":
                messages = attacker_messages(game.seed.prompt, game.seed.type, config.reasoning)
                game.attacker_prompt = encode_turn(self.tokenizer, messages, config.reasoning)
                wave1.append((game, "attacker", game.attacker_prompt))
            else:
                game.defender_query = game.seed.prompt
                game.defender_prompt = self._defender_prompt(game.defender_query)
                wave1.append((game, "defender", game.defender_prompt))
        tokens = 0
        for game, role, result in self._generate(wave1, config.max_prompt_tokens):
            tokens += len(result.token_ids)
            if role == "attacker":
                game.attacker_response, game.attacker_logprobs = result.token_ids, result.logprobs
                game.attacker_text = result.text
                game.defender_query, game.attacker_violated = turn_answer(result.text, config.reasoning)
            else:
                game.defender_response, game.defender_logprobs = result.token_ids, result.logprobs
                game.defender_text = result.text
        wave2 = []
        for game in games:
            if game.kind == "generated" and not game.dropped:
                game.defender_prompt = self._defender_prompt(game.defender_query)
                wave2.append((game, "defender", game.defender_prompt))
        for game, _, result in self._generate(wave2, config.max_prompt_tokens + config.attacker_max_new_tokens):
            tokens += len(result.token_ids)
            game.defender_response, game.defender_logprobs = result.token_ids, result.logprobs
            game.defender_text = result.text
        return tokens

    def _generate(self, turns: list[tuple[Game, str, list[int]]], prompt_limit: int):
        """One engine batch of (game, role, prompt) turns; a prompt longer than `prompt_limit` drops its
        game. Yields (game, role, result)."""
        kept = []
        for game, role, prompt in turns:
            if len(prompt) > prompt_limit:
                game.dropped = "prompt_too_long"
            else:
                kept.append((game, role, RolloutRequest(prompt, self.adapters[role], self._sampling(role))))
        results = self.engine.generate([request for _, _, request in kept])
        for (game, role, _), result in zip(kept, results, strict=True):
            if result.finish_reason == "abort":  # the server dropped this turn (its warning names why)
                game.dropped = "aborted"
                continue
            yield game, role, result

    def _judge(self, games: list[Game]) -> list[Game]:
        """Read each played game's defender answer, judge it and score the game; returns the played games."""
        played = [g for g in games if not g.dropped]
        for game in played:
            game.defender_answer, game.defender_violated = turn_answer(game.defender_text, self.config.reasoning)
        labels = self.judge.classify([g.defender_query for g in played], [g.defender_answer for g in played])
        score_games(played, labels, self.config.reward_variant, self.config.drop_ties)
        return played

    def _samples(self, played: list[Game]) -> list[Sample]:
        """One sample per scored turn of a trained role (GRPO/RLOO groups: one seed, one role)."""
        samples = []
        for game in played:
            for role in self.trained_roles:
                reward = getattr(game, f"{role}_reward")
                if reward is not None:
                    samples.append(Sample(role, self.adapters[role], getattr(game, f"{role}_prompt"),
                                          getattr(game, f"{role}_response"), reward,
                                          group=2 * game.group + ROLES.index(role),
                                          logprobs=getattr(game, f"{role}_logprobs")))
        return samples

    def _set_learning_rates(self) -> None:
        """This step's rates: linear warm-up over warmup_ratio of the steps."""
        warmup = max(1, round(self.config.warmup_ratio * self.config.steps))
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * min(1.0, (self.step + 1) / warmup)

    def _update(self, samples: list[Sample]) -> dict:
        """One RL update over both roles at this step's learning rates."""
        self._set_learning_rates()
        config = self.config
        settings = UpdateSettings(algorithm=config.algorithm, kl_beta=config.kl_beta, clip_eps=config.clip_eps,
                                  reward_clip=config.reward_clip, train_batch_size=config.train_batch_size,
                                  token_budget=config.token_budget, grad_clip=config.grad_clip,
                                  temperature=config.temperature,
                                  reuse_sampler_logprobs=self.reuse_sampler_logprobs)
        return policy_update(self.policy, self.optimizer, samples, settings, self.update_rng,
                             collective=self.collective)

    def _record(self, games: list[Game], samples: list[Sample], update: dict, diagnostics: dict, clock: _Clock,
                generated_tokens: int) -> dict:
        """The step's metrics over every rank's games, logged on rank 0."""
        local = {"tokens": generated_tokens, "rollout": clock.seconds["rollout"], "judge": clock.seconds["judge"],
                 "played": sum(not g.dropped for g in games),
                 "attacker": sum(s.role == "attacker" for s in samples),
                 "defender": sum(s.role == "defender" for s in samples),
                 "memory": _peak_memory_gb(self.policy.device)}
        gathered = self.collective.gather(([g.summary() for g in games], local))
        record = {"step": self.step, "data_position": self.stream.position}
        if gathered is None:
            return record
        ranks = [numbers for _, numbers in gathered]
        total = lambda key: sum(numbers[key] for numbers in ranks)
        slowest = lambda key: max(numbers[key] for numbers in ranks)
        record.update(game_metrics([g for rank_games, _ in gathered for g in rank_games], self.config.reasoning))
        record.update(diagnostics)
        record["samples/attacker"], record["samples/defender"] = total("attacker"), total("defender")
        record.update(update)
        for group in self.optimizer.param_groups:
            record[f"lr/{group['name']}"] = group["lr"]
        record["seconds/rollout"] = slowest("rollout")
        record["tokens_per_second/rollout"] = total("tokens") / max(slowest("rollout"), 1e-9)
        record["seconds/judge"] = slowest("judge")
        record["games_per_second/judge"] = total("played") / max(slowest("judge"), 1e-9)
        record["seconds/sync"] = clock.seconds["sync"]
        record["seconds/step"] = clock.elapsed()
        record["peak_memory_gb"] = slowest("memory")
        if self.collective.enabled:
            record["world_size"] = self.collective.world_size
        self.metrics.log(record)
        return record

    def _sampling(self, role: str) -> SamplingParams:
        config = self.config
        limit = config.attacker_max_new_tokens if role == "attacker" else config.defender_max_new_tokens
        return SamplingParams(temperature=config.temperature, top_p=config.top_p, max_new_tokens=limit,
                              stop_token_ids=self.stop_ids)

    def _defender_prompt(self, query: str) -> list[int]:
        """The defender's turn. In attacker-only mode against the untrained base (no frozen_defender)
        the base gets the raw query without the format instruction, as upstream Self-RedTeam does
        (its no_defender_turn); its assistant turn still starts with the pre-filled reasoning opening and
        its answer is read as any other (the whole reply when it has no <answer> pair). A trained
        defender, frozen or not, gets the instruction it was trained with."""
        reasoning = self.config.reasoning
        instructed = reasoning and (self.config.mode != "attacker-only" or bool(self.config.frozen_defender))
        return encode_turn(self.tokenizer, defender_messages(query, instructed), reasoning)

    def _diagnostics_on_schedule(self, played: list[Game]) -> dict:
        """Every diagnostics_every steps, before the update (the turns were sampled from these adapters),
        on rank 0's share."""
        every = self.config.diagnostics_every
        if not every or (self.step + 1) % every or not self.collective.is_main:
            return {}
        start = time.perf_counter()
        record = self._diagnostics(played)
        record["seconds/diagnostics"] = time.perf_counter() - start
        return record

    def _diagnostics(self, played) -> dict:
        """Attack diversity of this step's attacker prompts, and the KL between the defender's and
        the attacker's distributions on the defender's own turns (0 when one adapter plays both)."""
        from abs_fast.game.diversity import attack_diversity
        from abs_fast.rl.collapse import role_kl

        attacks = [g.defender_query for g in played if g.kind == "generated"]
        record = {}
        if len(attacks) >= 2:
            diversity = attack_diversity(attacks)
            record["diversity/cosine"], record["diversity/self_bleu"] = diversity["cosine"], diversity["self_bleu"]
        # greedy rollouts (temperature 0) are not samples: the KL estimate at temperature 1 is then biased
        turns = [(g.defender_prompt, g.defender_response) for g in played if g.defender_response]
        kl, tokens = role_kl(self.policy, turns, self.adapters["defender"], self.adapters["attacker"],
                             temperature=self.config.temperature or 1.0, token_budget=self.config.token_budget)
        if tokens:
            record["collapse/role_kl"] = kl
        return record

    # --- the run -------------------------------------------------------------------------

    def train(self, progress: bool | None = None) -> list[dict]:
        """Run steps until config.steps; returns this call's step records."""
        progress = (self.config.progress if progress is None else progress) and self.collective.is_main
        records = []
        with contextlib.ExitStack() as stack:
            bar = None
            if progress:
                from tqdm.auto import tqdm
                from tqdm.contrib.logging import logging_redirect_tqdm

                stack.enter_context(logging_redirect_tqdm(loggers=[logging.getLogger("abs_fast")]))
                bar = stack.enter_context(tqdm(total=self.config.steps, initial=self.step,
                                               desc=f"ABS {self.config.mode}", unit="step"))
            if self.metrics is not None:
                stack.callback(self.metrics.close)
            try:
                while self.step < self.config.steps:
                    record = self.run_step()
                    records.append(record)
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(_postfix(record), refresh=True)
            except KeyboardInterrupt as err:
                if bar is not None:
                    bar.leave = False
                raise TrainingInterrupted(self.step, self.run_dir, latest_checkpoint(self.run_dir),
                                          getattr(err, "exit_code", 130)) from None
        if self.collective.is_main:
            for name in self.trained_adapters:
                self.policy.save_adapters(self.run_dir, names=[name], base_info=self.base_info)
        return records

    def close(self) -> None:
        """Stop an SGLang server this run started and leave the process group (data parallel)."""
        close = getattr(self.engine, "close", None)
        if close is not None:
            close()
        if self.metrics is not None:
            self.metrics.close()
        if self.collective.enabled and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        if self.run_directory is not None and self._owns_run_directory:
            self.run_directory.close()


def _postfix(record: dict) -> dict:
    out = {}
    for key, short in (("reward/attacker", "R_att"), ("reward/defender", "R_def"), ("attack_success", "ASR"),
                       ("kl/defender", "KL_def"), ("seconds/step", "s/step")):
        value = record.get(key)
        if isinstance(value, float) and math.isfinite(value):
            out[short] = f"{value:.3f}" if key != "seconds/step" else f"{value:.1f}"
    return out

