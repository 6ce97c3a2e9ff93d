"""The tokenizer, policy and judge a TrainConfig names (shared by training, evaluation,
cross-play and exploitability runs, so all of them load a model the same way)."""

from __future__ import annotations

import copy
import json
import logging
import os
import shlex
from collections.abc import Sequence
from pathlib import Path

import torch

from abs_fast.game import HeuristicJudge, Judge, WildGuardJudge
from abs_fast.io import shorten
from abs_fast.train.config import TrainConfig

__all__ = ["BASE_INFO_KEYS", "adapter_base_info", "check_before_loading", "load_judge", "load_policy_for",
           "load_tokenizer_for", "sglang_engine_for", "stop_token_ids", "target_modules_of"]

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_tokenizer_for(config: TrainConfig):
    """config.tokenizer, else the model directory's tokenizer; the offline Qwen2.5 one for presets."""
    from abs_fast.model import PRESETS, load_qwen25_tokenizer

    source = config.tokenizer or config.model
    if source in PRESETS or source == "qwen2.5":
        tokenizer = load_qwen25_tokenizer()
    else:
        from transformers import AutoTokenizer

        if not (Path(source) / "tokenizer_config.json").is_file() and not (Path(source) / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{source}: no tokenizer files (tokenizer.json / tokenizer_config.json); set "
                                    "tokenizer=DIR, or tokenizer=qwen2.5 for the offline Qwen2.5 tokenizer")
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True, trust_remote_code=False)
        except (ValueError, OSError, TypeError, KeyError) as err:  # a truncated or foreign file: name it
            files = [name for name in ("tokenizer.json", "tokenizer_config.json") if (Path(source) / name).is_file()]
            raise ValueError(f"{source}: its tokenizer files ({', '.join(files)}) cannot be loaded: "
                             f"{shorten(str(err))}; copy them again from the checkpoint's source") from err
    if config.chat_template and config.chat_template != tokenizer.chat_template:
        tokenizer = copy.copy(tokenizer)  # the offline Qwen2.5 tokenizer is shared (cached): never changed in place
        tokenizer.chat_template = config.chat_template
    return tokenizer


def chat_template_source(config: TrainConfig, tokenizer) -> str:
    """Where the chat template the game's prompts use comes from."""
    from abs_fast.model import PRESETS

    if config.chat_template:
        return "the chat_template setting"
    source = config.tokenizer or config.model
    if source in PRESETS or source == "qwen2.5":
        return "the offline Qwen2.5 tokenizer"
    directory = Path(source)
    if (directory / "chat_template.jinja").is_file():
        return str(directory / "chat_template.jinja")
    try:
        if "chat_template" in json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8")):
            return str(directory / "tokenizer_config.json")
    except (OSError, ValueError):
        pass
    return "the tokenizer" if tokenizer.chat_template else "none (set chat_template=...)"


def describe_checkpoint(config: TrainConfig, tokenizer, arch=None) -> dict:
    """What a run header and `abs-fast info --model` say about a checkpoint: architecture, size, tied
    embeddings, attention grouping, the chat template's source and the stop ids with their source.
    arch: the loaded policy's ArchConfig (default: read from config.json, no weights)."""
    from abs_fast.model.policy import read_arch_config
    from abs_fast.train.defaults import parameter_count
    from abs_fast.train.plan import ModelShape

    if arch is None:
        arch = read_arch_config(config.model)[2]
    shape = ModelShape(arch.vocab_size, arch.hidden_size, arch.intermediate_size, arch.num_layers, arch.num_heads,
                       arch.num_kv_heads, arch.head_dim, arch.tie_word_embeddings)
    stops, stop_source = checkpoint_stop_ids(arch, tokenizer)
    return {"model": config.model, "architecture": arch.model_type, "parameters": parameter_count(shape),
            "layers": arch.num_layers, "tied_embeddings": arch.tie_word_embeddings,
            "query_heads": arch.num_heads, "kv_heads": arch.num_kv_heads,
            "gqa_ratio": arch.num_heads // arch.num_kv_heads,
            "chat_template": chat_template_source(config, tokenizer),
            "stop_ids": list(stops), "stop_tokens": [tokenizer.convert_ids_to_tokens(i) for i in stops],
            "stop_source": stop_source}


def checkpoint_header(info: dict) -> str:
    """describe_checkpoint's dict as one line."""
    ratio = info["gqa_ratio"]
    attention = "multi-head attention" if ratio == 1 else f"GQA {ratio}:1"
    stops = ", ".join(f"{i} {t}" for i, t in zip(info["stop_ids"], info["stop_tokens"], strict=True))
    return (f"checkpoint {info['model']}: {info['architecture']}, {info['parameters'] / 1e9:.2f}B parameters, "
            f"{info['layers']} layers, {'tied' if info['tied_embeddings'] else 'untied'} embeddings, {attention} "
            f"({info['query_heads']} query / {info['kv_heads']} KV heads); chat template from {info['chat_template']}; "
            f"stop ids {stops} (from {info['stop_source']})")


# the keys of a TrainConfig that say what a trained adapter runs on (saved beside it, read by eval_config)
BASE_INFO_KEYS = ("model", "tokenizer", "quantize", "dtype", "reasoning", "lora_rank", "lora_alpha",
                  "target_modules")


def adapter_base_info(config: TrainConfig, tokenizer) -> dict:
    """What an adapter trained under `config` needs to be played again: the base model (and the seed
    of a preset's random weights), the tokenizer and its chat template, quantisation, dtype, the
    turn format, rank and alpha (abs-fast-base.json beside the adapter)."""
    from abs_fast.model import PRESETS

    info = {key: getattr(config, key) for key in BASE_INFO_KEYS}
    info["chat_template"] = tokenizer.chat_template or ""
    if config.model in PRESETS:
        info["seed"] = config.seed
    return info


def check_device(device: str) -> None:
    """device: auto, cpu, cuda or cuda:N, and a CUDA device must exist."""
    if device == "auto":
        return
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}") from None
    if parsed.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device}: no CUDA device is visible here (torch {torch.__version__}); use "
                             "device=cpu or auto")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(f"device={device}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def check_before_loading(config: TrainConfig) -> None:
    """Every refusal that needs no weights, made before any load (training and evaluation alike): the
    device exists, the judge's checkpoint directory exists."""
    check_device(config.device)
    if config.judge == "wildguard" and not Path(config.judge_model).is_dir():
        raise FileNotFoundError(f"judge_model={config.judge_model}: no such directory (a WildGuard-format "
                                "classifier checkpoint)")
    if config.rollout_engine == "sglang" and not config.sglang_url:
        from abs_fast.rollout.sglang_server import tensor_parallel_size

        python = config.sglang_python
        if python and not (Path(python).is_file() and os.access(python, os.X_OK)):
            raise FileNotFoundError(f"sglang_python={python}: not an executable file (the Python of an environment "
                                    "with sglang installed, e.g. /opt/sglang-venv/bin/python)")
        tp = tensor_parallel_size(shlex.split(config.sglang_args))
        if tp > 1 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError(f"sglang_args asks each launched server for tensor parallelism {tp}, but under torchrun "
                             "every rank launches its own server on its own single GPU. Run one process with "
                             "tensor parallelism (no torchrun), or start the servers yourself and pass sglang_url")


def _device(config: TrainConfig, device: str | None) -> str | None:
    if device is not None:
        return device
    return None if config.device == "auto" else config.device


def target_modules_of(config: TrainConfig) -> str | list[str]:
    """config.target_modules as load_policy takes it: "all-linear" or a list of projection names."""
    if config.target_modules == "all-linear":
        return "all-linear"
    return [t.strip() for t in config.target_modules.split(",")]


def load_policy_for(config: TrainConfig, adapters: Sequence[str] = (), device: str | None = None):
    """The base model of `config` (seeded random weights for presets) with fresh adapters `adapters`.
    device: overrides config.device (a data-parallel rank's own GPU)."""
    from abs_fast.model import PRESETS, load_policy

    if config.model in PRESETS and config.model != "tiny":
        logger.warning("model=%s is a preset with RANDOM weights (for benchmarks); pass --model DIR to use a real "
                       "checkpoint", config.model)
    device = _device(config, device)
    return load_policy(config.model, quantize=None if config.quantize == "none" else config.quantize,
                       adapters=tuple(adapters), rank=config.lora_rank, alpha=config.lora_alpha,
                       target_modules=target_modules_of(config), device=device, dtype=_DTYPES.get(config.dtype),
                       seed=config.seed, deterministic=config.deterministic)


def load_judge(config: TrainConfig, device: str | None = None) -> Judge:
    if config.judge == "heuristic":
        return HeuristicJudge()
    return WildGuardJudge.from_pretrained(config.judge_model, device=_device(config, device),
                                          max_batch=config.judge_max_batch, max_seq_len=config.judge_max_seq_len)


def stop_token_ids(tokenizer, policy) -> tuple[int, ...]:
    """Ids that end a turn: the checkpoint's (generation_config.json's eos ids, else config.json's), else
    the tokenizer's eos."""
    return checkpoint_stop_ids(policy.config, tokenizer)[0]


def checkpoint_stop_ids(arch, tokenizer) -> tuple[tuple[int, ...], str]:
    """(stop ids, where they came from) for a model's ArchConfig and its tokenizer."""
    if arch.eos_token_ids:
        return tuple(arch.eos_token_ids), arch.eos_source
    if tokenizer.eos_token_id is not None:
        return (int(tokenizer.eos_token_id),), "the tokenizer's eos_token"
    raise ValueError("the checkpoint names no end-of-turn token (no eos_token_id in generation_config.json or "
                     "config.json, no eos_token in the tokenizer): generation could never stop")


def sglang_engine_for(config: TrainConfig, tokenizer, adapters: Sequence[str], log_path: str | Path, rank: int = 0,
                      gpu: int | None = None, owner: bool = True, name_tag: str | None = None,
                      version_swaps: bool = True):
    """The SGLangEngine `config` asks for: attached to sglang_url (keys from SGLANG_API_KEY and
    SGLANG_ADMIN_API_KEY; `owner` False: another rank pushes the adapters under `name_tag`), else a
    server launched on 127.0.0.1 (on `gpu`) with room for `adapters`, the base and, with
    `version_swaps`, one new version of each. Build it before the policy: the server sizes its
    memory pool from what is free when it starts."""
    from abs_fast.model import resolve_target_modules
    from abs_fast.rollout.sglang import ServerSettings, SGLangEngine

    payload = {"float32": torch.float32, "float16": torch.float16}.get(config.dtype, torch.bfloat16)
    common = dict(tokenizer=tokenizer, request_timeout=config.sglang_request_timeout,
                  adapter_sync=config.adapter_sync, adapter_dir=config.sglang_adapter_dir or None,
                  fallback_dir=Path(log_path).parent / f"sglang-adapters-rank{rank}", payload_dtype=payload)
    if config.sglang_url:
        return SGLangEngine(url=config.sglang_url, worker_urls=config.sglang_worker_urls or None,
                            push_adapters=owner, name_tag=name_tag, api_key=os.environ.get("SGLANG_API_KEY"),
                            admin_api_key=os.environ.get("SGLANG_ADMIN_API_KEY"), **common)
    adapters = tuple(dict.fromkeys(adapters))
    slots = None if version_swaps else len(adapters) + 1  # None: each adapter, its next version and the base
    settings = ServerSettings(model_path=config.model, tokenizer_path=config.tokenizer or None,
                              max_lora_rank=config.lora_rank,
                              lora_target_modules=resolve_target_modules(target_modules_of(config)),
                              adapters=adapters, max_loras_per_batch=slots, dtype=config.dtype,
                              seed=config.seed + rank, extra_args=tuple(shlex.split(config.sglang_args)), gpu=gpu,
                              startup_timeout=config.sglang_startup_timeout, log_path=str(log_path),
                              python=config.sglang_python)
    logger.info("starting the SGLang server (log: %s)", log_path)
    return SGLangEngine(settings=settings, **common)
