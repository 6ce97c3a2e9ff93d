"""One data-parallel rank of tests/test_distributed.py (run under torchrun): one training step of the
real Trainer on the tiny model, recording what the test compares with a single-process update."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

import abs_fast.train.loop as loop
from abs_fast.train import Trainer, apply_overrides, preset_config


def config_for(output: Path):
    return apply_overrides(preset_config("tiny"), {
        "output": str(output), "steps": 1, "rollout_batch_size": 8, "samples_per_prompt": 1, "train_batch_size": 64,
        "quantize": "none", "device": "cpu", "tensorboard": False, "progress": False, "diagnostics_every": 0,
        "attacker_max_new_tokens": 12, "defender_max_new_tokens": 12, "token_budget": 700})


def gradients(trainer) -> dict[str, torch.Tensor]:
    return {f"{name}.{i}": p.grad.detach().clone() for name in trainer.policy.adapter_names
            for i, p in enumerate(trainer.policy.adapter_parameters(name)) if p.grad is not None}


def record_update(trainer, out: Path) -> None:
    """Save the samples, starting adapters and the gradients of the optimizer step of the update."""
    original_update, original_step = loop.policy_update, trainer.optimizer.step

    def step(*args, **kwargs):
        save_file(gradients(trainer), str(out / "grads.safetensors"))
        return original_step(*args, **kwargs)

    def update(policy, optimizer, samples, settings, *args, **kwargs):
        trainer.policy.save_adapters(out / "before")
        rows = [dict(role=s.role, adapter=s.adapter, prompt_ids=list(s.prompt_ids), response_ids=list(s.response_ids),
                     reward=s.reward, group=s.group, logprobs=None if s.logprobs is None else list(s.logprobs))
                for s in samples]
        (out / "samples.json").write_text(json.dumps({"samples": rows, "settings": dataclasses.asdict(settings)}))
        return original_update(policy, optimizer, samples, settings, *args, **kwargs)

    trainer.optimizer.step = step
    loop.policy_update = update


def main(root: str) -> None:
    trainer = Trainer(config_for(Path(root) / "run"))
    out = Path(root) / f"rank{trainer.collective.rank}"
    out.mkdir(parents=True, exist_ok=True)
    record_update(trainer, out)
    trainer.train(progress=False)
    trainer.policy.save_adapters(out / "after")
    trainer.close()


if __name__ == "__main__":
    main(sys.argv[1])
