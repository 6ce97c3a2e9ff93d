"""`abs-fast warmstart`: teach a checkpoint the game's turn format before self-play.

Small instruct models rarely write `reasoning</think><answer>...</answer>` when asked, so every
turn gets the format penalty and RL sees a constant reward. The warm start fixes the format while
keeping the content the model's own:

- assembled turns: for each training seed and role, the model is asked in plain chat (no tags) for
  its reasoning about the task, then, separately, for the answer; the two replies are wrapped in the
  tags after the game's own prompt and pre-fill, and end with the model's end-of-turn token;
- rejection-sampled turns: the model plays each training prompt in the game's format once, and the
  turns that pass the format check are kept as they are.

A LoRA adapter is trained on both (cross-entropy on the turn's tokens only), merged into the
checkpoint's own weights (in float32, stored in their dtype) and written with the checkpoint's
config, generation config and tokenizer files to the output directory: `train --model OUTPUT` then
uses it as the frozen, anchored base. Format validity (the share of turns that pass the game's format
check, sampled as the game samples) is measured on held-out seeds for both roles, on the base before
and on the written checkpoint after, and saved in OUTPUT/abs-fast-warmstart.json.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import random
import re
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

from abs_fast.game import attacker_messages, check_format, defender_messages, encode_turn, parse_seed_spec
from abs_fast.game.prompts import warmstart_messages
from abs_fast.io import RunDirectory, open_safetensors, save_safetensors
from abs_fast.rollout import EmbeddedEngine, RolloutRequest, SamplingParams
from abs_fast.train.config import WarmstartSettings

__all__ = ["WARMSTART_FILE", "WarmstartSettings", "read_warmstart_record", "run_warmstart"]

logger = logging.getLogger(__name__)

WARMSTART_FILE = "abs-fast-warmstart.json"
ROLES = ("attacker", "defender")
_TAGS = re.compile(r"</?(think|answer)>?")  # a tag, or a cut-off one
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt")
_OWN_FILES = (WARMSTART_FILE, ".abs-fast-run", ".abs-fast-lock")


def read_warmstart_record(model_dir: str | Path) -> dict | None:
    """The warm start's record in a checkpoint directory it wrote, else None."""
    try:
        record = json.loads((Path(model_dir) / WARMSTART_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


# --- prompts and measurements ------------------------------------------------------------------

def _game_prompts(tokenizer, seeds, max_prompt_tokens: int) -> dict[str, list[list[int]]]:
    """Each role's game prompt (chat template + pre-fill) for each seed that fits: the attacker's
    rewrite task, the defender's vanilla query."""
    prompts = {"attacker": [], "defender": []}
    for seed in seeds:
        for role, messages in (("attacker", attacker_messages(seed.prompt, seed.type)),
                               ("defender", defender_messages(seed.prompt))):
            ids = encode_turn(tokenizer, messages)
            if len(ids) <= max_prompt_tokens:
                prompts[role].append(ids)
    return prompts


def _sample(engine, prompts: list[list[int]], adapter: str | None, max_new_tokens: int, temperature: float,
            stop_ids: tuple[int, ...]):
    sampling = SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens, stop_token_ids=stop_ids)
    return engine.generate([RolloutRequest(list(p), adapter, sampling) for p in prompts])


def measure_validity(engine, prompts: dict[str, list], settings: WarmstartSettings, stop_ids: tuple[int, ...],
                     adapter: str | None = None) -> dict[str, float]:
    """The share of sampled turns (eval_samples per prompt) that pass the game's format check, per role
    (as the game checks a turn: its text, whether it ended at a stop id or at the length limit)."""
    validity = {}
    for role in ROLES:
        ids = [p for p in prompts[role] for _ in range(settings.eval_samples)]
        results = _sample(engine, ids, adapter, settings.turn_tokens, settings.temperature, stop_ids)
        valid = [not check_format(r.text).violated for r in results]
        validity[role] = sum(valid) / max(len(valid), 1)
    return validity


# --- the data ----------------------------------------------------------------------------------

def _clean(text: str) -> str:
    """A reply as a turn's part: no tags of the game's own, no blank lines around it; a leading space
    stays (how the model starts a reply is its own, and its tokens differ with and without it)."""
    text = _TAGS.sub("", text).rstrip().lstrip("\n")
    return text if text.strip() else ""


def _cut_to_sentence(text: str) -> str:
    """A reasoning reply cut at max_new_tokens, shortened to its last full sentence when it has one."""
    ends = [text.rfind(mark) for mark in (". ", ".\n", "? ", "! ", "\n")]
    end = max(ends)
    return text[: end + 1].rstrip() if end > len(text) // 3 else text


def assemble_turns(engine, tokenizer, seeds, settings: WarmstartSettings, stop_ids: tuple[int, ...]
                   ) -> list[tuple[list[int], list[int], str]]:
    """(game prompt ids, response ids, role): the model's own reasoning and answer, asked for apart in
    plain chat, wrapped in the format after the game's prompt and pre-fill, ending with the end-of-turn
    token the model stopped its answer with (an answer cut at the length limit: the one its answers
    stop with most often). A part cut at the limit is shortened to its last full sentence."""
    budget = (settings.turn_tokens - 16) // 2  # each part; the tags and the end token take the rest
    words = max(8, int(budget * 0.6))
    rng = random.Random(settings.seed)
    jobs = []
    for i in range(settings.examples):
        role = ROLES[i % 2]
        seed = seeds[rng.randrange(len(seeds))]
        game = encode_turn(tokenizer, attacker_messages(seed.prompt, seed.type) if role == "attacker"
                           else defender_messages(seed.prompt))
        asks = [encode_turn(tokenizer, warmstart_messages(role, seed.prompt, seed.type, part, words), reasoning=False)
                for part in ("reasoning", "answer")]
        if max(len(game), *map(len, asks)) <= settings.max_prompt_tokens:
            jobs.append((role, game, asks))
    requests = [ask for _, _, asks in jobs for ask in asks]
    results = _sample(engine, requests, None, budget, settings.data_temperature, stop_ids)
    # the token the model ends a turn with (Llama-3 style checkpoints list several eos ids; the first
    # need not be the end of a turn): the one its answers stopped at most often
    ends = Counter(r.matched_stop for r in results if r.finish_reason == "stop" and isinstance(r.matched_stop, int))
    usual_end = ends.most_common(1)[0][0] if ends else stop_ids[0]
    turns = []
    for j, (role, game, _) in enumerate(jobs):
        thought, answer = results[2 * j], results[2 * j + 1]
        reasoning, reply = _clean(thought.text), _clean(answer.text)
        reasoning = _cut_to_sentence(reasoning) if thought.finish_reason == "length" else reasoning
        reply = _cut_to_sentence(reply) if answer.finish_reason == "length" else reply
        if not reasoning or not reply:
            continue
        end = answer.matched_stop if isinstance(answer.matched_stop, int) else usual_end
        text = f"{reasoning}</think>\n<answer>{reply}</answer>"
        turns.append((game, [*tokenizer.encode(text, add_special_tokens=False), end], role))
    return turns


def rejection_sampled_turns(engine, prompts: dict[str, list], settings: WarmstartSettings,
                            stop_ids: tuple[int, ...]) -> list[tuple[list[int], list[int], str]]:
    """The model's own turns on the training prompts, in the game's format, that pass the format check."""
    turns = []
    for role in ROLES:
        ids = prompts[role]
        for prompt, result in zip(ids, _sample(engine, ids, None, settings.turn_tokens, settings.temperature,
                                               stop_ids), strict=True):
            if result.finish_reason == "stop" and not check_format(result.text).violated:
                turns.append((prompt, list(result.token_ids), role))
    return turns


# --- training and the merge --------------------------------------------------------------------

def train_adapter(policy, turns: list[tuple[list[int], list[int], str]], settings: WarmstartSettings,
                  adapter: str = "warmstart") -> float:
    """Supervised steps on the turns' response tokens (mean token cross-entropy); returns the last loss."""
    from abs_fast.model.scoring import packed_logprobs

    adapter_id = policy.adapter_id(adapter)
    parameters = policy.adapter_parameters(adapter)
    optimizer = torch.optim.AdamW(parameters, lr=settings.lr, betas=(0.9, 0.95), weight_decay=0.0)
    warmup = max(1, settings.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
    generator = torch.Generator().manual_seed(settings.seed)
    policy.train()
    loss_value, report_every, start = float("nan"), max(1, settings.steps // 10), time.perf_counter()
    for step in range(settings.steps):
        picks = torch.randint(len(turns), (settings.batch_size,), generator=generator).tolist()
        items = [(turns[i][0], turns[i][1], adapter_id) for i in picks]
        logprobs = packed_logprobs(policy, items)
        loss = -torch.cat(logprobs).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = float(loss.detach())
        if (step + 1) % report_every == 0 or step + 1 == settings.steps:
            logger.info("warmstart: step %d/%d, loss %.3f (%.0f s)", step + 1, settings.steps, loss_value,
                        time.perf_counter() - start)
    policy.eval()
    return loss_value


def adapter_deltas(policy, adapter: str = "warmstart") -> dict[str, torch.Tensor]:
    """checkpoint key ("model.layers.0.self_attn.q_proj.weight") -> alpha / r * B @ A, float32 on CPU."""
    deltas = {}
    for path, layer in policy.target_layers().items():
        a = layer.lora_A[adapter].detach().float().cpu()
        b = layer.lora_B[adapter].detach().float().cpu()
        deltas[f"{path}.weight"] = (layer.alphas[adapter] / layer.ranks[adapter]) * (b @ a)
    return deltas


def write_merged_checkpoint(source: Path, target: Path, deltas: dict[str, torch.Tensor]) -> None:
    """The checkpoint in `source` with each delta added to its weight (float32 sum, stored in the
    weight's own dtype), shard by shard under the same file names, plus every other file of the
    checkpoint (config.json last: a directory cut short by an interrupt has none and is not loadable)."""
    shards = sorted(source.glob("*.safetensors"))
    left = dict(deltas)
    for shard in shards:
        with open_safetensors(shard) as handle:
            metadata = handle.metadata() or {"format": "pt"}
            tensors = {}
            for key in handle.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                tensor = handle.get_tensor(key)
                if key in left:
                    delta = left.pop(key)
                    if tuple(delta.shape) != tuple(tensor.shape):
                        raise ValueError(f"{shard}: {key} has shape {tuple(tensor.shape)}, the adapter's update "
                                         f"{tuple(delta.shape)}")
                    tensor = (tensor.float() + delta).to(tensor.dtype)
                tensors[key] = tensor.contiguous()
        save_safetensors(tensors, target / shard.name, metadata=metadata)
        del tensors
    if left:
        raise ValueError(f"{source}: no weight {next(iter(left))!r} (and {len(left) - 1} more) to merge the warm "
                         "start into")
    others = [p for p in sorted(source.iterdir()) if p.is_file() and not p.name.endswith(_WEIGHT_SUFFIXES)
              and p.name not in _OWN_FILES and p.name != "config.json"]
    for path in others:
        shutil.copy2(path, target / path.name)
    shutil.copy2(source / "config.json", target / "config.json")


def _check_source(model: Path) -> None:
    """A local checkpoint of unquantised safetensors weights (the merge adds to them)."""
    from abs_fast.model.policy import read_arch_config

    hf_config = read_arch_config(model)[0]  # names a missing or unreadable config.json, an unsupported architecture
    if getattr(hf_config, "quantization_config", None):
        raise ValueError(f"{model / 'config.json'}: a pre-quantised checkpoint; the warm start merges its "
                                  "update into the checkpoint's own weights, which needs them unquantised (use the "
                                  "original 16-bit checkpoint)")
    if not list(model.glob("*.safetensors")):
        raise FileNotFoundError(f"{model}: no *.safetensors weights (abs-fast reads safetensors only)")


# --- the command -------------------------------------------------------------------------------

def run_warmstart(model: str | Path, output: str | Path, settings: WarmstartSettings, tokenizer_source: str = ""
                  ) -> dict:
    """Measure, assemble, train, merge, write, measure again; returns the record written beside the weights."""
    from abs_fast.model import load_policy
    from abs_fast.train.build import check_device, checkpoint_stop_ids, load_tokenizer_for
    from abs_fast.train.config import TrainConfig

    settings = settings.validate()
    model, output = Path(model), Path(output)
    _check_source(model)
    check_device(settings.device)
    if output.resolve() == model.resolve():
        raise ValueError(f"--output {output} is the source checkpoint; choose a new directory")
    seeds = [s for spec in settings.seeds for s in parse_seed_spec(spec)]
    if len(seeds) < settings.eval_seeds + 2:
        raise ValueError(f"{len(seeds)} seeds: too few to hold out --eval-seeds {settings.eval_seeds} and train on the "
                         "rest (give more with --seeds)")
    run_dir = RunDirectory(output, "warmstart")
    run_dir.claim()
    failed, staging = True, None
    start = time.perf_counter()
    try:
        tokenizer = load_tokenizer_for(TrainConfig(model=str(model), tokenizer=tokenizer_source))
        order = list(range(len(seeds)))
        random.Random(settings.seed).shuffle(order)
        held_out = [seeds[i] for i in order[: settings.eval_seeds]]
        train_seeds = [seeds[i] for i in order[settings.eval_seeds:]]
        eval_prompts = _game_prompts(tokenizer, held_out, settings.max_prompt_tokens)
        train_prompts = _game_prompts(tokenizer, train_seeds, settings.max_prompt_tokens)
        if not all(eval_prompts.values()) or not all(train_prompts.values()):
            raise ValueError(f"the game's prompts are longer than max_prompt_tokens={settings.max_prompt_tokens} "
                             "for every seed")
        device = None if settings.device == "auto" else settings.device
        quantize = None if settings.quantize == "none" else settings.quantize

        def engine_for(policy):
            return EmbeddedEngine(policy, tokenizer, max_batch=settings.engine_max_batch,
                                  max_seq_len=settings.max_prompt_tokens + settings.turn_tokens, seed=settings.seed)

        logger.info("warmstart: loading %s", model)
        policy = load_policy(model, quantize=quantize, adapters=("warmstart",), rank=settings.rank,
                             alpha=settings.alpha, device=device, seed=settings.seed)
        stop_ids = checkpoint_stop_ids(policy.config, tokenizer)[0]
        engine = engine_for(policy)
        before = measure_validity(engine, eval_prompts, settings, stop_ids)
        logger.info("warmstart: format validity before: attacker %.0f%%, defender %.0f%% (%d held-out seeds x %d "
                    "samples)", 100 * before["attacker"], 100 * before["defender"], len(held_out),
                    settings.eval_samples)
        assembled = assemble_turns(engine, tokenizer, train_seeds, settings, stop_ids)
        sampled = rejection_sampled_turns(engine, train_prompts, settings, stop_ids)
        turns = assembled + sampled
        if not turns:
            raise ValueError("the model gave no usable reasoning or answer for any training seed")
        logger.info("warmstart: %d assembled turns, %d rejection-sampled turns", len(assembled), len(sampled))
        final_loss = train_adapter(policy, turns, settings)
        deltas = adapter_deltas(policy)
        del engine, policy
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the written checkpoint loads next, in the same memory
        staging = Path(tempfile.mkdtemp(prefix=".warmstart.staging-", dir=output))
        write_merged_checkpoint(model, staging, deltas)
        written = load_policy(staging, quantize=quantize, adapters=(), device=device, seed=settings.seed)
        after = measure_validity(engine_for(written), eval_prompts, settings, stop_ids)
        del written
        logger.info("warmstart: format validity after: attacker %.0f%%, defender %.0f%%", 100 * after["attacker"],
                    100 * after["defender"])
        record = {"source": str(model), "validity_before": before, "validity_after": after,
                  "held_out_seeds": len(held_out), "samples_per_prompt": settings.eval_samples,
                  "data": {"assembled": len(assembled), "rejection_sampled": len(sampled)},
                  "final_loss": final_loss, "seconds": round(time.perf_counter() - start, 1),
                  "settings": {k: list(v) if isinstance(v, tuple) else v
                               for k, v in dataclasses.asdict(settings).items()}}
        (staging / WARMSTART_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        _move_into(staging, output)
        failed = False
        return record
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        run_dir.close(failed=failed)


def _move_into(staging: Path, output: Path) -> None:
    """Replace an earlier warm start's files in `output` by the staged ones (config.json last)."""
    for old in output.iterdir():
        if old.is_file() and old.name not in (".abs-fast-run", ".abs-fast-lock"):
            old.unlink()
    staged = sorted(staging.iterdir(), key=lambda p: p.name == "config.json")
    for path in staged:
        path.rename(output / path.name)
