"""Data-parallel training over torch.distributed (launched by torchrun).

Each rank plays its own share of every step's games (its own rollouts and judge calls), computes
its loss normalised by the whole step's token counts, and the adapter gradients are summed over the
ranks with one all-reduce per adapter, so every rank takes the same optimizer step as one process
training on the union of the batches. Only the adapters are reduced: the base is frozen. Rank 0
writes metrics, checkpoints and the final adapters.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence

import torch

__all__ = ["SINGLE_PROCESS", "Collective", "init_distributed"]


class Collective:
    """The reductions the trainer needs; with world_size 1 every call returns its input."""

    def __init__(self, rank: int = 0, world_size: int = 1, local_rank: int = 0):
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks (in place; returns the tensor)."""
        if self.enabled:
            torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
        return tensor

    def max(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
        return tensor

    def sum_gradients(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Sum the gradients of `params` over ranks in one all-reduce (a missing gradient counts as
        zero and becomes a tensor)."""
        if not self.enabled or not params:
            return
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
        torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = flat[offset:offset + n].view_as(p).clone()
            offset += n

    def broadcast_parameters(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Rank 0's values everywhere (so every rank starts from the same adapters). NCCL takes only
        contiguous tensors: a parameter that is a strided view (the B of an adapter whose rank is
        below the layer's largest) travels through a contiguous copy."""
        if not self.enabled:
            return
        with torch.no_grad():
            for p in params:
                if p.data.is_contiguous():
                    torch.distributed.broadcast(p.data, src=0)
                else:
                    buffer = p.data.contiguous()
                    torch.distributed.broadcast(buffer, src=0)
                    p.data.copy_(buffer)

    def gather(self, obj) -> list | None:
        """Every rank's `obj` on rank 0 (None elsewhere). Objects are small: per-game summaries."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size if self.is_main else None
        torch.distributed.gather_object(obj, out, dst=0)
        return out

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()


SINGLE_PROCESS = Collective()


def init_distributed(device: str = "auto", timeout_s: float = 600.0) -> tuple[Collective, str]:
    """(collective, device) for this process. Under torchrun (WORLD_SIZE > 1) this joins the process
    group: NCCL on GPUs (one per local rank), gloo on CPU, with collectives that wait up to
    `timeout_s` (at least as long as a rank may spend starting its SGLang server). Otherwise a
    single-process collective. A CUDA device becomes the current device (cuda:N with N != 0 too):
    Triton launches, CUDA graph streams and the native library follow the current device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        parsed = torch.device(device) if device.startswith("cuda") else None
        if parsed is not None and parsed.index is not None:
            torch.cuda.set_device(parsed.index)
        return SINGLE_PROCESS, device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        if torch.cuda.device_count() <= local_rank:
            raise RuntimeError(f"rank {rank}: LOCAL_RANK={local_rank} but this node has {torch.cuda.device_count()} "
                               "GPUs; start at most one process per GPU (torchrun --nproc-per-node)")
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    elif device == "auto":
        device = "cpu"
    if not torch.distributed.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        torch.distributed.init_process_group(backend=backend, device_id=torch.device(device) if use_cuda else None,
                                             timeout=datetime.timedelta(seconds=timeout_s))
    return Collective(rank, world_size, local_rank), device
