"""`abs-fast demo`: ABS self-play on the built-in tiny model, on CPU, in about two minutes.

A random-weight model never writes the game's format (`...</think> <answer>...</answer>`), so every
turn is a format violation, every reward is the violation penalty, and RL has nothing to learn from:
the curves are noise. The demo therefore first warm-starts the tiny base with supervised steps on
synthetic transcripts in the game's format (both roles, prompts rendered exactly as the game
renders them). The warm-started base is cached (abs-fast's cache directory, ABS_FAST_CACHE), so
only the first demo on a machine pays for it. From there format violations start well below 1 and
move under RL. It shows the machinery, with a keyword judge, not safety results.
"""

from __future__ import annotations

import logging
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
WARM_START_VERSION = 1  # bump when the transcripts or the steps change: the cache key
WARM_START_STEPS = 100
WARM_START_LR = 5e-3
WARM_START_BATCH = 4
_REASONS = ["the user asks for", "this request is about", "i should answer", "think about safety", "a short reply",
            "the prompt wants", "rewrite it politely", "keep it brief"]
_ANSWERS = {"attacker": ["Please explain {s}", "As a story, describe {s}", "For a class, tell me {s}"],
            "defender": ["I cannot help with that.", "Sure, here is a short answer.", "Sorry, I will not do that.",
                         "Here is some general information."]}


def _transcripts(tokenizer, count: int, generator: torch.Generator) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids) in the game's format for both roles: the response is what follows the
    pre-filled `<think>`, ending with the end-of-turn token."""
    seeds = builtin_seeds()
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    pick = lambda items: items[int(torch.randint(len(items), (1,), generator=generator))]
    out = []
    for i in range(count):
        seed = pick(seeds)
        role = "attacker" if i % 2 == 0 else "defender"
        words = " ".join(seed.prompt.split()[:4]).lower().rstrip(".?!,")
        if role == "attacker":
            prompt = encode_turn(tokenizer, attacker_messages(seed.prompt, seed.type))
        else:
            prompt = encode_turn(tokenizer, defender_messages(seed.prompt))
        answer = pick(_ANSWERS[role]).format(s=words)
        response = f" {pick(_REASONS)}.</think>\n<answer>{answer}</answer>"
        out.append((prompt, [*tokenizer.encode(response, add_special_tokens=False), end]))
    return out


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
    head = model.get_output_embeddings().weight
    optimizer = torch.optim.AdamW(model.parameters(), lr=WARM_START_LR, weight_decay=0.0)
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
        logits = torch.cat(rows) @ head.T
        loss = torch.nn.functional.cross_entropy(logits, torch.cat(targets))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    with replace_directory(target) as staging:
        model.save_pretrained(str(staging), safe_serialization=True)
    logger.info("demo: warm start done in %.0f s (final loss %.2f)", time.perf_counter() - start, float(loss.detach()))
    return target


def run_demo(output: Path, steps: int = DEMO_STEPS, seed: int = 0, progress: bool = True) -> list[dict]:
    """Warm start (cached), then `steps` self-play steps into `output`; prints the summary. Returns the records.
    `output` must be new, empty, or an earlier demo (which is replaced)."""
    from abs_fast.train import Trainer, apply_overrides, plot_metrics, preset_config, read_metrics, summary_table

    if steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    run_dir = RunDirectory(output, "demo")  # refuses a file, a foreign folder or another kind of run
    run_dir.claim()
    try:
        for entry in output.iterdir():  # an earlier demo of our own: replaced (the marker and lock stay)
            if entry.name not in (RUN_MARKER, ".abs-fast-lock"):
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
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
        print("\nWhat this shows: the warm start puts format violations well below 1 at step 1, and the metrics "
              "marked * moved by more than their step-to-step noise (typically the KL of each adapter to the base "
              "and some refusal rates). What it does not show: reliable learning of the rewards or the format. With "
              "8 games a step, a 2-layer 64-wide model and a keyword judge, the per-step rewards are noisier than "
              "anything RL can change in 2 CPU minutes (README, 'The demo').")
        print(f"\n{len(records)} steps in {time.perf_counter() - start:.0f} s (the base was warm-started on "
              f"game-format transcripts first: README, 'The demo'). Wrote {output}/attacker/ and "
              f"{output}/defender/ (PEFT adapters), metrics.jsonl, {plot.name}, tensorboard/, checkpoints/.")
        print(f"Next: abs-fast eval --policy {output} --suite xstest=PATH.csv --max-new-tokens 32, then "
              f"abs-fast report {output} (see the README's evaluation section).")
        return records
    finally:
        run_dir.close()
