"""Settings for a real checkpoint given without a preset (`train --model DIR`): the paper's recipe,
scaled to the model's size and to the memory of the device the run will use.

The recipe (docs/GAME.md section 5): 3% warm-up, Adam betas (0.9, 0.95), clip 1.0, 200 steps,
temperature 1.0, turns of hundreds of tokens, a LoRA learning rate in 1e-5..1e-4 (larger for
smaller models). The batch sizes come from a ladder of rungs, largest first: the first whose memory
plan fits the device is taken. A CPU starts at the small rungs, where a step takes minutes, not hours.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from abs_fast.train.config import TrainConfig
from abs_fast.train.plan import GIB, ModelShape, free_memory, model_shape, plan_memory

__all__ = ["DerivedSettings", "derive_settings", "parameter_count"]

_RECIPE = dict(samples_per_prompt=1, temperature=1.0, top_p=1.0, adam_beta1=0.9, adam_beta2=0.95, warmup_ratio=0.03,
               grad_clip=1.0, steps=200, checkpoint_every=10, diagnostics_every=10, max_prompt_tokens=1024)

# largest first; a rung is these keys' values, turn_tokens being both roles' max_new_tokens
_RUNG_KEYS = ("rollout_batch_size", "train_batch_size", "engine_max_batch", "token_budget", "turn_tokens",
              "gradient_checkpointing", "judge_max_batch")
_RUNGS = (
    (128, 32, 128, 16384, 512, False, 32),
    (64, 32, 64, 8192, 512, False, 32),
    (64, 32, 64, 8192, 512, True, 16),
    (32, 16, 32, 4096, 384, True, 16),
    (16, 8, 16, 2048, 256, True, 8),
    (8, 8, 8, 2048, 256, True, 8),
)
_CPU_FIRST_RUNG = 4  # a CPU decodes tens of tokens a second: 16 seeds of 256-token turns is already minutes a step


def parameter_count(shape: ModelShape) -> int:
    """Weights of the base: embeddings (and an untied head), every layer's projections and norms."""
    per_layer = sum(o * i for o, i in shape.linears()) + 2 * shape.hidden
    embeddings = shape.vocab * shape.hidden * (1 if shape.tied else 2)
    return embeddings + shape.layers * per_layer + shape.hidden


def _learning_rate(parameters: int) -> float:
    """LoRA rates in the 1e-5..1e-4 band, smaller for larger models (their updates move more per step)."""
    billions = parameters / 1e9
    if billions <= 2:
        return 5e-5
    if billions <= 5:
        return 3e-5
    if billions <= 10:
        return 2e-5
    return 1e-5


@dataclass(frozen=True)
class DerivedSettings:
    """The settings chosen for a checkpoint and why: `values` go into the config (under --set)."""

    values: dict
    parameters: int
    device: str
    capacity_gib: float | None
    fits: bool | None
    peak_gib: float

    def describe(self) -> list[str]:
        v = self.values
        memory = ("memory unknown" if self.capacity_gib is None else
                  f"plan {self.peak_gib:.1f} of {self.capacity_gib:.1f} GiB" + ("" if self.fits else ", DOES NOT FIT"))
        return [f"settings derived from the checkpoint ({self.parameters / 1e9:.2f}B parameters) and {self.device} "
                f"({memory}); any --set overrides them, --preset NAME picks a named set:",
                f"  lr {v['lr_attacker']:g} (both roles), turns {v['attacker_max_new_tokens']} tokens, prompts up to "
                f"{v['max_prompt_tokens']} tokens, {v['rollout_batch_size']} seeds a step, train batch "
                f"{v['train_batch_size']}, engine {v['engine_max_batch']} rows, token budget {v['token_budget']}, "
                f"gradient checkpointing {'on' if v['gradient_checkpointing'] else 'off'}, {v['steps']} steps"]


def derive_settings(base: TrainConfig, device: str | None = None, gpu_memory_gb: float | None = None
                    ) -> DerivedSettings:
    """Settings for `base.model` (a checkpoint directory) on `device` (default base.device), with
    `gpu_memory_gb` of memory (default: what the device has free now)."""
    shape = model_shape(base.model)
    parameters = parameter_count(shape)
    device = device or base.device
    kind, free = free_memory(device)
    capacity = gpu_memory_gb if gpu_memory_gb is not None else (None if free is None else free / GIB)
    lr = _learning_rate(parameters)
    chosen = None
    for row in _RUNGS[_CPU_FIRST_RUNG:] if kind == "cpu" else _RUNGS:
        rung = dict(zip(_RUNG_KEYS, row, strict=True))
        turn = rung.pop("turn_tokens")
        values = dict(_RECIPE, lr_attacker=lr, lr_defender=lr, attacker_max_new_tokens=turn,
                      defender_max_new_tokens=turn, **rung)
        plan = plan_memory(dataclasses.replace(base, **values), gpu_memory_gb=capacity, device=kind)
        chosen = DerivedSettings(values, parameters, kind, capacity, plan.fits, plan.peak / GIB)
        if plan.fits is not False:
            break
    return chosen
