"""The red-teaming game (docs/GAME.md): prompts for both roles, the format check, judges, outcomes and
rewards, seed data."""

from abs_fast.game.format import FormatCheck, check_format, turn_answer
from abs_fast.game.judges import HeuristicJudge, Judge, JudgeLabels, WildGuardJudge, parse_wildguard, wildguard_input
from abs_fast.game.prompts import THINK_PREFILL, attacker_messages, defender_messages, encode_turn
from abs_fast.game.rewards import GAME_KINDS, OUTCOMES, REWARD_VARIANTS, ROLES, SEED_TYPES, GameScore, score_game
from abs_fast.game.seeds import Seed, SeedStream, builtin_seeds, load_seeds, parse_seed_spec

__all__ = ["GAME_KINDS", "OUTCOMES", "REWARD_VARIANTS", "ROLES", "SEED_TYPES", "THINK_PREFILL", "FormatCheck",
           "GameScore", "HeuristicJudge", "Judge", "JudgeLabels", "Seed", "SeedStream", "WildGuardJudge",
           "attacker_messages", "builtin_seeds", "check_format", "defender_messages", "encode_turn", "load_seeds",
           "parse_seed_spec", "parse_wildguard", "score_game", "turn_answer", "wildguard_input"]
