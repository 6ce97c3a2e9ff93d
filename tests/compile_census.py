"""The compile census: how many Triton variants a 7B self-play step and decode waves make the JIT
compile, counted on a CPU with no GPU and nothing launched.

The real launch wrappers (LoRALinearFunction forward and backward, the NF4 dequantise-to-buffer and
decode products, token_logprobs forward and backward, decode attention) run on meta tensors (shapes
only, no memory, no arithmetic) with every Triton kernel replaced by a recorder. For each launch the
recorder forms the key the JIT caches compiled kernels under: Triton's own specialisation of each
run-time argument (`native_specialize_impl`: its type, and whether it is 1 or divisible by 16, unless
the kernel says do_not_specialize), every constexpr, and the launch options; for the autotuned fused
matmul, one key per configuration the autotuner would compile for the target. Each distinct key is
one compile on a GPU.

Run as a script (TRITON_INTERPRET must be unset, so that triton.jit builds real JIT functions):

    python tests/compile_census.py MICRO_BATCHES SEED [ARCH]

It prints one JSON object: {"variants": N, "per_kernel": {...}, "launches": N}.
"""

from __future__ import annotations

import functools
import json
import sys
from collections import Counter

import torch

QWEN7B = dict(hidden=3584, intermediate=18944, heads=28, kv_heads=4, head_dim=128, vocab=152064)
SMS = 132  # an H100 / H200


class Census:
    def __init__(self):
        self.variants: set[tuple] = set()
        self.launches = 0

    def record(self, fn, configs, args, kwargs):
        from triton.backends.compiler import BaseBackend
        from triton.runtime.jit import native_specialize_impl

        self.launches += 1
        kwargs = dict(kwargs)
        options = tuple((k, kwargs.pop(k)) for k in ("num_warps", "num_stages", "enable_fp_fusion") if k in kwargs)
        bound = dict(zip(fn.arg_names, args, strict=False))
        bound.update(kwargs)
        for config in configs or [None]:
            values = dict(bound)
            launch = options
            if config is not None:
                values.update(config.kwargs)
                launch = (("num_warps", config.num_warps), ("num_stages", config.num_stages))
            key = [fn.__name__]
            for param in fn.params:
                value = values.get(param.name, param.default)
                if param.is_constexpr:
                    key.append((param.name, value))
                else:
                    key.append(native_specialize_impl(BaseBackend, value, False, not param.do_not_specialize,
                                                      not param.do_not_specialize_on_alignment))
            self.variants.add((*key, launch))


class Recorder:
    """Stands in for a JIT function (or an autotuned one: `configs`): kernel[grid](...) records."""

    def __init__(self, census: Census, fn, configs=None, prune=None):
        self.census, self.fn, self.configs, self.prune = census, fn, configs, prune

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            configs = self.configs
            if self.prune is not None:  # as the autotuner prunes before it compiles
                configs = self.prune(configs, dict(zip(self.fn.arg_names, args, strict=False)) | kwargs)
            self.census.record(self.fn, configs, args, kwargs)
        return launch


def install(census: Census, arch: int):
    """Replace every kernel the wrappers launch by a recorder, and make the wrappers take their GPU
    branches on meta tensors (132 SMs, not interpreting)."""
    from abs_fast.kernels import attention as k_attention
    from abs_fast.kernels import logprobs as k_logprobs
    from abs_fast.kernels import lora as k_lora
    from abs_fast.kernels import nf4 as k_nf4
    from abs_fast.model import attention
    from abs_fast.ops import logprobs, lora, nf4

    for module, name in ((k_lora, "lora_shrink_kernel"), (k_lora, "lora_segment_grad_kernel"),
                         (k_logprobs, "token_stats_kernel"), (k_logprobs, "token_grad_chunk_kernel"),
                         (k_nf4, "nf4_decode_matmul_kernel"), (k_nf4, "nf4_dequantize_kernel"),
                         (k_attention, "decode_attention_kernel")):
        setattr(module, name, Recorder(census, getattr(module, name)))
    if hasattr(lora, "fused_matmul_configs"):
        fused = Recorder(census, k_lora.lora_fused_matmul_kernel, *lora.fused_matmul_configs(arch))
    else:  # an older abs-fast: every configuration, none pruned
        import triton

        fused = Recorder(census, k_lora.lora_fused_matmul_kernel,
                         [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
                          for bn, bk, w, s in lora.FUSED_MATMUL_CONFIGS])
    lora._fused_matmul_kernel = lambda: fused
    for module in (lora, logprobs, attention):
        if hasattr(module, "triton_interpreting"):
            module.triton_interpreting = lambda: False
    lora._sm_count = lambda index: SMS
    if hasattr(lora, "_arch"):
        lora._arch = lambda index: arch
    if hasattr(lora, "_register_decode"):  # as on a GPU (the first call's probe adds its own two compiles)
        lora._register_decode = lambda device, dtype: lora.nf4_register_decode_for(dtype)
    nf4.select_backend = lambda *args, **kwargs: "triton"

    class _Properties:
        multi_processor_count = SMS

    torch.cuda.get_device_properties = lambda *args, **kwargs: _Properties()
    torch.cuda.current_device = lambda: 0


def _nf4_meta(out_f: int, in_f: int):
    from abs_fast.quant import NF4Weight

    numel, blocks = out_f * in_f, out_f * in_f // 64
    meta = functools.partial(torch.empty, device="meta")
    return NF4Weight(meta((numel + 1) // 2, dtype=torch.uint8), meta(blocks, dtype=torch.uint8),
                     torch.Size((out_f, in_f)), torch.bfloat16, 64, meta(-(-blocks // 256)),
                     meta((), dtype=torch.float32), meta(256), meta(blocks))


def _shapes():
    h, i, kv = QWEN7B["hidden"], QWEN7B["intermediate"], QWEN7B["kv_heads"] * QWEN7B["head_dim"]
    return {"q_proj": (h, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, h), "gate_proj": (i, h),
            "up_proj": (i, h), "down_proj": (h, i)}


def drive(micro_batches: int, seed: int) -> None:
    """A 7B self-play step's launches: `micro_batches` training micro-batches of 1k-16k tokens
    (forward and backward of every projection, the no-grad scoring forward, token_logprobs forward
    and backward), then decode waves of 1-256 rows (NF4 decode product, decode attention)."""
    from abs_fast.model.attention import _decode_triton
    from abs_fast.ops.logprobs import TokenLogprobsFunction
    from abs_fast.ops.lora import LoRALinearFunction, _nf4_decode
    from abs_fast.ops.routing import AdapterRouting

    gen = torch.Generator().manual_seed(seed)
    weights = {name: _nf4_meta(*shape) for name, shape in _shapes().items()}
    rank, adapters = 16, 2
    lora = {name: (torch.empty(adapters, rank, k, device="meta", requires_grad=True),
                   torch.empty(adapters, n, rank, device="meta", requires_grad=True))
            for name, (n, k) in _shapes().items()}
    scaling = torch.empty(adapters, device="meta")
    head = torch.empty(QWEN7B["vocab"], QWEN7B["hidden"], device="meta", dtype=torch.bfloat16)
    for _ in range(micro_batches):
        tokens = int(torch.randint(1024, 16385, (1,), generator=gen))
        third = tokens // 3  # attacker, defender and base-only (reference) rows
        routing = AdapterRouting.from_ids([0] * third + [1] * third + [-1] * (tokens - 2 * third), adapters,
                                          device="meta")
        for name, weight in weights.items():
            a, b = lora[name]
            for grad in (False, True):  # the no-grad scoring forward, then the training forward + backward
                x = torch.empty(tokens, weight.shape[1], device="meta", dtype=torch.bfloat16, requires_grad=grad)
                with torch.set_grad_enabled(grad):
                    y = LoRALinearFunction.apply(x, weight, a, b, routing, scaling, None)
                    if grad:
                        y.backward(torch.empty_like(y))
        hidden = torch.empty(tokens, QWEN7B["hidden"], device="meta", dtype=torch.bfloat16, requires_grad=True)
        targets = torch.empty(tokens, device="meta", dtype=torch.int64)
        logprobs, _ = TokenLogprobsFunction.apply(hidden, head, targets, 1.0, 8192, True)
        logprobs.backward(torch.empty_like(logprobs))
    kv_rows, capacity = 256, 2048
    k_cache = torch.empty(kv_rows, QWEN7B["kv_heads"], capacity, QWEN7B["head_dim"], device="meta",
                          dtype=torch.bfloat16)
    with torch.no_grad():
        for rows in range(1, 257):
            routing = AdapterRouting.from_ids([r % 3 - 1 for r in range(rows)], adapters, device="meta")
            for name, weight in weights.items():
                a, b = lora[name]
                x = torch.empty(rows, weight.shape[1], device="meta", dtype=torch.bfloat16)
                _nf4_decode(x, weight, a.detach(), b.detach(), routing, scaling, None)
            q = torch.empty(rows, QWEN7B["heads"], QWEN7B["head_dim"], device="meta", dtype=torch.bfloat16)
            seq_lens = torch.empty(rows, device="meta", dtype=torch.int32)
            _decode_triton(q, k_cache, k_cache, seq_lens, None, QWEN7B["head_dim"] ** -0.5)


def main() -> None:
    micro_batches, seed = int(sys.argv[1]), int(sys.argv[2])
    arch = int(sys.argv[3]) if len(sys.argv) > 3 else 90
    census = Census()
    install(census, arch)
    drive(micro_batches, seed)
    per_kernel = Counter(key[0] for key in census.variants)
    print(json.dumps({"variants": len(census.variants), "per_kernel": dict(per_kernel),
                      "launches": census.launches}))


if __name__ == "__main__":
    main()
