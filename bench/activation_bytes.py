"""Activation bytes a training forward keeps for backward, per token per decoder layer.

One decoder layer at a preset's exact shapes (random weights, two rank-16 adapters plus reference
rows, packed documents), forward under the saved-tensor hooks the layer itself installs: every
tensor kept for backward is counted once per storage (the layer's input, owned by the layer before
it, and the model's own weights are left out). Runs on CPU (bf16) or a GPU.

    python bench/activation_bytes.py [--preset qwen2.5-7b] [--tokens 512] [--device cpu]
"""

from __future__ import annotations

import argparse

import torch

import abs_fast.model.transformer as transformer
from abs_fast.model.attention import Documents, PackedBatch
from abs_fast.model.tiny import qwen2_config
from abs_fast.model.transformer import ArchConfig, Transformer
from abs_fast.ops.routing import AdapterRouting


def saved_bytes_per_token_layer(preset: str = "qwen2.5-7b", tokens: int = 512, device: str = "cpu",
                                dtype: torch.dtype = torch.bfloat16, documents: int = 2) -> float:
    """Bytes of distinct storages one decoder layer keeps for backward, divided by the tokens."""
    config = qwen2_config(preset, num_hidden_layers=1, vocab_size=1024, bos_token_id=0, eos_token_id=1)
    model = Transformer(ArchConfig.from_hf(config), config, device=device, dtype=dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02, generator=gen)
    for layer in model.target_layers().values():
        for name in ("attacker", "defender"):
            layer.add_adapter(name, 16, 32)
    model.select_kernels()
    lengths = [tokens // documents] * (documents - 1) + [tokens - (tokens // documents) * (documents - 1)]
    positions = torch.cat([torch.arange(n) for n in lengths]).to(device)
    routing = AdapterRouting.from_ids(torch.randint(-1, 2, (tokens,), generator=gen, device=device), 2)
    batch = PackedBatch(Documents.from_lengths(lengths, device))
    x = torch.randn(tokens, config.hidden_size, generator=gen, device=device, dtype=dtype, requires_grad=True)
    cos, sin = (t[0] for t in model.rotary(x[None], positions[None]))
    weights = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    kept: dict[int, int] = {}
    original = transformer._Recompute.pack

    def count(self, t):
        packed = original(self, t)
        storage = t.untyped_storage()
        if packed is t and not (t.is_leaf and t.requires_grad) and storage.data_ptr() not in weights:
            kept[storage.data_ptr()] = storage.nbytes()
        return packed

    transformer._Recompute.pack = count
    try:
        out = model.model.layers[0](x, routing, cos, sin, batch, recompute=True)
    finally:
        transformer._Recompute.pack = original
    out.float().sum().backward()  # the graph was whole
    return sum(kept.values()) / tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="qwen2.5-7b")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    value = saved_bytes_per_token_layer(args.preset, args.tokens, args.device)
    print(f"{args.preset} on {args.device}, {args.tokens} tokens: {value / 1024:.1f} KiB kept per token per layer")


if __name__ == "__main__":
    main()
