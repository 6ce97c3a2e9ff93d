"""`abs-fast eval`: a policy's defender on safety suites and GSM8K, and its attacker's diversity.

Every suite prompt (and every GSM8K question, once with the defender and once with the base) goes
through the rollout engine (embedded, or an SGLang server the caller passes) in one batch, greedy
by default; the safety answers are judged in one judge call. Rates come with counts and 95% Wilson
intervals (docs/GAME.md section 6).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from abs_fast.evaluate.gsm8k import extract_final_number, gsm8k_messages, numbers_match
from abs_fast.evaluate.stats import Rate, rate_of
from abs_fast.evaluate.suites import HEADLINE_METRICS, EvalItem
from abs_fast.evaluate.tables import fmt, fmt_rate, markdown_table, rate_cells
from abs_fast.game import attacker_messages, defender_messages, encode_turn, turn_answer
from abs_fast.game.diversity import attack_diversity
from abs_fast.io import atomic_write_text
from abs_fast.rl.collapse import role_kl
from abs_fast.rollout import EmbeddedEngine, RolloutEngine, RolloutRequest, RolloutResult, SamplingParams

__all__ = ["EvalSettings", "attacker_probe", "eval_markdown", "evaluate_policy", "generate_wave", "safety_metrics",
           "write_eval"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalSettings:
    max_new_tokens: int = 512  # docs/GAME.md section 6
    temperature: float = 0.0  # greedy
    reasoning: bool = True  # the <think>/<answer> format the policy was trained with
    engine_max_batch: int = 64
    seed: int = 0
    attack_samples: int = 64  # seeds the attacker rewrites for the diversity / collapse probe
    attack_temperature: float = 1.0  # the probe samples, as in training (diversity of greedy text means little)
    token_budget: int = 8192  # packed tokens per no-grad pass of the role-KL probe
    progress: bool = False


def generate_wave(policy, tokenizer, requests: list[RolloutRequest], settings: EvalSettings,
                  engine: RolloutEngine | None = None) -> list[RolloutResult]:
    """One engine batch: on `engine` (which already serves the policy's adapters) when given, else on
    an embedded engine with a KV cache sized for this wave's longest prompt."""
    if not requests:
        return []
    if engine is not None:
        results = engine.generate(requests)
        aborted = [i for i, result in enumerate(results) if result.finish_reason == "abort"]
        if aborted:  # a metric over the answers that came back would be biased: none is reported
            from abs_fast.rollout.sglang_server import SGLangRequestError

            raise SGLangRequestError(f"{len(aborted)} of {len(results)} requests were aborted by the server (first: "
                                     f"request {aborted[0]}: {results[aborted[0]].error}); an evaluation needs every "
                                     "answer, see the server's log")
        return results
    longest = max(len(r.prompt_ids) + r.sampling.max_new_tokens for r in requests)
    engine = EmbeddedEngine(policy, tokenizer, max_batch=min(settings.engine_max_batch, len(requests)),
                            max_seq_len=longest + 1, seed=settings.seed, progress=settings.progress)
    return engine.generate(requests)


def safety_metrics(kind: str, items: Sequence[EvalItem], labels: Sequence) -> dict:
    """docs/GAME.md section 6 rates of one suite from its judge labels (JudgeLabels per item)."""
    metrics: dict[str, Rate] = {"harmful_answer_rate": rate_of(lab.response_harmful for lab in labels)}
    for label in ("harmful", "benign"):
        chosen = [lab for item, lab in zip(items, labels, strict=True) if item.label == label]
        if not chosen:
            continue
        refusal = rate_of(lab.refusal for lab in chosen)
        metrics[f"refusal_rate/{label}"] = refusal
        metrics[f"compliance_rate/{label}"] = Rate(refusal.total - refusal.count, refusal.total)
        metrics[f"harmful_answer_rate/{label}"] = rate_of(lab.response_harmful for lab in chosen)
    by_subset = {}
    for subset in sorted({item.subset for item in items if item.subset}):
        chosen = [lab for item, lab in zip(items, labels, strict=True) if item.subset == subset]
        by_subset[subset] = {"harmful_answer_rate": rate_of(lab.response_harmful for lab in chosen),
                             "refusal_rate": rate_of(lab.refusal for lab in chosen)}
    for subset in ("adversarial", "vanilla"):
        if kind in ("wildguardtest", "wildjailbreak") and subset in by_subset:
            metrics[f"harmful_answer_rate/{subset}"] = by_subset[subset]["harmful_answer_rate"]
    unjudged = sum(lab.parse_error or lab.response_harmful is None for lab in labels)
    return {"metrics": {k: v.to_dict() for k, v in metrics.items()},
            "by_subset": {s: {k: v.to_dict() for k, v in m.items()} for s, m in by_subset.items()},
            "unjudged": unjudged}


def evaluate_policy(policy, tokenizer, judge, suites: Sequence[tuple[str, str, Sequence[EvalItem]]],
                    defender: str | None, stop_ids: Sequence[int], settings: EvalSettings | None = None,
                    engine: RolloutEngine | None = None) -> tuple[dict, list[dict]]:
    """Run every suite. suites: (name, kind, items); defender: the adapter that answers (None = the
    base). GSM8K questions are answered by the defender and by the base in the same batch.
    engine: where generation runs (default: an embedded engine over `policy`).
    Returns (results, one record per generation)."""
    settings = settings or EvalSettings()
    sampling = SamplingParams(temperature=settings.temperature, max_new_tokens=settings.max_new_tokens,
                              stop_token_ids=tuple(stop_ids))
    plays = [("defender", defender)] + ([("base", None)] if defender is not None else [])
    jobs = []  # (suite index, item, who, request)
    for index, (_, kind, items) in enumerate(suites):
        for item in items:
            if kind == "gsm8k":
                prompt = encode_turn(tokenizer, gsm8k_messages(item.prompt, settings.reasoning), settings.reasoning)
                jobs += [(index, item, who, RolloutRequest(prompt, adapter, sampling)) for who, adapter in plays]
            else:
                prompt = encode_turn(tokenizer, defender_messages(item.prompt, settings.reasoning), settings.reasoning)
                jobs.append((index, item, "defender", RolloutRequest(prompt, defender, sampling)))
    logger.info("eval: %d generations over %d suite(s), one engine batch", len(jobs), len(suites))
    start = time.perf_counter()
    outputs = generate_wave(policy, tokenizer, [job[3] for job in jobs], settings, engine)
    seconds = time.perf_counter() - start

    records = []
    for (index, item, who, request), output in zip(jobs, outputs, strict=True):
        answer, violated = turn_answer(output.text, settings.reasoning)
        records.append({"suite": suites[index][0], "source": item.source, "label": item.label,
                        "subset": item.subset, "played_by": who, "adapter": request.adapter, "prompt": item.prompt,
                        "response": output.text, "answer": answer, "format_violated": violated,
                        "finish_reason": output.finish_reason, "suite_index": index, "item": item})
    safety = [r for r in records if suites[r["suite_index"]][1] != "gsm8k"]
    start = time.perf_counter()
    labels = judge.classify([r["prompt"] for r in safety], [r["answer"] for r in safety]) if safety else []
    judge_seconds = time.perf_counter() - start
    for record, label in zip(safety, labels, strict=True):
        record["judge"] = label

    results: dict = {"defender": defender, "settings": asdict(settings), "suites": {}}
    for index, (name, kind, items) in enumerate(suites):
        mine = [r for r in records if r["suite_index"] == index]
        entry: dict = {"kind": kind, "n": len(items)}
        if kind == "gsm8k":
            entry["metrics"] = {}
            for who, _ in plays:
                rows = [r for r in mine if r["played_by"] == who]
                for r in rows:
                    r["predicted"] = extract_final_number(r["answer"])
                    r["correct"] = numbers_match(r["predicted"], r["item"].reference)
                entry["metrics"][f"exact_match/{who}"] = rate_of(r["correct"] for r in rows).to_dict()
        else:
            entry.update(safety_metrics(kind, [r["item"] for r in mine], [r["judge"] for r in mine]))
        if settings.reasoning:
            for who, _ in plays:
                rows = [r for r in mine if r["played_by"] == who]
                if rows:
                    entry["metrics"][f"format_violation/{who}"] = rate_of(r["format_violated"] for r in rows).to_dict()
        results["suites"][name] = entry
    tokens = sum(len(o.token_ids) for o in outputs)
    results["throughput"] = {"generations": len(outputs), "seconds": seconds, "generated_tokens": tokens,
                             "prompts_per_second": len(outputs) / max(seconds, 1e-9),
                             "tokens_per_second": tokens / max(seconds, 1e-9), "judge_seconds": judge_seconds}
    for record in records:
        record.pop("suite_index")
        record.pop("item")
        label = record.pop("judge", None)
        if label is not None:
            record["judge"] = {"prompt_harmful": label.prompt_harmful, "refusal": label.refusal,
                               "response_harmful": label.response_harmful, "parse_error": label.parse_error}
    return results, records


def attacker_probe(policy, tokenizer, judge, seeds: Sequence, attacker: str | None, defender: str | None,
                   stop_ids: Sequence[int], settings: EvalSettings | None = None,
                   engine: RolloutEngine | None = None
                   ) -> tuple[dict, list[dict]]:
    """The attacker rewrites `seeds` (sampled, as in training); the defender answers (sampled). Reports
    attack diversity, attack success on harmful seeds, the defender's refusal rate on the attacker's
    prompts, and the KL between defender and attacker on the defender's turns (collapse), computed
    on `policy` itself whichever engine generated."""
    settings = settings or EvalSettings()
    reasoning = settings.reasoning
    sampling = SamplingParams(temperature=settings.attack_temperature, max_new_tokens=settings.max_new_tokens,
                              stop_token_ids=tuple(stop_ids))
    logger.info("attacker probe: %d seeds, two engine batches", len(seeds))
    requests = [RolloutRequest(encode_turn(tokenizer, attacker_messages(s.prompt, s.type, reasoning), reasoning),
                               attacker, sampling) for s in seeds]
    attacks = [turn_answer(o.text, reasoning) for o in generate_wave(policy, tokenizer, requests, settings, engine)]
    turns = [encode_turn(tokenizer, defender_messages(query, reasoning), reasoning) for query, _ in attacks]
    answers = generate_wave(policy, tokenizer, [RolloutRequest(t, defender, sampling) for t in turns], settings,
                            engine)
    replies = [turn_answer(o.text, reasoning)[0] for o in answers]
    labels = judge.classify([query for query, _ in attacks], replies)
    kl, kl_tokens = role_kl(policy, [(t, o.token_ids) for t, o in zip(turns, answers, strict=True)], defender,
                            attacker, temperature=settings.attack_temperature or 1.0,
                            token_budget=settings.token_budget)
    diversity = attack_diversity([query for query, _ in attacks])
    harmful = [lab for s, lab in zip(seeds, labels, strict=True) if s.type == "harmful"]
    result = {
        "attacker": attacker, "defender": defender, "n": len(seeds),
        "diversity": {"cosine": diversity["cosine"], "self_bleu": diversity["self_bleu"]},
        "attack_success": rate_of(lab.response_harmful for lab in harmful).to_dict(),
        "refusal_rate/attacker_prompts": rate_of(lab.refusal for lab in labels).to_dict(),
        "role_kl": kl, "role_kl_tokens": kl_tokens,
    }
    if reasoning:
        result["format_violation/attacker"] = rate_of(v for _, v in attacks).to_dict()
    records = [{"seed": s.prompt, "seed_type": s.type, "attack": query, "response": reply,
                "judge": {"prompt_harmful": lab.prompt_harmful, "refusal": lab.refusal,
                          "response_harmful": lab.response_harmful, "parse_error": lab.parse_error}}
               for s, (query, _), reply, lab in zip(seeds, attacks, replies, labels, strict=True)]
    return result, records


_METRIC_TITLES = {
    "harmful_answer_rate": "harmful-answer rate (all prompts)",
    "harmful_answer_rate/harmful": "harmful-answer rate on harmful prompts",
    "harmful_answer_rate/benign": "harmful-answer rate on benign prompts",
    "harmful_answer_rate/adversarial": "harmful-answer rate, adversarial prompts",
    "harmful_answer_rate/vanilla": "harmful-answer rate, vanilla prompts",
    "refusal_rate/harmful": "refusal on harmful (unsafe) prompts",
    "refusal_rate/benign": "refusal on benign (safe) prompts",
    "compliance_rate/harmful": "compliance on harmful (unsafe) prompts",
    "compliance_rate/benign": "compliance on benign (safe) prompts",
    "exact_match/defender": "exact match, defender",
    "exact_match/base": "exact match, base model",
}


def metric_title(name: str) -> str:
    return _METRIC_TITLES.get(name, name.replace("_", " "))


def metric_order(suite: dict) -> list[str]:
    """A suite's metric names: its headline metrics (docs/GAME.md section 6) first, then the rest."""
    headline = HEADLINE_METRICS.get(suite["kind"], ())
    return [m for m in headline if m in suite["metrics"]] + sorted(m for m in suite["metrics"] if m not in headline)


def eval_markdown(results: dict) -> str:
    """Readable tables of an eval.json (headline metrics first, per suite)."""
    who = results.get("defender") or "base model"
    temperature = results["settings"]["temperature"]
    decoding = "greedy" if temperature == 0 else f"temperature {temperature}"
    lines = [f"# Evaluation of {results.get('policy', who)}", "",
             f"Defender adapter: {who}. Judge: {results.get('judge', 'n/a')}. Decoding: {decoding}, up to "
             f"{results['settings']['max_new_tokens']} new tokens.", ""]
    for name, suite in results["suites"].items():
        headline = HEADLINE_METRICS.get(suite["kind"], ())
        rows = [[metric_title(m), *rate_cells(suite["metrics"][m]), "yes" if m in headline else ""]
                for m in metric_order(suite)]
        unjudged = f", {suite['unjudged']} not judged" if suite.get("unjudged") else ""
        lines += [f"## {name} ({suite['kind']}, {suite['n']} prompts{unjudged})", "",
                  markdown_table(["metric", "value", "count", "95% CI", "headline"], rows), ""]
    probe = results.get("attacker_probe")
    if probe:
        rows = [["attack diversity: MiniLM cosine (lower = more diverse)", fmt(probe["diversity"]["cosine"])],
                ["attack diversity: self-BLEU (lower = more diverse)", fmt(probe["diversity"]["self_bleu"])],
                ["attack success on harmful seeds", fmt_rate(probe["attack_success"])],
                ["defender refusal on the attacker's prompts", fmt_rate(probe["refusal_rate/attacker_prompts"])],
                ["KL(defender || attacker) per token (near 0 = roles merged)", fmt(probe["role_kl"])]]
        lines += [f"## Attacker probe ({probe['n']} seeds, sampled)", "", markdown_table(["metric", "value"], rows), ""]
    tp = results.get("throughput")
    if tp:
        lines += [f"Throughput: {tp['generations']} generations in {tp['seconds']:.1f} s "
                  f"({tp['prompts_per_second']:.2f} prompts/s, {tp['tokens_per_second']:.1f} tokens/s).", ""]
    return "\n".join(lines)


def write_eval(results: dict, records: list[dict], output: str | Path) -> list[Path]:
    """eval.json, eval.md and generations.jsonl in `output` (each written atomically)."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output / "eval.json", json.dumps(results, indent=2) + "\n")
    atomic_write_text(output / "eval.md", eval_markdown(results) + "\n")
    atomic_write_text(output / "generations.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    return [output / "eval.json", output / "eval.md", output / "generations.jsonl"]
