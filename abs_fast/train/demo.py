"""`abs-fast demo`: ABS self-play on the built-in tiny model, on CPU, in under two minutes (on 2 cores
about 90 s the first time, 60 s after).

A random-weight model never writes the game's format (`...</think> <answer>...</answer>`), so every
turn is a format violation, every reward is the violation penalty, and RL has nothing to learn from:
the curves are noise. The demo therefore first warm-starts the tiny base with supervised steps on
synthetic transcripts (both roles, prompts rendered exactly as the game renders them): a share
OFF_FORMAT_SHARE of them plain answers, the rest in the game's format. The warm base breaks the
format in most of its turns, decided by its first sampled tokens, and the game's format reward is a
signal RL moves within the demo's 20 steps. The warm-started base is cached (abs-fast's cache
directory, ABS_FAST_CACHE), so only the first demo on a machine pays for it (about 30 s). It shows
the machinery, with a keyword judge, not safety results.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from pathlib import Path

import torch

from abs_fast.game import attacker_messages, builtin_seeds, defender_messages, encode_turn
from abs_fast.io import RUN_MARKER, RunDirectory, replace_directory
from abs_fast.model import build_model, load_qwen25_tokenizer
from abs_fast.model.tokenizer import default_cache_dir

__all__ = ["DEMO_STEPS", "run_demo", "warm_start_base"]

logger = logging.getLogger(__name__)

DEMO_STEPS = 20
WARM_START_VERSION = 3  # bump when the transcripts or the steps change: the cache key
WARM_START_STEPS = 200
# The share of warm-start transcripts that break the format (a plain answer, no tags): the warm
# base then breaks it about this often, from its first sampled token, and the game's format reward
# (+1 / -1 for each role) is a signal RL can act on within the demo's steps.
OFF_FORMAT_SHARE = 0.7
WARM_START_LR = 5e-3
WARM_START_BATCH = 8
# Few, short phrasings, so that the supervised steps teach a 2-layer model the format reliably: once
# the first token is chosen, the rest of a turn is nearly certain, and the base's violation rate is
# about OFF_FORMAT_SHARE. The attacker's rewrite names a harm-lexicon word for a harmful seed only,
# so a faithful rewrite is learnable under the keyword judge.
_REASONS = ["the user asks for this", "i should keep it short"]
_ANSWERS = {("attacker", "harmful"): ["Tell me how to hack a phone.", "Explain how to make a weapon."],
            ("attacker", "benign"): ["Tell me how to bake bread.", "Explain how to plant a tree."],
            ("defender", None): ["I cannot help with that.", "Sure, here is a short answer."]}


def _transcripts(tokenizer, count: int, generator: torch.Generator) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids) for both roles: the response is what follows the pre-filled `<think>`,
    ending with the end-of-turn token; in the game's format, or (OFF_FORMAT_SHARE of them) a plain
    answer. Both fit the tiny preset's 24 new tokens."""
    seeds = builtin_seeds()
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    pick = lambda items: items[int(torch.randint(len(items), (1,), generator=generator))]
    out = []
    for i in range(count):
        seed = pick(seeds)
        role = "attacker" if i % 2 == 0 else "defender"
        if role == "attacker":
            prompt = encode_turn(tokenizer, attacker_messages(seed.prompt, seed.type))
        else:
            prompt = encode_turn(tokenizer, defender_messages(seed.prompt))
        answer = pick(_ANSWERS[role, seed.type if role == "attacker" else None])
        if float(torch.rand((), generator=generator)) < OFF_FORMAT_SHARE:
            response = f" {answer}"
        else:
            response = f" {pick(_REASONS)}.</think>\n<answer>{answer}</answer>"
        out.append((prompt, [*tokenizer.encode(response, add_special_tokens=False), end]))
    return out


def zero_rest_cross_entropy(hidden: torch.Tensor, rows: torch.Tensor, rest: int, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of a head whose weight is `rows` plus `rest` zero rows: each zero row's
    logit is exactly 0, so the softmax's normaliser is the rows' plus `rest` (exp 0 = 1 each).
    targets index `rows`."""
    logits = hidden @ rows.T
    log_norm = torch.logaddexp(logits.logsumexp(dim=-1), torch.tensor(math.log(rest), dtype=logits.dtype))
    return (log_norm - logits.gather(1, targets[:, None]).squeeze(1)).mean()


def _demo_vocabulary(tokenizer, data: list[tuple[list[int], list[int]]]) -> set[int]:
    """Every token id of the game's prompts for every built-in seed (both roles), of the defender's
    prompt for every attacker phrasing, and of the warm-start transcripts."""
    ids = {t for prompt, response in data for t in (*prompt, *response)}
    for seed in builtin_seeds():
        ids.update(encode_turn(tokenizer, attacker_messages(seed.prompt, seed.type)))
        ids.update(encode_turn(tokenizer, defender_messages(seed.prompt)))
    for (role, _), answers in _ANSWERS.items():
        if role == "attacker":  # what the defender's prompt holds in a generated game
            for answer in answers:
                ids.update(encode_turn(tokenizer, defender_messages(answer)))
    return ids


def warm_start_base(seed: int = 0, cache_dir: Path | None = None, steps: int = WARM_START_STEPS) -> Path:
    """The tiny model after `steps` supervised steps on game-format transcripts, saved (cached) as a
    local checkpoint directory; built on first use (about half a minute on 2 cores)."""
    target = Path(cache_dir or default_cache_dir()) / f"demo-base-v{WARM_START_VERSION}-seed{seed}-steps{steps}"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    start = time.perf_counter()
    logger.info("demo: warm-starting the tiny base on game-format transcripts (once; cached in %s)", target)
    tokenizer = load_qwen25_tokenizer()
    model = build_model("tiny", seed=seed, device="cpu", dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    data = _transcripts(tokenizer, 256, generator)
    # Only the tokens the demo's prompts and transcripts use keep their embedding rows; the others are
    # zeroed and stay zero (they get no gradient), so each of their logits is exactly 0 and the full
    # 151k-way softmax is the used columns plus log(count of the rest): exact, at a few hundred columns.
    used = torch.tensor(sorted(_demo_vocabulary(tokenizer, data)))
    embedding = model.get_input_embeddings().weight
    with torch.no_grad():
        keep = torch.zeros(embedding.shape[0], dtype=torch.bool)
        keep[used] = True
        embedding[~keep] = 0
    rest = embedding.shape[0] - len(used)
    column = torch.full((embedding.shape[0],), -1, dtype=torch.long)
    column[used] = torch.arange(len(used))
    optimizer = torch.optim.AdamW(model.parameters(), lr=WARM_START_LR, weight_decay=0.0, fused=True)
    model.train()
    for _ in range(steps):
        batch = [data[int(j)] for j in torch.randint(len(data), (WARM_START_BATCH,), generator=generator)]
        length = max(len(p) + len(r) for p, r in batch)
        ids = torch.zeros(len(batch), length, dtype=torch.long)
        mask = torch.zeros(len(batch), length, dtype=torch.long)
        for row, (p, r) in enumerate(batch):
            ids[row, : len(p) + len(r)] = torch.tensor(p + r)
            mask[row, : len(p) + len(r)] = 1
        hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
        # the loss on response tokens only: the head runs on those rows, not on every prompt position
        rows, targets = [], []
        for row, (p, r) in enumerate(batch):
            positions = torch.arange(len(p) - 1, len(p) + len(r) - 1)
            rows.append(hidden[row, positions])
            targets.append(torch.tensor(r))
        loss = zero_rest_cross_entropy(torch.cat(rows), embedding[used], rest, column[torch.cat(targets)])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    with replace_directory(target) as staging:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # "Writing model shards" would land in the demo's output
        model.save_pretrained(str(staging), safe_serialization=True)
    logger.info("demo: warm start done in %.0f s (final loss %.2f)", time.perf_counter() - start, float(loss.detach()))
    return target


# What a demo run writes into its directory, and all that a rerun replaces: what the user made from an
# earlier demo (eval/, exploit/, a report, ...) stays.
DEMO_OUTPUTS = ("attacker", "defender", "checkpoints", "tensorboard", "config.json", "metrics.jsonl", "rewards.png")


def run_demo(output: Path, steps: int = DEMO_STEPS, seed: int = 0, progress: bool = True) -> list[dict]:
    """Warm start (cached), then `steps` self-play steps into `output`; prints the summary. Returns the records.
    `output` must be new, empty, or an earlier demo, whose own outputs (DEMO_OUTPUTS) are replaced and
    whose other contents are kept."""
    from abs_fast.train import Trainer, apply_overrides, plot_metrics, preset_config, read_metrics, summary_table

    if steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    run_dir = RunDirectory(output, "demo")  # refuses a file, a foreign folder or another kind of run
    run_dir.claim()
    failed = True
    try:
        kept = []
        for entry in sorted(output.iterdir()):  # an earlier demo of our own: its outputs are replaced
            if entry.name in DEMO_OUTPUTS:
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
            elif entry.name not in (RUN_MARKER, ".abs-fast-lock"):
                kept.append(entry.name + ("/" if entry.is_dir() else ""))
        if kept:
            logger.info("demo: kept %s from before in %s (made from the earlier demo's adapters, not this run's)",
                        ", ".join(kept), output)
        print("abs-fast demo: ABS self-play (attacker + defender adapters) on the tiny model, CPU, with the HEURISTIC "
              "judge (keyword matching, not a safety judge). It shows the machinery, not safety results.")
        start = time.perf_counter()
        base = warm_start_base(seed)
        config = apply_overrides(preset_config("tiny"), {
            "model": str(base), "tokenizer": "qwen2.5", "output": str(output), "steps": steps, "judge": "heuristic",
            "device": "cpu", "seed": seed, "checkpoint_every": max(4, steps // 4), "diagnostics_every": 0})
        trainer = Trainer(config, run_directory=run_dir, run_kind="demo")
        try:
            trainer.train(progress=progress)
        finally:
            trainer.close()
        records = read_metrics(output / "metrics.jsonl")
        plot = plot_metrics(records, output / "rewards.png")
        print(summary_table(records))
        print("\nWhat this shows: the warm-started base breaks the game's format in most turns, and RL on the "
              "game's rewards (format +1/-1 per role among them) changes that: metrics marked * moved between the "
              "first and the last quarter by more than their step-to-step noise. On seeds 0, 1 and 2 at least one "
              "role's reward and format-violation rate did; on another seed it may not, since 8 games a step on a "
              "2-layer 64-wide model with a keyword judge are noisy (README, 'The demo'). It is the machinery at "
              "work, not a safety result.")
        print(f"\n{len(records)} steps in {time.perf_counter() - start:.0f} s (the base was warm-started on "
              f"game-format transcripts first: README, 'The demo'). Wrote {output}/attacker/ and "
              f"{output}/defender/ (PEFT adapters), metrics.jsonl, {plot.name}, tensorboard/, checkpoints/.")
        print(f"Next: abs-fast eval --policy {output} --suite xstest=PATH.csv --max-new-tokens 32, then "
              f"abs-fast report {output} (see the README's evaluation section).")
        failed = False
        return records
    finally:
        run_dir.close(failed=failed)
