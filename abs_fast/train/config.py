"""Training configuration: one flat dataclass, presets, JSON/TOML files and `--set key=value`.

Every key is checked: an unknown key or a value of the wrong type is an error that names the key
(and the file, where there is one) and lists what is valid.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args, get_origin

from abs_fast.io import check_text, read_text, shorten

__all__ = [
    "INT_RANGES",
    "MODES",
    "RESUME_FIXED",
    "TRAIN_PRESETS",
    "TrainConfig",
    "WarmstartSettings",
    "apply_overrides",
    "check_resume",
    "config_from_file",
    "preset_config",
    "role_adapters",
]

MODES = ("bipolicy", "shared", "defender-only", "attacker-only")


def role_adapters(mode: str) -> dict[str, str | None]:
    """Which adapter plays each role (None = the frozen base) in a training mode."""
    return {
        "bipolicy": {"attacker": "attacker", "defender": "defender"},
        "shared": {"attacker": "shared", "defender": "shared"},
        "defender-only": {"attacker": None, "defender": "defender"},
        "attacker-only": {"attacker": "attacker", "defender": None},
    }[mode]


# The range of every integer key (inclusive), checked before any work: past the upper bound a value is a
# typo or would run for days (e.g. samples_per_prompt=1000000 deals 10^8 games a step). README lists them.
INT_RANGES = {
    "lora_rank": (1, 1024), "rollout_batch_size": (1, 65536), "samples_per_prompt": (1, 256),
    "attacker_max_new_tokens": (1, 131072), "defender_max_new_tokens": (1, 131072), "max_prompt_tokens": (1, 131072),
    "engine_max_batch": (1, 65536), "judge_max_batch": (1, 65536), "judge_max_seq_len": (1, 131072),
    "train_batch_size": (1, 1_000_000), "token_budget": (1, 10_000_000), "steps": (1, 10_000_000),
    "checkpoint_every": (1, 10_000_000), "keep_checkpoints": (1, 1000), "diagnostics_every": (0, 10_000_000),
    "max_nonfinite_steps": (1, 1000), "seed": (0, 2**63 - 1),
}
GAMES_PER_STEP_LIMIT = 1_048_576  # rollout_batch_size x samples_per_prompt x 2 roles

# upper bounds past which a value is a typo, not a choice (LoRA Adam rates are ~1e-6..1e-3)
# keys whose value shapes a run's saved state: a resume that changes one is refused (the adapters,
# their optimizer state or the base they were trained on would no longer match)
RESUME_FIXED = ("model", "tokenizer", "chat_template", "quantize", "lora_rank", "lora_alpha", "target_modules", "mode",
                "reasoning")

_SANE_UPPER = {"lr_attacker": 1.0, "lr_defender": 1.0, "kl_beta": 100.0, "clip_eps": 10.0, "temperature": 10.0,
               "weight_decay": 10.0}


@dataclass
class TrainConfig:
    # model
    model: str = "tiny"  # a local checkpoint directory, or a model preset (random weights: tests, benchmarks)
    tokenizer: str = ""  # default: the model directory's tokenizer; the offline Qwen2.5 one for presets
    chat_template: str = ""  # a Jinja chat template that replaces the tokenizer's (default: the tokenizer's own)
    quantize: Literal["nf4", "none"] = "nf4"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = "auto"
    lora_rank: int = 16
    lora_alpha: float = 32.0
    target_modules: str = "all-linear"  # or a comma list: q_proj,k_proj,...
    gradient_checkpointing: bool = False
    # GPU: FlashAttention's backward sums dq in a fixed order, so two runs with one seed give the same
    # adapters and a resume is exact; false lets it use atomics (faster backward, unmeasured here)
    deterministic: bool = True
    # game
    mode: Literal["bipolicy", "shared", "defender-only", "attacker-only"] = "bipolicy"
    seeds: list[str] = field(default_factory=lambda: ["builtin"])  # "builtin", PATH, harmful=PATH, benign=PATH
    generated_fraction: float = 0.5  # share of games where the attacker rewrites the seed
    reasoning: bool = True  # <think>/<answer> format with a format reward; False = plain chat
    reward_variant: Literal["general-sum", "zero-sum", "all-one"] = "general-sum"
    drop_ties: bool = True
    judge: Literal["heuristic", "wildguard"] = "heuristic"
    judge_model: str = ""  # local WildGuard-format checkpoint directory (judge=wildguard)
    judge_max_batch: int = 32  # the judge engine's rows; its KV cache is judge_max_batch x judge_max_seq_len tokens
    judge_max_seq_len: int = 2048  # longer judge inputs keep their start and end (the middle is cut)
    frozen_defender: str = ""  # attacker-only: a PEFT adapter dir the attacker plays against (default: the base)
    # rollout
    rollout_batch_size: int = 128  # seeds per step
    samples_per_prompt: int = 1  # G: samples per seed and role (GRPO / RLOO groups)
    temperature: float = 1.0
    top_p: float = 1.0
    attacker_max_new_tokens: int = 512
    defender_max_new_tokens: int = 512
    max_prompt_tokens: int = 1024
    engine_max_batch: int = 64
    rollout_engine: Literal["embedded", "sglang"] = "embedded"  # sglang: rollouts on an SGLang server
    sglang_url: str = ""  # attach to this server or sglang-router (empty: launch one per process on 127.0.0.1)
    sglang_worker_urls: list[str] = field(default_factory=list)  # servers behind sglang_url's router
    sglang_args: str = ""  # more sglang.launch_server options, e.g. "--mem-fraction-static 0.45"
    sglang_python: str = ""  # the Python that runs a launched server (SGLang's own venv: its torch pin); default ours
    sglang_startup_timeout: float = 900.0
    sglang_request_timeout: float = 900.0  # one wave; a server silent for longer counts as hung
    adapter_sync: Literal["auto", "files", "tensors"] = "auto"  # how adapters reach SGLang after each step
    sglang_adapter_dir: str = ""  # where adapter versions go (default /dev/shm); storage remote workers can read
    # RL
    algorithm: Literal["reinforce++", "grpo", "rloo"] = "reinforce++"
    kl_beta: float = 0.01  # REINFORCE++/RLOO: k1 penalty in the reward; GRPO: k3 loss coefficient
    clip_eps: float = 0.2
    reward_clip: float = 10.0
    train_batch_size: int = 32  # samples per optimizer step
    token_budget: int = 8192  # tokens per packed micro-batch
    lr_attacker: float = 2e-5
    lr_defender: float = 2e-5
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    grad_clip: float = 1.0  # per adapter (0 = off)
    reuse_sampler_logprobs: bool = True  # embedded engine: its log-probs are the old policy's (see README)
    # run
    steps: int = 200
    seed: int = 0
    output: str = "runs/abs"
    checkpoint_every: int = 10
    keep_checkpoints: int = 2
    diagnostics_every: int = 10  # attack diversity and attacker/defender KL every N steps (0 = never)
    tensorboard: bool = True
    progress: bool = True
    check_memory: bool = True  # refuse, before loading anything, a run whose memory plan does not fit the device
    max_nonfinite_steps: int = 5  # stop after this many steps in a row whose every update was non-finite

    def validate(self, require_model: bool = True) -> TrainConfig:
        """Check every key; require_model=False for planning a preset before a checkpoint is chosen."""
        if require_model and not self.model:
            raise ValueError("no model: pass --model LOCAL_DIR (a local Qwen2.5-*-Instruct checkpoint directory)")
        positive = ("lora_rank", "rollout_batch_size", "samples_per_prompt", "attacker_max_new_tokens",
                    "defender_max_new_tokens", "max_prompt_tokens", "engine_max_batch", "judge_max_batch",
                    "train_batch_size", "token_budget", "steps", "checkpoint_every", "keep_checkpoints")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name, (low, high) in INT_RANGES.items():
            if not low <= getattr(self, name) <= high:
                raise ValueError(f"{name} must be in [{low}, {high}], got {getattr(self, name)}")
        if self.rollout_batch_size * self.samples_per_prompt * 2 > GAMES_PER_STEP_LIMIT:
            raise ValueError(f"rollout_batch_size x samples_per_prompt = {self.rollout_batch_size} x "
                             f"{self.samples_per_prompt} turns a step past {GAMES_PER_STEP_LIMIT // 2} games; lower "
                             "samples_per_prompt or rollout_batch_size")
        if not 0.0 <= self.generated_fraction <= 1.0:
            raise ValueError(f"generated_fraction must be in [0, 1], got {self.generated_fraction}")
        if not 0 < self.top_p <= 1 or self.temperature < 0:
            raise ValueError(f"need temperature >= 0 and top_p in (0, 1], got {self.temperature}, {self.top_p}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{f.name} must be a finite number, got {value}")
        for name in ("kl_beta", "clip_eps", "reward_clip", "grad_clip", "weight_decay", "lr_attacker", "lr_defender"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name, upper in _SANE_UPPER.items():
            if getattr(self, name) > upper:
                raise ValueError(f"{name}={getattr(self, name)} is far outside any sane range (at most {upper}); "
                                 "check the exponent")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.reward_clip == 0:
            raise ValueError("reward_clip must be > 0 (it bounds |reward|)")
        if self.max_nonfinite_steps < 1:
            raise ValueError(f"max_nonfinite_steps must be >= 1, got {self.max_nonfinite_steps}")
        if self.algorithm in ("grpo", "rloo") and self.samples_per_prompt < 2:
            raise ValueError(f"algorithm={self.algorithm} compares samples of one seed: set samples_per_prompt >= 2")
        if self.judge_max_seq_len < 256:
            raise ValueError(f"judge_max_seq_len must be >= 256 (the judge's input format alone is ~150 tokens), got "
                             f"{self.judge_max_seq_len}")
        if self.judge == "wildguard" and not self.judge_model:
            raise ValueError("judge=wildguard needs judge_model=LOCAL_DIR (a WildGuard-format classifier checkpoint)")
        if self.diagnostics_every < 0:
            raise ValueError(f"diagnostics_every must be >= 0 (0 = never), got {self.diagnostics_every}")
        if self.frozen_defender and self.mode != "attacker-only":
            raise ValueError(f"frozen_defender is for mode=attacker-only (a fresh attacker against a fixed "
                             f"defender), this run's mode is {self.mode!r}")
        if self.rollout_engine == "sglang" and not self.sglang_url and require_model and not Path(self.model).is_dir():
            raise ValueError(f"rollout_engine=sglang launches an SGLang server on model={self.model!r}, which is not a "
                             "local checkpoint directory; pass --model DIR, or sglang_url=URL of a running server")
        from abs_fast.rollout.sglang import is_loopback_url

        if self.rollout_engine == "sglang" and not self.sglang_adapter_dir and any(
                not is_loopback_url(u) for u in [self.sglang_url, *self.sglang_worker_urls] if u):
            raise ValueError("sglang_url names another machine, which cannot read adapter files from this machine's "
                             "/dev/shm: set sglang_adapter_dir to storage both machines share")
        if self.sglang_worker_urls and not self.sglang_url:
            raise ValueError("sglang_worker_urls lists the servers behind a router: set sglang_url to the router too")
        for name in ("sglang_startup_timeout", "sglang_request_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0 seconds, got {getattr(self, name)}")
        if not self.seeds:
            raise ValueError("seeds is empty: give 'builtin', PATH, harmful=PATH or benign=PATH")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_COMMON_QWEN = dict(rollout_batch_size=64, samples_per_prompt=1, train_batch_size=32, token_budget=16384,
                    lr_attacker=2e-5, lr_defender=2e-5, attacker_max_new_tokens=512, defender_max_new_tokens=512,
                    engine_max_batch=128, steps=200, checkpoint_every=10)

# Presets: named starting points. The full-size ones need --model LOCAL_DIR.
TRAIN_PRESETS: dict[str, dict] = {
    "tiny": dict(model="tiny", rollout_batch_size=8, train_batch_size=8, token_budget=2048,
                 attacker_max_new_tokens=24, defender_max_new_tokens=24, max_prompt_tokens=512, engine_max_batch=16,
                 lr_attacker=1e-3, lr_defender=1e-3, steps=12, checkpoint_every=4, diagnostics_every=4,
                 output="runs/tiny"),
    # Each full-size preset fits its GPU with the WildGuard judge beside it (`abs-fast plan --preset P
    # --gpu-memory GB --set judge=wildguard judge_model=DIR`; tests/test_plan.py checks every one).
    "qwen2.5-3b": dict(_COMMON_QWEN, model="", output="runs/qwen2.5-3b"),  # 80 GB
    "qwen2.5-7b": dict(_COMMON_QWEN, model="", token_budget=8192, output="runs/qwen2.5-7b"),  # 80 GB
    # 80 GB: the embedded engine's KV cache at 64 rows, recomputed activations
    "qwen2.5-14b": dict(_COMMON_QWEN, model="", token_budget=8192, engine_max_batch=64, gradient_checkpointing=True,
                        judge_max_batch=16, output="runs/qwen2.5-14b"),
    # one H200 (141 GB): 128 engine rows, activations kept (no recomputation)
    "qwen2.5-14b-h200": dict(_COMMON_QWEN, model="", token_budget=8192, engine_max_batch=128,
                             output="runs/qwen2.5-14b-h200"),
    # a 7B run on one 24 GB card: NF4 base, small micro-batches, recomputed activations
    "consumer-24gb": dict(_COMMON_QWEN, model="", rollout_batch_size=32, train_batch_size=16, token_budget=4096,
                          engine_max_batch=32, attacker_max_new_tokens=384, defender_max_new_tokens=384,
                          judge_max_batch=16, gradient_checkpointing=True, output="runs/consumer-24gb"),
}


@dataclass(frozen=True)
class WarmstartSettings:
    """The warm start's knobs (README, "Format warm start")."""

    steps: int = 150  # supervised optimizer steps
    batch_size: int = 8  # turns per step
    lr: float = 2e-4
    rank: int = 16
    alpha: float = 32.0
    turn_tokens: int = 256  # a turn's length: the reasoning and the answer each get a little under half
    examples: int = 128  # assembled turns (half per role)
    eval_seeds: int = 8  # held-out seeds: one attacker and one defender prompt each
    eval_samples: int = 4  # sampled turns per held-out prompt, for the validity figures
    temperature: float = 1.0  # the game's sampling, for the measurements and the rejection sampling
    data_temperature: float = 0.7  # the assembled turns' replies: the model's likelier text, less noise
    engine_max_batch: int = 32
    max_prompt_tokens: int = 1024
    seeds: tuple[str, ...] = ("builtin",)
    quantize: str = "nf4"  # the base while the adapter trains (the merge uses the checkpoint's own weights)
    device: str = "auto"
    seed: int = 0

    def validate(self) -> WarmstartSettings:
        for name in ("steps", "batch_size", "rank", "examples", "eval_seeds", "eval_samples", "engine_max_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.turn_tokens < 24:
            raise ValueError(f"--turn-tokens must be >= 24 (the tags alone take about 12), got {self.turn_tokens}")
        if not 0 < self.lr <= 1e-1:
            raise ValueError(f"--lr must be in (0, 0.1], got {self.lr}")
        if self.quantize not in ("nf4", "none"):
            raise ValueError(f"--quantize must be nf4 or none, got {self.quantize!r}")
        return self


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_HINTS = typing.get_type_hints(TrainConfig)


def _describe(hint) -> str:
    if get_origin(hint) is Literal:
        return "one of " + ", ".join(map(str, get_args(hint)))
    if get_origin(hint) is list:
        return "a list of strings (comma-separated on the command line)"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[hint]


def _coerce(key: str, value, where: str):
    """value (a string from the command line, or a JSON/TOML value) as the type of field `key`."""
    if key not in _FIELDS:
        raise KeyError(f"{where}: unknown key {key!r}; valid keys: {', '.join(sorted(_FIELDS))}")
    hint = _HINTS[key]
    bad = ValueError(f"{where}: {key} must be {_describe(hint)}, got {shorten(value)}")
    if isinstance(value, str):
        check_text(value, f"{where}: {key}")  # no NUL byte, no lone surrogate
    if get_origin(hint) is Literal:
        choices = get_args(hint)
        if value not in choices:
            raise bad
        return value
    if get_origin(hint) is list:
        if isinstance(value, str):  # comma-separated; a value with a comma goes in double quotes
            return [v.strip() for v in next(csv.reader([value], skipinitialspace=True), []) if v.strip()]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
        raise bad
    if hint is bool:
        if isinstance(value, bool):
            return value
        lowered = str(value).strip().lower()
        if lowered in ("true", "1", "yes", "on"):
            return True
        if lowered in ("false", "0", "no", "off"):
            return False
        raise bad
    if hint is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        try:
            return int(str(value), 10)
        except ValueError:
            raise bad from None
    if hint is float:
        if isinstance(value, bool):
            raise bad
        try:
            return float(value)
        except (TypeError, ValueError):
            raise bad from None
    if not isinstance(value, str):
        raise bad
    return value


def preset_config(name: str) -> TrainConfig:
    if name not in TRAIN_PRESETS:
        raise KeyError(f"unknown preset {name!r}; choose one of {', '.join(TRAIN_PRESETS)}")
    return dataclasses.replace(TrainConfig(), **TRAIN_PRESETS[name])


def apply_overrides(config: TrainConfig, overrides: dict | list[str], where: str = "--set") -> TrainConfig:
    """overrides: {key: value} or ["key=value", ...]."""
    if isinstance(overrides, list):
        pairs = {}
        for item in overrides:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise ValueError(f"{where}: expected key=value, got {item!r}")
            pairs[key.strip()] = value
        overrides = pairs
    changes = {key: _coerce(key, value, where) for key, value in overrides.items()}
    return dataclasses.replace(config, **changes)


def config_from_file(path: str | Path) -> TrainConfig:
    """A JSON or TOML file of config keys; an optional "preset" key names the starting point."""
    path = Path(path)
    text = read_text(path, "config file")
    if path.suffix.lower() == ".toml":
        try:
            import tomllib
        except ImportError:
            raise ImportError(f"{path}: TOML configs need Python 3.11 or newer; use a JSON file") from None
        try:
            values = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"{path}: not valid TOML ({err})") from None
    else:
        try:
            values = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected an object of config keys")
    preset = values.pop("preset", None)
    base = preset_config(preset) if preset is not None else TrainConfig()
    return apply_overrides(base, values, where=str(path))


def check_resume(config: TrainConfig, saved_path: str | Path) -> None:
    """Refuse to resume the run whose config.json is `saved_path` under a config that changes a key its
    saved state depends on (RESUME_FIXED): name the key, the saved value and this run's."""
    saved_path = Path(saved_path)
    if not saved_path.is_file():
        return  # a run from before config.json was written: nothing to compare with
    saved = config_from_file(saved_path)
    for key in RESUME_FIXED:
        before, now = getattr(saved, key), getattr(config, key)
        if before != now:
            raise ValueError(f"--resume: {key} was {shorten(before)} in {saved_path} and would be {shorten(now)}: the "
                             "saved adapters and optimizer state depend on it. Resume with the saved value, or "
                             "start a new run in another output directory")

