"""Data-parallel training: two gloo processes on CPU, launched by torchrun, against one process
training on the union of their batches."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from abs_fast.rollout.sglang import free_port
from abs_fast.train import Sample, UpdateSettings, latest_checkpoint, policy_update, read_metrics

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
from ddp_worker import config_for, gradients  # noqa: E402


def adapter_tensors(directory: Path) -> dict[str, torch.Tensor]:
    return {f"{name}/{k}": v for name in ("attacker", "defender")
            for k, v in load_file(str(directory / name / "adapter_model.safetensors")).items()}


@pytest.mark.slow
def test_two_gloo_ranks_take_the_single_process_step_on_the_union(tmp_path, monkeypatch):
    monkeypatch.setenv("ABS_FAST_BACKEND", "reference")  # whole models under the Triton interpreter take minutes
    env = {**os.environ, "ABS_FAST_BACKEND": "reference", "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(free_port()), str(TESTS / "ddp_worker.py"), str(tmp_path)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rank0, rank1 = tmp_path / "rank0", tmp_path / "rank1"

    # every rank played its own share: whole seeds, round robin
    shares = [json.loads((r / "samples.json").read_text()) for r in (rank0, rank1)]
    for rank, share in enumerate(shares):
        assert share["samples"] and {s["group"] // 2 % 2 for s in share["samples"]} == {rank}
    # same start, same end: identical adapters on both ranks
    before = adapter_tensors(rank0 / "before")
    for key, value in adapter_tensors(rank1 / "before").items():
        assert torch.equal(value, before[key])
    after0, after1 = adapter_tensors(rank0 / "after"), adapter_tensors(rank1 / "after")
    for key in after0:
        assert torch.equal(after0[key], after1[key]), key
    assert any(not torch.equal(after0[k], before[k]) for k in after0)

    # one process, the union of both shares, from the same starting adapters
    from abs_fast.train import Trainer

    reference = Trainer(config_for(tmp_path / "reference"))
    reference.policy.load_adapters(rank0 / "before")
    reference._set_learning_rates()
    union = [Sample(**row) for share in shares for row in share["samples"]]
    settings = UpdateSettings(**shares[0]["settings"])
    captured = {}
    original_step = reference.optimizer.step
    reference.optimizer.step = lambda: (captured.update(gradients(reference)), original_step())[1]
    metrics = policy_update(reference.policy, reference.optimizer, union, settings, torch.Generator().manual_seed(0))
    assert metrics["optimizer_steps"] == 1
    reference_grads, ddp_grads = captured, load_file(str(rank0 / "grads.safetensors"))
    assert ddp_grads.keys() == reference_grads.keys()
    for key, grad in reference_grads.items():  # the summed gradients: the same loss normalisation
        scale = grad.abs().max().clamp(min=1e-12)
        assert (ddp_grads[key] - grad).abs().max() / scale < 1e-5, key
    reference.policy.save_adapters(tmp_path / "reference-after")
    expected = adapter_tensors(tmp_path / "reference-after")
    lr = reference.optimizer.param_groups[0]["lr"]
    grads_by_name = {}
    for name in ("attacker", "defender"):
        for i, p in enumerate(reference.policy.adapter_parameters(name)):
            grads_by_name[id(p)] = reference_grads.get(f"{name}.{i}")
    for key, value in expected.items():
        # Adam's first step moves each weight by ~lr * sign(grad): where a gradient is tiny next to its
        # tensor's largest, fp32 summation order can flip that sign, so those weights get the update bound
        difference = (after0[key] - value).abs()
        assert difference.max() <= 2 * lr * 1.0001, key
    close = sum(int(((after0[k] - v).abs() <= 1e-6 + 1e-5 * v.abs()).sum()) for k, v in expected.items())
    total = sum(v.numel() for v in expected.values())
    assert close / total > 0.999, f"only {close} of {total} weights equal the single-process step"

    # rank 0 reported the whole step and wrote the only checkpoint
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert len(records) == 1 and records[0]["games"] == 8 and records[0]["world_size"] == 2
    assert records[0]["samples/attacker"] + records[0]["samples/defender"] == len(union)
    assert records[0]["kl/defender"] == pytest.approx(metrics["kl/defender"], rel=1e-4, abs=1e-7)
    checkpoint = latest_checkpoint(tmp_path / "run")
    rng = load_file(str(checkpoint / "rng.safetensors"))
    assert "trainer" in rng and "rank1.trainer" in rng and torch.equal(rng["trainer"], rng["rank1.trainer"])
