"""The games of one self-play step: what each game holds as it is played, judged and scored, and the
step's game metrics (docs/GAME.md sections 2-4)."""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass

import torch

from abs_fast.game import OUTCOMES, ROLES, JudgeLabels, score_game

__all__ = ["Game", "deal_games", "game_metrics", "score_games"]


@dataclass
class Game:
    """One game. `kind` "generated": the attacker rewrites the seed, the defender answers the rewrite;
    "vanilla": the defender answers the seed. `group` is the seed's index in the step (its samples)."""

    seed: object  # game.Seed
    kind: str
    group: int
    attacker_prompt: list[int] | None = None
    attacker_response: list[int] | None = None
    attacker_logprobs: list[float] | None = None  # the sampler's, of attacker_response
    attacker_text: str = ""
    attacker_violated: bool | None = None
    defender_query: str = ""
    defender_prompt: list[int] | None = None
    defender_response: list[int] | None = None
    defender_logprobs: list[float] | None = None
    defender_text: str = ""
    defender_answer: str = ""
    defender_violated: bool | None = None
    dropped: str = ""  # why the game left the step before judging
    label: JudgeLabels | None = None
    outcomes: tuple[str, ...] = ()
    attacker_reward: float | None = None
    defender_reward: float | None = None

    def summary(self) -> Game:
        """The fields the step metrics read (what data-parallel ranks send to rank 0)."""
        return dataclasses.replace(self, attacker_prompt=None, attacker_response=None, attacker_logprobs=None,
                                   defender_prompt=None, defender_response=None, defender_logprobs=None,
                                   attacker_text="", defender_text="", defender_answer="", defender_query="")


def deal_games(seeds: list, generated_fraction: float, samples_per_prompt: int, rng: torch.Generator) -> list[Game]:
    """`samples_per_prompt` games per seed; a seeded share `generated_fraction` of the seeds are
    generated games, the rest vanilla."""
    order = torch.randperm(len(seeds), generator=rng).tolist()
    generated = set(order[: round(len(seeds) * generated_fraction)])
    return [Game(seed, "generated" if i in generated else "vanilla", group=i)
            for i, seed in enumerate(seeds) for _ in range(samples_per_prompt)]


def score_games(games: list[Game], labels: list[JudgeLabels], variant: str, drop_ties: bool) -> None:
    """Record each game's labels, outcomes and rewards (None for a role that gets no reward)."""
    for game, label in zip(games, labels, strict=True):
        score = score_game(label, game.seed.type, game.kind, game.attacker_violated, game.defender_violated,
                           variant=variant, drop_ties=drop_ties)
        game.label, game.outcomes = label, tuple(score.outcomes)
        game.attacker_reward, game.defender_reward = score.attacker_reward, score.defender_reward


def _rate(values: list[bool]) -> float:
    return sum(values) / len(values) if values else float("nan")


def game_metrics(games: list[Game], reasoning: bool) -> dict:
    """Rewards, outcome rates, attack success, refusal and collapse rates and format violations of the
    step's games (every rank's, on rank 0)."""
    played = [g for g in games if not g.dropped]
    outcome_counts = Counter(outcome for g in played for outcome in g.outcomes)
    generated = [g for g in played if g.kind == "generated"]
    record: dict = {"games": len(games), "games/generated": len(generated),
                    "games/dropped_prompt_too_long": sum(g.dropped == "prompt_too_long" for g in games),
                    "games/dropped_aborted": sum(g.dropped == "aborted" for g in games)}
    for role in ROLES:
        rewards = [r for g in played if (r := getattr(g, f"{role}_reward")) is not None]
        if rewards:
            record[f"reward/{role}"] = sum(rewards) / len(rewards)
    attacker_outcomes = {o for o in OUTCOMES if "revision" in o or o.startswith(("win_", "lose_"))}
    for outcome in OUTCOMES:
        total = len(generated) if outcome in attacker_outcomes else len(played)
        record[f"outcome/{outcome}"] = outcome_counts[outcome] / total if total else 0.0
    record["ties"] = outcome_counts["tie"]
    record["judge_parse_errors"] = outcome_counts["parse_error"]
    harm = [g.label.response_harmful for g in generated if g.label.response_harmful is not None]
    record["attack_success"] = _rate(harm)
    record["games/judged_generated"] = len(harm)
    # collapse drift: always-refuse on benign seeds, and refusals of the attacker's own prompts
    record["collapse/refusal_benign_seeds"] = _rate([g.label.refusal for g in played if g.kind == "vanilla" and
                                                     g.seed.type == "benign" and g.label.refusal is not None])
    record["collapse/refusal_attacker_prompts"] = _rate([g.label.refusal for g in generated
                                                         if g.label.refusal is not None])
    for name, want in (("harmful_prompt", True), ("benign_prompt", False)):
        record[f"refusal_rate/{name}"] = _rate([g.label.refusal for g in played
                                                if g.label.prompt_harmful is want and g.label.refusal is not None])
    if reasoning:
        if generated:
            record["format_violation/attacker"] = _rate([bool(g.attacker_violated) for g in generated])
        if played:
            record["format_violation/defender"] = _rate([bool(g.defender_violated) for g in played])
    return record
