"""Evaluation (docs/GAME.md section 6): safety suites and GSM8K, cross-play, attack diversity,
collapse diagnostics, exploitability, and reports."""

from abs_fast.evaluate.gsm8k import extract_final_number, gsm8k_messages, gsm8k_reference, numbers_match
from abs_fast.evaluate.stats import Rate, rate_of, wilson_interval
from abs_fast.evaluate.suites import HEADLINE_METRICS, SUITE_KINDS, EvalItem, load_suite, parse_suite_spec
from abs_fast.game.diversity import attack_diversity, embedding_similarity, self_bleu, sentence_bleu
from abs_fast.rl.collapse import role_kl

__all__ = ["HEADLINE_METRICS", "SUITE_KINDS", "EvalItem", "Rate", "attack_diversity", "embedding_similarity",
           "extract_final_number", "gsm8k_messages", "gsm8k_reference", "load_suite", "numbers_match",
           "parse_suite_spec", "rate_of", "role_kl", "self_bleu", "sentence_bleu", "wilson_interval"]
