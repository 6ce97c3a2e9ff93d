"""Quantise a model's linear layers to NF4 one layer at a time.

Peak memory stays at the model plus one layer's working set: each layer's dense weight is released
(its module replaced or its parameter dropped) before the next one is quantised, and no list of the
original modules is held while walking the model.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from torch import nn

from abs_fast.model.lora import MultiLoRALinear

__all__ = ["quantize_model_", "quantized_linear_bytes"]

DEFAULT_SKIP = ("lm_head",)  # the head stays dense: token log-probs read it in 16 bits


def _is_skipped(name: str, skip: tuple[str, ...]) -> bool:
    return any(re.search(rf"(^|\.){re.escape(s)}$", name) for s in skip)


def quantize_model_(model: nn.Module, blocksize: int = 64, double_quant: bool = True,
                    skip: tuple[str, ...] = DEFAULT_SKIP,
                    progress: Callable[[int, int, str], None] | None = None) -> int:
    """Turn every nn.Linear (and every dense MultiLoRALinear) into a MultiLoRALinear with an NF4
    base, in place, streaming layer by layer. `skip` lists module names (last components or full
    dotted names) to leave dense. Returns the number of layers quantised."""
    names = [name for name, m in model.named_modules()
             if isinstance(m, nn.Linear | MultiLoRALinear) and not _is_skipped(name, skip)]
    for i, name in enumerate(names):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        module = getattr(parent, child)
        if isinstance(module, MultiLoRALinear):
            if not module.is_quantized:
                module.quantize_base_(blocksize, double_quant)
        else:
            layer = MultiLoRALinear.from_linear(module)
            module = None  # drop this function's reference: the parent's is replaced below
            setattr(parent, child, layer)
            layer.quantize_base_(blocksize, double_quant)
        if progress is not None:
            progress(i + 1, len(names), name)
    return len(names)


def quantized_linear_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes stored, parameters) over the model's NF4 layers, statistics included."""
    stored = params = 0
    for module in model.modules():
        if isinstance(module, MultiLoRALinear) and module.is_quantized:
            weight = module.base_weight
            stored += weight.nbytes()
            params += weight.numel
    return stored, params
