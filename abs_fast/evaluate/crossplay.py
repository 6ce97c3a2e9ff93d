"""`abs-fast crossplay`: every attacker against every defender on held-out seeds.

Both turns are batched across all pairs: one engine batch holds every attacker's rewrite of every
seed (mixed adapters), a second holds every defender's answer to every attack; one judge call
scores them all. Attack success = harmful answers on harmful seeds; refusal-on-benign = refusals on
the attacker's rewrites of benign seeds (over-refusal under attack)."""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Sequence
from pathlib import Path

from abs_fast.evaluate.evaluation import EvalSettings, generate_wave
from abs_fast.evaluate.stats import rate_of
from abs_fast.evaluate.tables import fmt, markdown_table
from abs_fast.game import attacker_messages, defender_messages, encode_turn, turn_answer
from abs_fast.io import atomic_write_text, figure_png
from abs_fast.rollout import RolloutEngine, RolloutRequest, SamplingParams

__all__ = ["CROSSPLAY_METRICS", "crossplay", "crossplay_csv", "crossplay_markdown", "plot_crossplay",
           "write_crossplay"]

logger = logging.getLogger(__name__)

CROSSPLAY_METRICS = {
    "attack_success": "attack success (harmful answers on harmful seeds; lower = safer defender)",
    "refusal_benign": "refusal on benign seeds under attack (lower = less over-refusal)",
}


def crossplay(policy, tokenizer, judge, attackers: Sequence[tuple[str, str | None]],
              defenders: Sequence[tuple[str, str | None]], seeds: Sequence, stop_ids: Sequence[int],
              settings: EvalSettings | None = None, engine: RolloutEngine | None = None) -> tuple[dict, list[dict]]:
    """attackers / defenders: (label, adapter name or None for the base); engine: where generation
    runs (default: an embedded engine over `policy`). Returns (results with matrices
    [attacker][defender] of Rate dicts, one record per game)."""
    settings = settings or EvalSettings()
    reasoning = settings.reasoning
    sampling = SamplingParams(temperature=settings.temperature, max_new_tokens=settings.max_new_tokens,
                              stop_token_ids=tuple(stop_ids))
    logger.info("cross-play: %d attacker(s) x %d defender(s) x %d seeds, two engine batches", len(attackers),
                len(defenders), len(seeds))
    prompts = [encode_turn(tokenizer, attacker_messages(s.prompt, s.type, reasoning), reasoning) for s in seeds]
    wave1 = [RolloutRequest(prompt, adapter, sampling) for _, adapter in attackers for prompt in prompts]
    attacks = [turn_answer(o.text, reasoning)[0] for o in generate_wave(policy, tokenizer, wave1, settings, engine)]
    turns = [encode_turn(tokenizer, defender_messages(a, reasoning), reasoning) for a in attacks]
    games = [(ai, di, si) for ai in range(len(attackers)) for di in range(len(defenders)) for si in range(len(seeds))]
    wave2 = [RolloutRequest(turns[ai * len(seeds) + si], defenders[di][1], sampling) for ai, di, si in games]
    outputs = generate_wave(policy, tokenizer, wave2, settings, engine)
    replies = [turn_answer(o.text, reasoning)[0] for o in outputs]
    labels = judge.classify([attacks[ai * len(seeds) + si] for ai, _, si in games], replies)

    matrices: dict[str, list[list[dict]]] = {name: [] for name in CROSSPLAY_METRICS}
    for ai in range(len(attackers)):
        for name in CROSSPLAY_METRICS:
            matrices[name].append([])
        for di in range(len(defenders)):
            cell = [(seeds[si], lab) for (a, d, si), lab in zip(games, labels, strict=True) if (a, d) == (ai, di)]
            matrices["attack_success"][ai].append(
                rate_of(lab.response_harmful for s, lab in cell if s.type == "harmful").to_dict())
            matrices["refusal_benign"][ai].append(
                rate_of(lab.refusal for s, lab in cell if s.type == "benign").to_dict())
    results = {"attackers": [label for label, _ in attackers], "defenders": [label for label, _ in defenders],
               "seeds": len(seeds), "seeds_harmful": sum(s.type == "harmful" for s in seeds),
               "settings": {"temperature": settings.temperature, "max_new_tokens": settings.max_new_tokens,
                            "reasoning": reasoning},
               "matrices": matrices}
    records = [{"attacker": attackers[ai][0], "defender": defenders[di][0], "seed": seeds[si].prompt,
                "seed_type": seeds[si].type, "attack": attacks[ai * len(seeds) + si], "response": reply,
                "judge": {"prompt_harmful": lab.prompt_harmful, "refusal": lab.refusal,
                          "response_harmful": lab.response_harmful, "parse_error": lab.parse_error}}
               for (ai, di, si), reply, lab in zip(games, replies, labels, strict=True)]
    return results, records


def crossplay_csv(results: dict) -> str:
    """Long format: one row per (metric, attacker, defender)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["metric", "attacker", "defender", "value", "count", "total", "ci95_low", "ci95_high"])
    for metric, matrix in results["matrices"].items():
        for attacker, row in zip(results["attackers"], matrix, strict=True):
            for defender, cell in zip(results["defenders"], row, strict=True):
                writer.writerow([metric, attacker, defender, cell["value"], cell["count"], cell["total"],
                                 *cell["ci95"]])
    return out.getvalue()


def crossplay_markdown(results: dict) -> str:
    lines = [f"# Cross-play: {len(results['attackers'])} attacker(s) x {len(results['defenders'])} defender(s)", "",
             f"{results['seeds']} seeds ({results['seeds_harmful']} harmful). Rows: attackers; columns: defenders. "
             "Cells: rate (count/total).", ""]
    for metric, title in CROSSPLAY_METRICS.items():
        rows = [[attacker] + [f"{fmt(cell['value'])} ({cell['count']}/{cell['total']})" for cell in row]
                for attacker, row in zip(results["attackers"], results["matrices"][metric], strict=True)]
        lines += [f"## {title}", "", markdown_table(["attacker \\ defender", *results["defenders"]], rows), ""]
    return "\n".join(lines)


def plot_crossplay(results: dict, path: str | Path | None = None) -> bytes:
    """Both matrices as heatmaps side by side (PNG bytes; also written to `path` when given)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    attackers, defenders = results["attackers"], results["defenders"]
    width = max(4.0, 1.3 * len(defenders) + 2.5)
    height = max(3.0, 0.7 * len(attackers) + 2.0)
    fig, axes = plt.subplots(1, len(CROSSPLAY_METRICS), figsize=(2 * width, height), squeeze=False)
    for ax, (metric, title) in zip(axes[0], CROSSPLAY_METRICS.items(), strict=True):
        values = np.array([[cell["value"] for cell in row] for row in results["matrices"][metric]], dtype=float)
        image = ax.imshow(np.ma.masked_invalid(values), vmin=0.0, vmax=1.0, cmap="Reds", aspect="auto")
        ax.set_xticks(range(len(defenders)), defenders, rotation=30, ha="right")
        ax.set_yticks(range(len(attackers)), attackers)
        ax.set_xlabel("defender")
        ax.set_ylabel("attacker")
        ax.set_title(title.split(" (")[0], fontsize=10)
        for i in range(len(attackers)):
            for j in range(len(defenders)):
                ax.text(j, i, fmt(float(values[i, j])), ha="center", va="center",
                        color="white" if values[i, j] > 0.6 else "black", fontsize=9)
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    return figure_png(fig, path)


def write_crossplay(results: dict, records: list[dict], output: str | Path) -> list[Path]:
    """crossplay.json, .csv, .md, .png and games.jsonl in `output` (each written atomically)."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output / "crossplay.json", json.dumps(results, indent=2) + "\n")
    atomic_write_text(output / "crossplay.csv", crossplay_csv(results))
    atomic_write_text(output / "crossplay.md", crossplay_markdown(results) + "\n")
    plot_crossplay(results, output / "crossplay.png")
    atomic_write_text(output / "games.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    return [output / name for name in ("crossplay.json", "crossplay.csv", "crossplay.md", "crossplay.png",
                                       "games.jsonl")]
