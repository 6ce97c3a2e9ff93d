"""Measuring memory: the live and peak bytes of tensor storage, on any device.

CUDA has its allocator's statistics (torch.cuda.max_memory_allocated); the CPU has none, so
`LiveTensorBytes` follows every tensor storage created while it is active (a TorchDispatchMode) and
releases it when the storage dies (storage objects are preserved while alive, so a finaliser on them
fires exactly then). It is what checks the memory planner's predictions on CPU.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["LiveTensorBytes", "resident_bytes"]


class LiveTensorBytes(TorchDispatchMode):
    """`current` / `peak`: bytes of the tensor storages created while active that are still alive /
    at most alive at once. `mark()` restarts the peak from the current value (per-phase peaks)."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _release(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def mark(self) -> None:
        self.peak = self.current

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor) and not t.is_meta}  # views and in-place results allocate nothing
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and not t.is_meta:
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.live and key not in inputs and storage.nbytes():
                    self.live[key] = storage.nbytes()
                    self.current += storage.nbytes()
                    self.peak = max(self.peak, self.current)
                    weakref.finalize(storage, self._release, key)
        return out


def resident_bytes(*objects) -> int:
    """Bytes of the distinct storages of the given tensors, modules (parameters and buffers) and
    optimizers (their state tensors)."""
    seen: dict[int, int] = {}

    def add(t):
        if isinstance(t, torch.Tensor) and not t.is_meta:
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()

    for obj in objects:
        if isinstance(obj, torch.nn.Module):
            for t in [*obj.parameters(), *obj.buffers()]:
                add(t)
        elif isinstance(obj, torch.optim.Optimizer):
            for state in obj.state.values():
                for t in state.values():
                    add(t)
        else:
            add(obj)
    return sum(seen.values())
