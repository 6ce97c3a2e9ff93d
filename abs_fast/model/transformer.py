"""The decoder-only transformer of the Qwen2/Qwen2.5, Llama and Mistral families, in plain PyTorch.

Module and parameter names follow Hugging Face (`model.layers.0.self_attn.q_proj.weight`), so
checkpoints load by name and PEFT adapter keys line up. Every projection is a MultiLoRALinear:
each token picks its adapter (-1 = base) through one AdapterRouting per batch, so attacker,
defender and reference rows share a pass.

The forward works on flat tokens [T, hidden] and serves two kinds of batch (model/attention.py):
- PackedBatch: causal documents packed end to end (training, scoring, rollout prefill; the
  prefill writes each token's keys and values into a KVCache);
- DecodeBatch: one new token per row, attending to its row of the KVCache.
Both kinds are described once, where the batch is assembled, and passed down as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from abs_fast.model.attention import (
    DecodeBatch,
    KVCache,
    PackedBatch,
    decode_attention,
    packed_attention,
    packed_backend,
)
from abs_fast.model.lora import MultiLoRALinear
from abs_fast.ops.layers import layer_kernels, rms_norm, rotary, swiglu
from abs_fast.ops.routing import AdapterRouting

__all__ = ["TARGET_MODULES", "ArchConfig", "Transformer"]

TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SUPPORTED_MODEL_TYPES = ("qwen2", "llama", "mistral")


@dataclass(frozen=True)
class ArchConfig:
    """What the forward needs from a Hugging Face config, read and checked once."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    tie_word_embeddings: bool
    sliding_window: tuple[int | None, ...]  # per layer; None = full attention
    eos_token_ids: tuple[int, ...]
    eos_source: str = "config.json"  # where eos_token_ids came from (generation_config.json first)

    @classmethod
    def from_hf(cls, config, where: str = "config.json") -> ArchConfig:
        model_type = getattr(config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"{where}: model_type {model_type!r} is not supported "
                             f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
        hidden_act = getattr(config, "hidden_act", "silu")
        if hidden_act != "silu":
            raise ValueError(f"{where}: hidden_act {hidden_act!r} is not supported (expected 'silu')")
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        if heads % kv_heads:
            raise ValueError(f"{where}: num_attention_heads {heads} is not a multiple of "
                             f"num_key_value_heads {kv_heads}")
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        layers = config.num_hidden_layers
        window = getattr(config, "sliding_window", None)
        if model_type == "qwen2":
            layer_types = getattr(config, "layer_types", None) or ["full_attention"] * layers
            windows = tuple(window if t == "sliding_attention" else None for t in layer_types)
            qkv_bias, o_bias, mlp_bias = True, False, False
        elif model_type == "mistral":
            windows = (window,) * layers
            qkv_bias, o_bias, mlp_bias = False, False, False
        else:
            windows = (None,) * layers
            qkv_bias = o_bias = bool(getattr(config, "attention_bias", False))
            mlp_bias = bool(getattr(config, "mlp_bias", False))
        eos = getattr(config, "eos_token_id", None)
        eos_ids = tuple(eos) if isinstance(eos, list | tuple) else (() if eos is None else (int(eos),))
        return cls(model_type, config.vocab_size, config.hidden_size, config.intermediate_size, layers, heads,
                   kv_heads, head_dim, config.rms_norm_eps, qkv_bias, o_bias, mlp_bias,
                   bool(getattr(config, "tie_word_embeddings", False)), windows, eos_ids,
                   "config.json" if eos_ids else "")

    def kv_cache(self, rows: int, max_len: int, device: torch.device, dtype: torch.dtype) -> KVCache:
        return KVCache(self.num_layers, rows, self.num_kv_heads, max_len, self.head_dim, device, dtype)


def rotary_embedding(hf_config) -> nn.Module:
    """The family's own Hugging Face rotary module: every RoPE variant (default, llama3, yarn, ...)
    is then computed exactly as transformers computes it."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    from transformers.models.mistral.modeling_mistral import MistralRotaryEmbedding
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

    cls = {"qwen2": Qwen2RotaryEmbedding, "llama": LlamaRotaryEmbedding, "mistral": MistralRotaryEmbedding}
    return cls[hf_config.model_type](hf_config)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype), requires_grad=False)
        self.kernels = "torch"  # set by Transformer.select_kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, self.kernels)


def _project(layer: MultiLoRALinear, x: torch.Tensor, routing: AdapterRouting | None) -> torch.Tensor:
    """A layer outside target_modules holds no adapters: every token takes its base (as in PEFT)."""
    return layer(x, routing if layer.lora_A else None)


class Attention(nn.Module):
    def __init__(self, config: ArchConfig, layer: int, device=None, dtype=None):
        super().__init__()
        h, d = config.hidden_size, config.head_dim
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, d
        self.window = config.sliding_window[layer]
        self.q_proj = MultiLoRALinear(h, config.num_heads * d, config.qkv_bias, device, dtype)
        self.k_proj = MultiLoRALinear(h, config.num_kv_heads * d, config.qkv_bias, device, dtype)
        self.v_proj = MultiLoRALinear(h, config.num_kv_heads * d, config.qkv_bias, device, dtype)
        self.o_proj = MultiLoRALinear(config.num_heads * d, h, config.o_bias, device, dtype)
        self.kernels, self.attention = "torch", "sdpa"  # set by Transformer.select_kernels
        self.deterministic = True  # the attention backward sums in a fixed order (Transformer.select_kernels)

    def forward(self, x, routing, cos, sin, batch: PackedBatch | DecodeBatch):
        T = x.shape[0]
        q = _project(self.q_proj, x, routing).view(T, self.num_heads, self.head_dim)
        k = _project(self.k_proj, x, routing).view(T, self.num_kv_heads, self.head_dim)
        v = _project(self.v_proj, x, routing).view(T, self.num_kv_heads, self.head_dim)
        q, k = rotary(q, k, cos, sin, self.kernels)
        if isinstance(batch, DecodeBatch):
            ck, cv = batch.cache.k[self.layer], batch.cache.v[self.layer]
            rows = torch.arange(T, device=x.device)
            position = (batch.seq_lens - 1).to(torch.int64)
            ck[rows, :, position] = k.to(ck.dtype)
            cv[rows, :, position] = v.to(cv.dtype)
            out = decode_attention(q, ck, cv, batch, self.window)
        else:
            write = batch.cache_write
            if write is not None:
                ck, cv = write.cache.k[self.layer], write.cache.v[self.layer]
                ck[write.slots, :, write.positions] = k.to(ck.dtype)
                cv[write.slots, :, write.positions] = v.to(cv.dtype)
            out = packed_attention(q, k, v, batch.documents, self.window, self.attention, self.deterministic)
        return _project(self.o_proj, out.reshape(T, -1), routing)


class _Recompute:
    """Saved-tensor hooks for one decoder layer: a registered tensor (a norm's output, SwiGLU's
    output) is not kept where a later op saves it for backward (the projections keep their input for
    the LoRA A gradient); it is recomputed, bit for bit, from what its own op keeps anyway (the norm's
    input; the gate and up projections). Saves 2 x hidden + intermediate values per token per layer."""

    _MARK = object()

    def __init__(self):
        # storage address -> (the registered tensor's storage offset, recipe). No reference to the
        # tensor itself: autograd keeps this object (its unpack hook) until backward. A registered
        # tensor lives while the hooks are active (the layer's forward holds it), so its address
        # cannot be reused by another tensor meanwhile.
        self.recipes: dict[int, tuple[int, object]] = {}

    def register(self, tensor: torch.Tensor, recipe) -> torch.Tensor:
        self.recipes[tensor.untyped_storage().data_ptr()] = (tensor.storage_offset(), recipe)
        return tensor

    def pack(self, t: torch.Tensor):
        entry = self.recipes.get(t.untyped_storage().data_ptr())
        if entry is None:
            return t
        base_offset, recipe = entry
        return (self._MARK, recipe, t.shape, t.stride(), t.storage_offset() - base_offset)

    def unpack(self, packed):
        if not (isinstance(packed, tuple) and packed and packed[0] is self._MARK):
            return packed
        _, recipe, shape, stride, offset = packed
        with torch.no_grad():
            full = recipe()
        return full.as_strided(shape, stride, full.storage_offset() + offset)


class MLP(nn.Module):
    def __init__(self, config: ArchConfig, device=None, dtype=None):
        super().__init__()
        h, inter, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = MultiLoRALinear(h, inter, bias, device, dtype)
        self.up_proj = MultiLoRALinear(h, inter, bias, device, dtype)
        self.down_proj = MultiLoRALinear(inter, h, bias, device, dtype)
        self.kernels = "torch"  # set by Transformer.select_kernels

    def forward(self, x, routing, recompute: _Recompute | None = None):
        gate, up = _project(self.gate_proj, x, routing), _project(self.up_proj, x, routing)
        hidden = swiglu(gate, up, self.kernels)
        if recompute is not None:
            recompute.register(hidden, lambda: swiglu(gate, up, self.kernels))
        return _project(self.down_proj, hidden, routing)


class DecoderLayer(nn.Module):
    def __init__(self, config: ArchConfig, layer: int, device=None, dtype=None):
        super().__init__()
        self.self_attn = Attention(config, layer, device, dtype)
        self.mlp = MLP(config, device, dtype)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, device, dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, device, dtype)

    def forward(self, x, routing, cos, sin, batch, recompute: bool = False):
        """recompute: drop the norm and SwiGLU outputs from what backward keeps (see _Recompute)."""
        if not recompute:
            return self._forward(x, routing, cos, sin, batch, None)
        keep = _Recompute()
        with torch.autograd.graph.saved_tensors_hooks(keep.pack, keep.unpack):
            return self._forward(x, routing, cos, sin, batch, keep)

    def _forward(self, x, routing, cos, sin, batch, keep: _Recompute | None):
        normed = self._norm(self.input_layernorm, x, keep)
        x = x + self.self_attn(normed, routing, cos, sin, batch)
        return x + self.mlp(self._norm(self.post_attention_layernorm, x, keep), routing, keep)

    @staticmethod
    def _norm(norm: RMSNorm, x: torch.Tensor, keep: _Recompute | None) -> torch.Tensor:
        normed = norm(x)
        return normed if keep is None else keep.register(normed, lambda: norm(x))


class DecoderModel(nn.Module):
    """Hugging Face's `model.` prefix: embeddings, layers, final norm."""

    def __init__(self, config: ArchConfig, device=None, dtype=None):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, device=device, dtype=dtype)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(DecoderLayer(config, i, device, dtype) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, device, dtype)


class Transformer(nn.Module):
    """The whole causal LM. `forward` returns the final normed hidden states [T, hidden];
    `lm_head_weight` turns them into logits (or token log-probs through abs_fast.ops.token_logprobs)."""

    def __init__(self, config: ArchConfig, hf_config, device=None, dtype=None):
        super().__init__()
        self.config = config
        self.model = DecoderModel(config, device, dtype)
        if config.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False, device=device, dtype=dtype)
            self.lm_head.weight.requires_grad_(False)
        self.rotary = rotary_embedding(hf_config)
        self.gradient_checkpointing = False
        self.kernels = {"layers": "torch", "attention": "sdpa"}

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def target_layers(self) -> dict[str, MultiLoRALinear]:
        return {name: m for name, m in self.named_modules() if isinstance(m, MultiLoRALinear)}

    def select_kernels(self, deterministic: bool = True) -> dict[str, str]:
        """Decide once (after the weights are on their device) which RMSNorm/SwiGLU/RoPE and which
        packed attention run, and whether the attention backward is deterministic; returns the choice
        (shown by `abs-fast info` and the engine)."""
        weight = self.model.embed_tokens.weight
        self.kernels = {"layers": layer_kernels(weight.device),
                        "attention": packed_backend(weight.device, weight.dtype)}
        for module in self.modules():
            if isinstance(module, RMSNorm | MLP):
                module.kernels = self.kernels["layers"]
            elif isinstance(module, Attention):
                module.kernels, module.attention = self.kernels["layers"], self.kernels["attention"]
                module.deterministic = deterministic
        return self.kernels

    def forward(self, input_ids: torch.Tensor, routing: AdapterRouting | None, position_ids: torch.Tensor,
                batch: PackedBatch | DecodeBatch) -> torch.Tensor:
        """input_ids, position_ids [T]; routing: the batch's adapter ids (None = base for all);
        batch: how the tokens attend (documents, or one new token per cache row)."""
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.rotary(x[None], position_ids[None])
        cos, sin = cos[0], sin[0]
        training = torch.is_grad_enabled()
        for layer in self.model.layers:
            if self.gradient_checkpointing and training:  # the whole layer is recomputed in backward
                x = checkpoint(layer, x, routing, cos, sin, batch, use_reentrant=False)
            else:
                x = layer(x, routing, cos, sin, batch, recompute=training)
        return self.model.norm(x)
