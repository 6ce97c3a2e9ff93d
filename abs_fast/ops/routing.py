"""Adapter routing: which adapter each token of a batch uses, decided once where the batch is assembled.

One AdapterRouting object is built per batch (an engine step, a packed training batch) and passed
explicitly to every multi-adapter layer of the forward pass. Its id range is checked when it is built
(on the host for ids that come from Python lists, so an engine step needs no device sync), and the
grouping of tokens by adapter (the segment plan of the Triton kernels) is built on first use from
device operations only and reused by every layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

__all__ = ["AdapterRouting", "SegmentPlan", "segment_plan"]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class SegmentPlan:
    """Tokens grouped by adapter without moving them: read rows through `sorted_idx`.

    Tile i covers sorted positions [tile_start[i], tile_end[i]) of adapter tile_adapter[i]
    (-1 = base only, -2 = unused padding tile). The table has a fixed upper-bound length
    (ceil(T / block_m) + n_adapters + 1), so building it needs no device-to-host sync.
    """

    block_m: int
    n_adapters: int
    sorted_idx: torch.Tensor  # [T] int32, token indices in adapter order (stable)
    tile_adapter: torch.Tensor  # [num_tiles] int32
    tile_start: torch.Tensor  # [num_tiles] int32
    tile_end: torch.Tensor  # [num_tiles] int32
    seg_start: torch.Tensor  # [n_adapters] int32, start of each adapter's run in sorted order
    seg_count: torch.Tensor  # [n_adapters] int32, tokens of each adapter

    @property
    def num_tiles(self) -> int:
        return self.tile_adapter.numel()


def segment_plan(ids: torch.Tensor, n_adapters: int, block_m: int) -> SegmentPlan:
    """The grouping of tokens by adapter for ids [T] (already range-checked), from device ops only
    (no bincount: its output size would need a sync)."""
    device = ids.device
    groups = ids.reshape(-1).to(torch.int64) + 1  # 0 = base only, 1..n = adapters
    T = groups.numel()
    sorted_idx = torch.sort(groups, stable=True).indices
    counts = torch.zeros(n_adapters + 1, dtype=torch.int64, device=device).scatter_add_(
        0, groups, torch.ones_like(groups))
    starts = torch.cumsum(counts, 0) - counts
    tiles = (counts + block_m - 1) // block_m
    tile_end_cum = torch.cumsum(tiles, 0)
    tile_begin_cum = tile_end_cum - tiles
    num_tiles = _cdiv(T, block_m) + n_adapters + 1
    t = torch.arange(num_tiles, device=device)
    group = torch.searchsorted(tile_end_cum, t, right=True)
    valid = group <= n_adapters
    g = group.clamp(max=n_adapters)
    row_start = starts[g] + (t - tile_begin_cum[g]) * block_m
    row_end = torch.minimum(row_start + block_m, starts[g] + counts[g])
    i32 = torch.int32
    return SegmentPlan(
        block_m=block_m,
        n_adapters=n_adapters,
        sorted_idx=sorted_idx.to(i32),
        tile_adapter=torch.where(valid, g - 1, torch.full_like(g, -2)).to(i32),
        tile_start=torch.where(valid, row_start, torch.zeros_like(row_start)).to(i32),
        tile_end=torch.where(valid, row_end, torch.zeros_like(row_end)).to(i32),
        seg_start=starts[1:].to(i32).contiguous(),
        seg_count=counts[1:].to(i32).contiguous(),
    )


@dataclass(frozen=True, eq=False)
class AdapterRouting:
    """Per-token adapter ids [T] (int32, on the batch's device; -1 = base only) for layers holding
    `n_adapters` adapters, range-checked when built. Build it with `from_ids`."""

    ids: torch.Tensor
    n_adapters: int
    _plans: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_ids(cls, ids: Sequence[int] | torch.Tensor, n_adapters: int,
                 device: torch.device | str | None = None, checked: bool = False) -> AdapterRouting:
        """ids: a sequence of Python ints (checked on the host) or an integer tensor (checked here
        with one device sync, unless `checked`: the caller has validated it, e.g. an engine step's
        device-resident ids that were checked when their rows were admitted)."""
        if isinstance(ids, torch.Tensor):
            if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.is_complex():
                raise TypeError(f"adapter ids must be an integer tensor, got {ids.dtype}")
            tensor = ids.reshape(-1).to(device=device if device is not None else ids.device, dtype=torch.int32)
            if not checked and tensor.numel():
                lo, hi = (int(v) for v in torch.aminmax(tensor))
                _check_range(lo, hi, n_adapters)
        else:
            values = [int(v) for v in ids]
            if values:
                _check_range(min(values), max(values), n_adapters)
            tensor = torch.tensor(values, dtype=torch.int32, device=device)
        return cls(tensor, n_adapters)

    @property
    def num_tokens(self) -> int:
        return self.ids.numel()

    def plan(self, block_m: int) -> SegmentPlan:
        """The segment plan for M tiles of `block_m` rows (built once per block size)."""
        plan = self._plans.get(block_m)
        if plan is None:
            plan = self._plans[block_m] = segment_plan(self.ids, self.n_adapters, block_m)
        return plan

    def one_hot(self, dtype: torch.dtype) -> torch.Tensor:
        """[T, n_adapters]: 1 where the token uses the adapter (the PyTorch reference's mask)."""
        key = ("one_hot", dtype)
        mask = self._plans.get(key)
        if mask is None:
            arange = torch.arange(self.n_adapters, device=self.ids.device, dtype=torch.int32)
            mask = self._plans[key] = (self.ids[:, None] == arange[None, :]).to(dtype)
        return mask


def _check_range(lo: int, hi: int, n_adapters: int) -> None:
    if lo < -1 or hi >= n_adapters:
        raise ValueError(f"adapter_ids must lie in [-1, {n_adapters - 1}] (-1 = base only), "
                         f"found values in [{lo}, {hi}]")
