"""The memory plan of a training run, before anything loads (`abs-fast plan`, and `abs-fast train`'s
check): the predicted peak of each phase of a self-play step on the device the run will use.

Resident for the whole run: the frozen base (NF4 codes and statistics, the block scales decoded once,
the 16-bit embeddings and head), every adapter with the Adam moments of the trained ones, the
embedded engine's KV cache, the judge (its weights and KV cache), and on CUDA the context. Each phase
adds its own working set:

    rollout  prefill of `token_budget` prompt tokens at a time, the decode step's [rows, vocab]
             sampling buffers
    judge    the judge engine's prefill and decode buffers
    logprob  the no-grad scoring forward over `token_budget` tokens
    train    adapter gradients, the activations saved for backward over `token_budget` tokens (every
             layer's, or with gradient checkpointing each layer's input plus one layer's), and the
             backward's working set

The per-token activation sizes follow what the model's ops keep for backward (model/transformer.py,
ops/layers.py, ops/lora.py); tests/test_plan.py checks the prediction against bytes measured on CPU.
"""

from __future__ import annotations

import json
import math
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from abs_fast.train.config import TrainConfig

__all__ = ["CUDA_CONTEXT_BYTES", "MemoryPlan", "ModelShape", "free_memory", "model_shape", "plan_memory"]

GIB = 2**30
CUDA_CONTEXT_BYTES = int(0.6 * GIB)  # one process's CUDA context and the allocator's first segments
AUTOTUNE_FLUSH_BYTES = 256 * 2**20  # triton.testing.do_bench's L2-flush buffer, live while the autotuner times
NCCL_BUFFER_BYTES = int(0.5 * GIB)  # NCCL's communicator buffers per process (channels x peers x 4 MiB), estimated
# What a launched SGLang server uses beyond its static pool (--mem-fraction-static: weights and KV):
# its CUDA context, CUDA graph buffers and the activations of one prefill chunk (an estimate from the
# defaults: chunked prefill of 8192 tokens, graphs for batches up to 160)
SGLANG_GRAPH_BYTES = 1 * GIB
SGLANG_PREFILL_TOKENS = 8192
ALLOCATOR_SLACK = 0.05  # the caching allocator's fragmentation, on CUDA
SGLANG_DEFAULT_MEM_FRACTION = 0.85  # what SGLang reserves on a large GPU without --mem-fraction-static

# Shapes used when the run names no readable checkpoint: the train presets' models, and WildGuard
# (a Mistral-7B v0.3 fine-tune) for judge=wildguard.
_PRESET_MODELS = {"qwen2.5-3b": "qwen2.5-3b", "qwen2.5-7b": "qwen2.5-7b", "qwen2.5-14b": "qwen2.5-14b",
                  "qwen2.5-14b-h200": "qwen2.5-14b", "consumer-24gb": "qwen2.5-7b", "tiny": "tiny"}
_WILDGUARD = dict(vocab_size=32768, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False)


@dataclass(frozen=True)
class ModelShape:
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool

    @classmethod
    def from_fields(cls, fields: dict) -> ModelShape:
        heads = fields["num_attention_heads"]
        return cls(fields["vocab_size"], fields["hidden_size"], fields["intermediate_size"],
                   fields["num_hidden_layers"], heads, fields.get("num_key_value_heads") or heads,
                   fields.get("head_dim") or fields["hidden_size"] // heads, bool(fields.get("tie_word_embeddings")))

    def linears(self) -> list[tuple[int, int]]:
        """(out, in) of one layer's q, k, v, o, gate, up, down projections."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return [(q, h), (kv, h), (kv, h), (h, q), (i, h), (i, h), (h, i)]


def model_shape(model: str, preset: str | None = None) -> ModelShape:
    """The shape of `model` (a checkpoint directory's config.json, or a model preset), else of the
    train preset's model."""
    from abs_fast.model.tiny import _QWEN25_COMMON, PRESETS

    path = Path(model).expanduser() if model else None
    if path is not None and model not in PRESETS and not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path / 'config.json'}: missing (model must be a checkpoint directory holding "
                                f"config.json, or a preset: {', '.join(sorted(PRESETS))})")
    if path is not None and (path / "config.json").is_file():
        try:
            fields = json.loads((path / "config.json").read_text(encoding="utf-8"))
            return ModelShape.from_fields(fields)
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{path / 'config.json'}: cannot read the model's shape ({err})") from None
    name = model if model in PRESETS else _PRESET_MODELS.get(preset or "")
    if name is None:
        raise ValueError(f"cannot tell the model's shape: model={model!r} is neither a checkpoint directory with "
                         "config.json nor a preset; pass --model DIR or --preset")
    return ModelShape.from_fields({**_QWEN25_COMMON, **PRESETS[name]})


@dataclass
class MemoryPlan:
    """Predicted bytes: `resident` parts held for the whole run, `phases` each phase's own working set
    on top, `peak` the largest total, and whether it fits `capacity` (when known)."""

    device: str
    resident: dict[str, int]
    phases: dict[str, dict[str, int]]
    capacity: int | None = None
    advice: list[str] = field(default_factory=list)

    def phase_total(self, phase: str) -> int:
        resident = sum(self.resident.values())
        total = resident + sum(self.phases[phase].values())
        return int(total * (1 + ALLOCATOR_SLACK)) if self.device == "cuda" else total

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phase_total)

    @property
    def peak(self) -> int:
        return self.phase_total(self.peak_phase)

    @property
    def fits(self) -> bool | None:
        return None if self.capacity is None else self.peak <= self.capacity

    def to_dict(self) -> dict:
        return {"device": self.device, "peak_gb": round(self.peak / GIB, 2), "peak_phase": self.peak_phase,
                "gpu_memory_gb": None if self.capacity is None else round(self.capacity / GIB, 2), "fits": self.fits,
                "resident_gb": {k: round(v / GIB, 3) for k, v in self.resident.items()},
                "phases_gb": {p: {k: round(v / GIB, 3) for k, v in parts.items()} for p, parts in self.phases.items()},
                "phase_totals_gb": {p: round(self.phase_total(p) / GIB, 2) for p in self.phases},
                "advice": self.advice}

    def table(self) -> str:
        lines = [f"memory plan ({self.device}): peak {self.peak / GIB:.2f} GiB in the {self.peak_phase} phase"
                 + ("" if self.capacity is None else f" of {self.capacity / GIB:.1f} GiB: "
                    + ("fits" if self.fits else "DOES NOT FIT")), "resident:"]
        lines += [f"  {name:<28} {value / GIB:8.3f} GiB" for name, value in self.resident.items()]
        for phase, parts in self.phases.items():
            lines.append(f"{phase} phase (total {self.phase_total(phase) / GIB:.2f} GiB):")
            lines += [f"  {name:<28} {value / GIB:8.3f} GiB" for name, value in parts.items()]
        lines += [f"advice: {line}" for line in self.advice]
        if self.capacity is None:
            lines.append(f"verdict: peak {self.peak / GIB:.2f} GiB; no device size given (--gpu-memory), "
                         "fit not checked")
        else:
            lines.append(f"verdict: {'fits' if self.fits else 'DOES NOT FIT'}: peak {self.peak / GIB:.2f} GiB of "
                         f"{self.capacity / GIB:.1f} GiB" + ("" if self.fits else " (exit status 1)"))
        return "\n".join(lines)


def _nf4_bytes(out_features: int, in_features: int, blocksize: int = 64) -> int:
    n = out_features * in_features
    blocks = -(-n // blocksize)
    nested = -(-blocks // 256)
    # packed codes, uint8 absmax codes, nested fp32 scales + code table + offset, the decoded block scales
    return (n + 1) // 2 + blocks + 4 * nested + 4 * 256 + 4 + 4 * blocks


def _weights(shape: ModelShape, quantize: str, dtype_bytes: int) -> dict[str, int]:
    linear = sum((_nf4_bytes(o, i) if quantize == "nf4" else o * i * dtype_bytes) for o, i in shape.linears())
    biases = (shape.heads + 2 * shape.kv_heads) * shape.head_dim * dtype_bytes  # q, k, v (Qwen2; an upper bound)
    embeddings = shape.vocab * shape.hidden * dtype_bytes * (1 if shape.tied else 2)
    norms = (2 * shape.layers + 1) * shape.hidden * dtype_bytes
    return {"base linears (NF4)" if quantize == "nf4" else "base linears": shape.layers * (linear + biases),
            "embeddings + head": embeddings + norms}


def _adapter_params(shape: ModelShape, rank: int, targets: set[str]) -> int:
    names = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    return shape.layers * sum(rank * (o + i) for name, (o, i) in zip(names, shape.linears(), strict=True)
                              if name in targets)


def _saved_per_token_layer(shape: ModelShape, b: int, rank: int, adapters: int, device: str) -> int:
    """Bytes one layer keeps for backward per token (model/transformer.py with its recompute hooks):
    both norms' inputs and inverse RMS, q/k/v after RoPE, the attention output and log-sum-exp, gate
    and up, and the LoRA shrink activations; on CPU the per-document attention output is concatenated
    (one more copy) and the PyTorch LoRA path keeps [n_adapters * r] activations and scales."""
    h, q, kv, i = shape.hidden, shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim, shape.intermediate
    kept = b * (2 * h + 2 * q + 2 * kv + 2 * i) + 4 * (2 + shape.heads)
    if device == "cuda":
        return kept + 4 * 7 * rank
    return kept + b * q + 4 * 7 * (adapters * rank + adapters)


def _sglang_fraction(args: str) -> float | None:
    tokens = shlex.split(args)
    for j, token in enumerate(tokens):
        if token.startswith("--mem-fraction-static"):
            value = token.split("=", 1)[1] if "=" in token else (tokens[j + 1] if j + 1 < len(tokens) else "")
            try:
                return float(value)
            except ValueError:
                return None
    return None


def free_memory(device: str) -> tuple[str, int | None]:
    """(cuda or cpu, bytes a run there may use: the GPU's free memory, or the host's MemAvailable; None
    where it cannot be known, e.g. a CUDA device asked for on a machine without one). device: auto,
    cpu, cuda or cuda:N."""
    import torch

    auto = "cuda" if torch.cuda.is_available() else "cpu"
    target = torch.device(auto if device == "auto" else device)
    if target.type == "cuda":
        return "cuda", torch.cuda.mem_get_info(target)[0] if torch.cuda.is_available() else None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return "cpu", int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return "cpu", None


def plan_memory(config: TrainConfig, preset: str | None = None, gpu_memory_gb: float | None = None,
                device: str | None = None, world_size: int | None = None) -> MemoryPlan:
    """Predict the memory of `config`'s training run on `device` ("cuda" or "cpu"; default: from
    config.device, CUDA for auto) with `gpu_memory_gb` of memory (default: unknown, fits is None), as
    one of `world_size` data-parallel processes (default: WORLD_SIZE, else 1)."""
    import os

    world_size = world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", "1") or 1)
    from abs_fast.model.policy import resolve_target_modules
    from abs_fast.ops.layers import SWIGLU_CHUNK_ELEMENTS
    from abs_fast.ops.logprobs import BACKWARD_CHUNK_BYTES, CHUNK_ELEMENTS
    from abs_fast.ops.nf4 import NF4_BUFFER_MIN_TOKENS

    device = device or ("cpu" if config.device == "cpu" else "cuda")
    shape = model_shape(config.model, preset)
    dtype = config.dtype if config.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
    b = 4 if dtype == "float32" else 2
    targets = set(resolve_target_modules("all-linear" if config.target_modules == "all-linear" else
                                         [t.strip() for t in config.target_modules.split(",")]))
    trained = 1 if config.mode != "bipolicy" else 2
    adapters = trained + (1 if config.frozen_defender else 0)
    params = _adapter_params(shape, config.lora_rank, targets)
    resident: dict[str, int] = dict(_weights(shape, config.quantize, b))
    resident["adapters (fp32)"] = adapters * params * 4
    resident["Adam moments (fp32)"] = trained * params * 8
    seq_len = config.max_prompt_tokens + config.attacker_max_new_tokens + config.defender_max_new_tokens
    kv_per_token = 2 * shape.layers * shape.kv_heads * shape.head_dim * b
    if config.rollout_engine == "embedded":
        resident["engine KV cache"] = kv_per_token * config.engine_max_batch * seq_len
    elif not config.sglang_url:
        fraction = _sglang_fraction(config.sglang_args)
        if gpu_memory_gb is not None:
            resident["SGLang server (mem fraction)"] = int((fraction or SGLANG_DEFAULT_MEM_FRACTION) *
                                                           gpu_memory_gb * GIB)
        prefill = SGLANG_PREFILL_TOKENS * b * (4 * shape.intermediate + 3 * shape.hidden)
        resident["SGLang server (non-static)"] = CUDA_CONTEXT_BYTES + SGLANG_GRAPH_BYTES + prefill
    judge = None
    if config.judge == "wildguard":
        judge = _judge_shape(config.judge_model)
        resident["judge weights (NF4)"] = sum(_weights(judge, "nf4", b).values())
        resident["judge KV cache"] = (2 * judge.layers * judge.kv_heads * judge.head_dim * b * config.judge_max_batch
                                      * config.judge_max_seq_len)
    if device == "cuda":
        resident["CUDA context"] = CUDA_CONTEXT_BYTES
        resident["Triton autotune flush buffer"] = AUTOTUNE_FLUSH_BYTES
        if config.rollout_engine == "embedded":
            # one graph per batch bucket (1, 2, 4, ... engine_max_batch), each keeping its fp32 logits
            # and its decode activations in the shared graph pool
            buckets = [1 << k for k in range(max(config.engine_max_batch - 1, 0).bit_length() + 1)]
            per_row = shape.vocab * 4 + b * (4 * shape.intermediate + 3 * shape.hidden)
            resident["CUDA graph pools (decode)"] = sum(min(n, config.engine_max_batch) for n in buckets) * per_row
        if world_size > 1:
            resident["NCCL buffers"] = NCCL_BUFFER_BYTES

    h, i, vocab = shape.hidden, shape.intermediate, shape.vocab
    tokens = config.token_budget
    forward_per_token = b * (4 * i + 3 * h + (shape.heads + 2 * shape.kv_heads) * shape.head_dim)
    biggest_linear = max(o * k for o, k in shape.linears()) * b
    nf4_scratch = biggest_linear if config.quantize == "nf4" and device == "cuda" else 0
    buffer_scratch = nf4_scratch if tokens >= NF4_BUFFER_MIN_TOKENS else 0
    phases: dict[str, dict[str, int]] = {}
    sampling_copies = 6 + (3 if config.top_p < 1 else 0)
    if config.rollout_engine == "embedded":
        phases["rollout"] = {
            "prefill activations": tokens * forward_per_token + buffer_scratch,
            "decode sampling buffers": config.engine_max_batch * vocab * 4 * sampling_copies,
        }
    if judge is not None:
        phases["judge"] = {"judge prefill activations": min(8192, config.judge_max_batch * config.judge_max_seq_len)
                           * b * (4 * judge.intermediate + 3 * judge.hidden),
                           "judge decode buffers": config.judge_max_batch * judge.vocab * 4 * 6}
    # the vocabulary chunks of token_logprobs: fp32 [tokens, chunk] blocks (PyTorch: two at once, in
    # the forward and in the backward) or the Triton backward's gradient block, plus the fp32
    # gradient of the hidden states
    responses = min(tokens, config.train_batch_size * max(config.attacker_max_new_tokens,
                                                          config.defender_max_new_tokens))  # scored per micro-batch
    chunk_block = min(CHUNK_ELEMENTS, responses * vocab) * 4
    logprob_forward = 2 * chunk_block if device == "cpu" else 0
    # the fp32 gradient of the hidden states: on CUDA a 16-bit head accumulates it out of place (addmm
    # with an fp32 result), so two are alive at once
    dh_copies = 2 if device == "cuda" and b == 2 else 1
    logprob_backward = (2 * chunk_block if device == "cpu" else BACKWARD_CHUNK_BYTES) + dh_copies * responses * h * 4
    phases["logprob"] = {"scoring activations": tokens * forward_per_token + buffer_scratch,
                         "log-prob chunks": logprob_forward}
    saved_layer = _saved_per_token_layer(shape, b, config.lora_rank, adapters, device)
    outside = 3 * h * b  # the embeddings' output, the final norm's input, the scored hidden states
    if config.gradient_checkpointing:
        saved = tokens * (shape.layers * h * b + outside)
        recomputed = tokens * saved_layer  # one layer's activations while its backward runs
        what = "activations (checkpointed)"
    else:
        saved, recomputed = tokens * (shape.layers * saved_layer + outside), 0
        what = "activations (saved)"
    liger = device == "cuda" and _liger_installed()
    swiglu = 0 if liger else min(tokens * i, SWIGLU_CHUNK_ELEMENTS) * 4 * 5  # its fp32 temporaries
    layer_backward = recomputed + tokens * (2 * i * b + 6 * h * 4) + swiglu + buffer_scratch + nf4_scratch
    phases["train"] = {"adapter gradients (fp32)": trained * params * 4, what: saved,
                       "backward working set": max(logprob_backward, layer_backward)}
    # the optimizer step: the gradients, a copy of the adapters and their Adam state (rolled back when the
    # step leaves a non-finite value), and Adam's own temporaries (foreach: about one more copy)
    phases["optimizer step"] = {"adapter gradients (fp32)": trained * params * 4,
                                "rollback copy (fp32 params + moments)": trained * params * 12,
                                "Adam temporaries": trained * params * 4}
    capacity = None if gpu_memory_gb is None else int(gpu_memory_gb * GIB)
    plan = MemoryPlan(device, resident, phases, capacity)
    plan.advice = _advice(plan, config)
    return plan


def _liger_installed() -> bool:
    from abs_fast.ops.layers import liger_available

    return liger_available()


def _judge_shape(judge_model: str) -> ModelShape:
    path = Path(judge_model).expanduser() if judge_model else None
    if path is not None and (path / "config.json").is_file():
        try:
            return ModelShape.from_fields(json.loads((path / "config.json").read_text(encoding="utf-8")))
        except (json.JSONDecodeError, KeyError, TypeError):
            pass
    return ModelShape.from_fields(_WILDGUARD)


def _advice(plan: MemoryPlan, config: TrainConfig) -> list[str]:
    """Which knob frees the most, for a plan that does not fit."""
    if plan.fits is not False:
        return []
    over = plan.peak - plan.capacity
    tips = []
    phase = plan.peak_phase
    if phase == "train" and not config.gradient_checkpointing:
        tips.append("gradient_checkpointing=true keeps one layer's activations instead of all of them")
    if phase in ("train", "logprob", "rollout") and config.token_budget > 1024:
        tips.append(f"token_budget={config.token_budget // 2} halves the activations of the {phase} phase")
    if "engine KV cache" in plan.resident:
        kv = plan.resident["engine KV cache"]
        rows = max(1, int(config.engine_max_batch * max(0.0, 1 - over / max(kv, 1))))
        seq_len = config.max_prompt_tokens + config.attacker_max_new_tokens + config.defender_max_new_tokens
        tips.append(f"engine_max_batch={min(rows, config.engine_max_batch // 2 or 1)} shrinks the engine KV cache "
                    f"({kv / GIB:.1f} GiB now: engine_max_batch={config.engine_max_batch} rows of max_prompt_tokens + "
                    f"attacker_max_new_tokens + defender_max_new_tokens = {seq_len} tokens; lower any of them)")
    if "judge KV cache" in plan.resident:
        tips.append(f"judge_max_batch={max(1, config.judge_max_batch // 2)} shrinks the judge KV cache "
                    f"({plan.resident['judge KV cache'] / GIB:.1f} GiB now: judge_max_batch={config.judge_max_batch} "
                    f"x judge_max_seq_len={config.judge_max_seq_len})")
    if "SGLang server (mem fraction)" in plan.resident:
        tips.append("'sglang_args=--mem-fraction-static 0.5' (or lower) leaves more of the GPU to the trainer")
    tips.append(f"the run needs about {math.ceil(over / GIB * 10) / 10} GiB more than the "
                f"{plan.capacity / GIB:.1f} GiB available")
    return tips


def parse_gib(text: str) -> float:
    """'24', '24GB', '80 GiB' -> GiB."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(gib|gb|g)?\s*", text.lower())
    if not match:
        raise ValueError(f"--gpu-memory expects a size in GB (e.g. 24 or 80GB), got {text!r}")
    return float(match.group(1))
