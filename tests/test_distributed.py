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


# --- devices and collectives, without a GPU ------------------------------------------------------

def test_a_cuda_device_with_an_index_becomes_the_current_device(monkeypatch):
    """device=cuda:N in one process makes GPU N current: Triton, graph streams and the native library
    follow the current device, not the tensors'."""
    from abs_fast.train.distributed import init_distributed

    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    for device in ("cuda:3", "cuda", "cpu", "auto"):
        assert init_distributed(device)[1] == device
    assert chosen == [3]


def test_collectives_wait_as_long_as_a_server_may_take_to_start(monkeypatch, tmp_path):
    """The process group's timeout is the one the trainer passes: at least sglang_startup_timeout."""
    import datetime

    import abs_fast.train.loop as loop
    from abs_fast.train import apply_overrides, preset_config
    from abs_fast.train.distributed import init_distributed

    seen = {}
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda **kwargs: seen.update(kwargs))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    init_distributed("cpu", timeout_s=1500.0)
    assert seen["backend"] == "gloo" and seen["timeout"] == datetime.timedelta(seconds=1500)

    def stop(device, timeout_s):
        seen["trainer_timeout"] = timeout_s
        raise RuntimeError("stop here")
    monkeypatch.setattr(loop, "init_distributed", stop)
    config = apply_overrides(preset_config("tiny"), ["rollout_engine=sglang", "sglang_startup_timeout=1800",
                                                     "device=cpu", "check_memory=false", f"model={tmp_path}",
                                                     f"output={tmp_path / 'run'}"])
    with pytest.raises(RuntimeError, match="stop here"):
        loop.Trainer(config)
    assert seen["trainer_timeout"] >= 1800


def test_non_contiguous_adapter_parameters_are_broadcast_through_a_contiguous_copy(monkeypatch):
    """Adapters of different ranks in one layer: the smaller one's B is a strided view of the stack,
    which NCCL refuses; it travels through a contiguous buffer and lands back in the view."""
    from abs_fast.model.lora import MultiLoRALinear
    from abs_fast.train.distributed import Collective

    layer = MultiLoRALinear(8, 6)
    layer.add_adapter("attacker", rank=2, alpha=4)
    layer.add_adapter("defender", rank=4, alpha=4)
    params = [layer.lora_A["attacker"], layer.lora_B["attacker"], layer.lora_B["defender"]]
    assert not params[1].is_contiguous()

    def broadcast(tensor, src):  # NCCL's rule; rank 0 sends sevens
        if not tensor.is_contiguous():
            raise ValueError("Tensors must be contiguous")
        tensor.fill_(7.0)
    monkeypatch.setattr(torch.distributed, "broadcast", broadcast)
    Collective(rank=1, world_size=2).broadcast_parameters(params)
    for p in params:
        assert torch.equal(p, torch.full_like(p, 7.0))
    stack_b = layer._stacks[1]
    assert torch.equal(stack_b[0, :, :2], torch.full((6, 2), 7.0)) and not stack_b[0, :, 2:].any()
