"""MultiLoRALinear: one frozen base linear and any number of named LoRA adapters.

Each token of a batch picks its adapter by index (`adapter_ids`, -1 = base only), so the attacker,
the defender and the adapter-free KL reference run through the layer in one pass.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from abs_fast.ops import lora_linear
from abs_fast.ops.routing import AdapterRouting
from abs_fast.quant import NF4Weight

__all__ = ["MultiLoRALinear"]

_NF4_FIELDS = ("packed", "absmax", "nested_absmax", "nested_offset", "nested_code", "scales")


class MultiLoRALinear(nn.Module):
    """A frozen `weight` [out, in] (+ `bias`) with adapters `lora_A[name]` [r, in], `lora_B[name]` [out, r].

    Adapter initialisation follows PEFT: A Kaiming-uniform (a = sqrt(5)), B zero, so a new adapter
    starts as the identity on the base; each adapter scales its update by alpha / r. Adapter ids
    index `adapter_names` in the order the adapters were added.

    The adapters' parameters live inside one stacked pair of tensors per layer ([n, r_max, in] and
    [n, out, r_max], each parameter a view of its slice), so a forward reads all adapters without
    stacking them again, while each adapter stays its own parameter (its own optimizer group).

    `quantize_base_()` replaces the dense weight by NF4 (buffers `nf4_packed`, `nf4_absmax`, ...);
    `base_weight` is then an NF4Weight view of those buffers and `weight` is None.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype),
                                   requires_grad=False)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        if self.weight.device.type != "meta":
            # nn.Linear's default initialisation, for a layer built on its own
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
            if self.bias is not None:
                bound = 1 / math.sqrt(in_features) if in_features > 0 else 0
                nn.init.uniform_(self.bias, -bound, bound)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.ranks: dict[str, int] = {}
        self.alphas: dict[str, float] = {}
        self._stacks: tuple[torch.Tensor, torch.Tensor] | None = None  # the storage of every lora_A / lora_B
        self.register_buffer("scaling", torch.empty(0, dtype=torch.float32, device=device), persistent=False)
        self._nf4_format: tuple[torch.Size, torch.dtype, int] | None = None  # (shape, dtype, blocksize)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> MultiLoRALinear:
        """Wrap an existing nn.Linear's weight and bias (shared, not copied) and freeze them."""
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                    device="meta", dtype=linear.weight.dtype)
        layer.weight = nn.Parameter(linear.weight.data, requires_grad=False)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.data, requires_grad=False)
        layer.scaling = torch.empty(0, dtype=torch.float32, device=linear.weight.device)
        return layer

    # --- the frozen base ------------------------------------------------------------------

    @property
    def is_quantized(self) -> bool:
        return self._nf4_format is not None

    @property
    def base_weight(self) -> torch.Tensor | NF4Weight:
        """The frozen base: the dense `weight`, or an NF4Weight over this layer's NF4 buffers."""
        if self._nf4_format is None:
            return self.weight
        shape, dtype, blocksize = self._nf4_format
        return NF4Weight(self.nf4_packed, self.nf4_absmax, shape, dtype, blocksize, self.nf4_nested_absmax,
                         self.nf4_nested_offset, self.nf4_nested_code, self.nf4_scales)

    @property
    def device(self) -> torch.device:
        return self.nf4_packed.device if self.is_quantized else self.weight.device

    def quantize_base_(self, blocksize: int = 64, double_quant: bool = True) -> None:
        """Store the frozen base weight in NF4 (bitsandbytes-compatible) and release the dense copy."""
        if self.is_quantized:
            raise RuntimeError("the base weight is already quantised")
        if self.weight.device.type == "meta":
            raise RuntimeError("cannot quantise a weight on the meta device: load real weights first")
        self.set_nf4_base_(NF4Weight.quantize(self.weight.data, blocksize, double_quant))

    def set_nf4_base_(self, nf4: NF4Weight) -> None:
        """Make `nf4` (already quantised, e.g. read from a bitsandbytes checkpoint) the frozen base."""
        if tuple(nf4.shape) != (self.out_features, self.in_features):
            raise ValueError(f"an NF4 weight of shape {tuple(nf4.shape)} does not fit a layer "
                             f"[{self.out_features}, {self.in_features}]")
        self.weight = None  # this layer's reference to a dense weight goes now
        nf4 = nf4.with_scales()  # the block scales are decoded once here, not at every forward
        for field in _NF4_FIELDS:  # the decoded scales are derived: not part of the state dict
            self.register_buffer(f"nf4_{field}", getattr(nf4, field), persistent=field != "scales")
        self._nf4_format = (nf4.shape, nf4.dtype, nf4.blocksize)

    def _apply(self, fn, recurse=True):
        """.to()/.cuda() move the NF4 buffers but never cast them (their dtypes are the format), and
        rebuild the adapters' stacked storage on the new device."""
        if not self.is_quantized:
            super()._apply(fn, recurse)
            self._restack()
            return self
        names = [f"nf4_{field}" for field in _NF4_FIELDS]
        saved = {name: self._buffers.pop(name) for name in names}
        try:
            super()._apply(fn, recurse)
        finally:
            device = fn(torch.empty(0, device=saved["nf4_packed"].device)).device
            for name in names:
                self._buffers[name] = None if saved[name] is None else saved[name].to(device)
        self._restack()
        return self

    @property
    def adapter_names(self) -> list[str]:
        return list(self.lora_A.keys())

    def adapter_id(self, name: str) -> int:
        try:
            return self.adapter_names.index(name)
        except ValueError:
            raise KeyError(f"no adapter named {name!r}; this layer has {self.adapter_names}") from None

    def add_adapter(self, name: str, rank: int = 16, alpha: float = 32.0, dtype: torch.dtype = torch.float32,
                    generator: torch.Generator | None = None) -> None:
        if not name.isidentifier():
            raise ValueError(f"adapter name must be a Python identifier, got {name!r}")
        if name in self.lora_A:
            raise ValueError(f"adapter {name!r} already exists")
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        device = self.device
        lora_a = torch.empty(rank, self.in_features, device=device, dtype=dtype)
        if device.type != "meta":
            nn.init.kaiming_uniform_(lora_a, a=math.sqrt(5), generator=generator)
        self.lora_A[name] = nn.Parameter(lora_a)
        self.lora_B[name] = nn.Parameter(torch.zeros(self.out_features, rank, device=device, dtype=dtype))
        self.ranks[name] = rank
        self.alphas[name] = float(alpha)
        self._refresh_scaling()
        self._restack()

    def set_adapter_weights(self, name: str, lora_a: torch.Tensor, lora_b: torch.Tensor, alpha: float) -> None:
        """Give adapter `name` (existing or new) these weights, copying in place when the rank is
        unchanged (parameter objects, and so optimizer state, survive) and keeping its id."""
        rank = lora_a.shape[0]
        if lora_a.shape != (rank, self.in_features) or lora_b.shape != (self.out_features, rank):
            raise ValueError(f"adapter {name!r}: lora_A {tuple(lora_a.shape)} / lora_B {tuple(lora_b.shape)} "
                             "do not fit "
                             f"a layer [{self.out_features}, {self.in_features}] (expected [r, {self.in_features}] "
                             f"and [{self.out_features}, r])")
        if name not in self.lora_A:
            self.add_adapter(name, rank, alpha)
        if self.ranks[name] == rank:
            with torch.no_grad():
                self.lora_A[name].copy_(lora_a)
                self.lora_B[name].copy_(lora_b)
        else:
            dtype = self.lora_A[name].dtype
            self.lora_A[name] = nn.Parameter(lora_a.to(self.device, dtype).clone())
            self.lora_B[name] = nn.Parameter(lora_b.to(self.device, dtype).clone())
            self.ranks[name] = rank
            self._restack()
        self.alphas[name] = float(alpha)
        self._refresh_scaling()

    def delete_adapter(self, name: str) -> None:
        self.adapter_id(name)  # raises a clear KeyError for an unknown name
        del self.lora_A[name], self.lora_B[name], self.ranks[name], self.alphas[name]
        self._refresh_scaling()
        self._restack()

    def _refresh_scaling(self) -> None:
        """scaling[i] = alpha / rank of adapter i, written in place while the number of adapters is
        unchanged: a captured CUDA graph reads it by address, so new alphas reach its replays."""
        values = torch.tensor([self.alphas[n] / self.ranks[n] for n in self.adapter_names], dtype=torch.float32)
        if self.scaling.numel() == values.numel() and self.scaling.device == self.device:
            self.scaling.copy_(values)
        else:
            self.scaling = values.to(self.device)

    def _restack(self) -> None:
        """Move every adapter's parameters into one fresh stacked pair (zero-padded to the largest
        rank) and make each parameter a view of its slice. Parameter objects, and so optimizer state,
        survive; called after any change of the adapters' set, ranks, device or dtype."""
        names = self.adapter_names
        if not names or self.lora_A[names[0]].device.type == "meta":
            self._stacks = None
            return
        first = self.lora_A[names[0]]
        r_max = max(self.ranks.values())
        stack_a = torch.zeros(len(names), r_max, self.in_features, device=first.device, dtype=first.dtype)
        stack_b = torch.zeros(len(names), self.out_features, r_max, device=first.device, dtype=first.dtype)
        with torch.no_grad():
            for i, name in enumerate(names):
                rank = self.ranks[name]
                stack_a[i, :rank].copy_(self.lora_A[name])
                stack_b[i, :, :rank].copy_(self.lora_B[name])
                self.lora_A[name].data = stack_a[i, :rank]
                self.lora_B[name].data = stack_b[i, :, :rank]
        self._stacks = (stack_a, stack_b)

    def _stacked_in_place(self) -> bool:
        if self._stacks is None:
            return False
        stack_a, stack_b = self._stacks
        return all(self.lora_A[n].data_ptr() == stack_a[i].data_ptr() and
                   self.lora_B[n].data_ptr() == stack_b[i].data_ptr() for i, n in enumerate(self.adapter_names))

    def stacked_adapters(self) -> tuple[torch.Tensor, torch.Tensor]:
        """lora_a [n, r_max, in] and lora_b [n, out, r_max] (smaller ranks zero-padded), read from
        the storage the parameters live in (no copy); with gradients enabled, the backward hands
        each adapter's parameters their slices of the gradient."""
        if not self._stacked_in_place():
            self._restack()  # a parameter was replaced from outside (e.g. assigned a new tensor)
        stack_a, stack_b = self._stacks
        if not torch.is_grad_enabled():
            return stack_a, stack_b
        names = self.adapter_names
        params = [self.lora_A[n] for n in names] + [self.lora_B[n] for n in names]
        return _StackedAdapters.apply((stack_a, stack_b), tuple(self.ranks[n] for n in names), *params)

    def forward(self, x: torch.Tensor, adapter_ids: torch.Tensor | AdapterRouting | None = None) -> torch.Tensor:
        """x [..., in]; adapter_ids: an AdapterRouting for the batch (what a model passes to every
        layer), or per-token ids [...] / [T] (indices into adapter_names, -1 = base), or None: every
        token takes the base alone."""
        base = self.base_weight
        if adapter_ids is None or not self.lora_A:
            if isinstance(adapter_ids, torch.Tensor) and adapter_ids.numel() and int(adapter_ids.max()) >= 0:
                raise ValueError("adapter_ids select an adapter but this layer has none")
            if isinstance(base, torch.Tensor):
                return F.linear(x, base, self.bias)
            tokens = x.numel() // self.in_features if self.in_features else 0
            routing = AdapterRouting(torch.full((tokens,), -1, dtype=torch.int32, device=x.device), 0)
            no_a = x.new_empty(0, 1, self.in_features, dtype=torch.float32)
            no_b = x.new_empty(0, self.out_features, 1, dtype=torch.float32)
            return lora_linear(x, base, no_a, no_b, routing, self.scaling[:0], self.bias)
        lora_a, lora_b = self.stacked_adapters()
        return lora_linear(x, base, lora_a, lora_b, adapter_ids, self.scaling, self.bias)

    def extra_repr(self) -> str:
        adapters = ", ".join(f"{n}(r={self.ranks[n]}, alpha={self.alphas[n]:g})" for n in self.adapter_names)
        base = f", base=nf4(blocksize={self._nf4_format[2]})" if self.is_quantized else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}{base}, adapters=[{adapters}]")


class _StackedAdapters(torch.autograd.Function):
    """The stacked adapters as the op's inputs without a copy: the parameters are views into the
    stacks, so forward returns aliases of the stacks and backward slices the gradient per parameter."""

    @staticmethod
    def forward(ctx, stacks, ranks, *params):
        ctx.ranks = ranks
        return stacks[0].detach(), stacks[1].detach()

    @staticmethod
    def backward(ctx, grad_a, grad_b):
        grads_a = [None if grad_a is None else grad_a[i, :r] for i, r in enumerate(ctx.ranks)]
        grads_b = [None if grad_b is None else grad_b[i, :, :r] for i, r in enumerate(ctx.ranks)]
        return None, None, *grads_a, *grads_b
