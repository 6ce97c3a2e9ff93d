"""Checkpoints: adapters (PEFT format), optimizer state, RNG states, step and data position.

Layout: RUN/checkpoints/step_000010/{adapters/<name>/, optimizer.safetensors, rng.safetensors,
state.json}, and RUN/checkpoints/latest naming the newest complete one. Each checkpoint directory
is written in a staging directory and renamed into place, and `latest` is replaced atomically
after it, so a run killed at any moment leaves the previous checkpoint intact. No pickle anywhere.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from abs_fast.io import atomic_write_text, read_safetensors, read_text, replace_directory, save_safetensors, shorten

__all__ = ["latest_checkpoint", "load_checkpoint", "save_checkpoint"]

STATE_NAME, OPTIMIZER_NAME, RNG_NAME = "state.json", "optimizer.safetensors", "rng.safetensors"


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = optimizer.state_dict()
    tensors = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"optimizer state {key!r} is a {type(value).__name__}; only tensors are saved")
            tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
    return tensors, {"param_groups": state["param_groups"]}


def save_checkpoint(run_dir: str | Path, step: int, policy, optimizer: torch.optim.Optimizer,
                    rng_states: dict[str, torch.Tensor], state: dict, keep: int = 2, base_info: dict | None = None
                    ) -> Path:
    """Write checkpoint `step` and point `latest` at it; keep the newest `keep` checkpoints. base_info:
    what the adapters were trained on, saved beside each (Policy.save_adapters)."""
    root = Path(run_dir) / "checkpoints"
    target = root / f"step_{step:06d}"
    with replace_directory(target) as staging:
        policy.save_adapters(staging / "adapters", base_info=base_info)
        tensors, groups = _optimizer_tensors(optimizer)
        save_safetensors(tensors, staging / OPTIMIZER_NAME)
        save_safetensors({k: v.contiguous() for k, v in rng_states.items()}, staging / RNG_NAME)
        (staging / STATE_NAME).write_text(json.dumps({**state, "step": step, "optimizer": groups}, indent=2),
                                          encoding="utf-8")
    atomic_write_text(root / "latest", target.name + "\n")
    finished = sorted(p for p in root.glob("step_*") if p.is_dir() and (p / STATE_NAME).is_file())
    for old in finished[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    root = Path(run_dir) / "checkpoints"
    pointer = root / "latest"
    if not pointer.is_file():
        return None
    name = read_text(pointer, "checkpoint pointer").strip()
    target = root / name
    if not name.startswith("step_") or Path(name).name != name or target.is_symlink():
        raise ValueError(f"{pointer} names {shorten(name)}: a checkpoint pointer names a step_* directory inside "
                         f"{root}, nothing elsewhere")
    if not (target / STATE_NAME).is_file():
        raise FileNotFoundError(f"{pointer} names {target.name}, which is missing or incomplete")
    return target


def load_checkpoint(checkpoint: str | Path, policy, optimizer: torch.optim.Optimizer
                    ) -> tuple[dict, dict[str, torch.Tensor]]:
    """Restore adapters (in place) and optimizer state; returns (state, rng_states)."""
    checkpoint = Path(checkpoint)
    try:
        state = json.loads(read_text(checkpoint / STATE_NAME, "checkpoint state"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{checkpoint / STATE_NAME}: not valid JSON ({err})") from None
    policy.load_adapters(checkpoint / "adapters", names=policy.adapter_names)
    tensors = read_safetensors(checkpoint / OPTIMIZER_NAME, "optimizer state")
    per_param: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ValueError(f"{checkpoint / OPTIMIZER_NAME}: {key!r} holds NaN or infinite values; resume from an "
                             "earlier checkpoint")
        index, _, name = key.partition(".")
        per_param.setdefault(int(index), {})[name] = value
    saved_groups = state["optimizer"]["param_groups"]
    if [g.get("name") for g in saved_groups] != [g.get("name") for g in optimizer.param_groups]:
        raise ValueError(f"{checkpoint}: optimizer groups {[g.get('name') for g in saved_groups]} do not match this "
                         f"run's {[g.get('name') for g in optimizer.param_groups]} (a different mode?)")
    optimizer.load_state_dict({"state": per_param, "param_groups": saved_groups})
    return state, read_safetensors(checkpoint / RNG_NAME, "checkpoint RNG state")
