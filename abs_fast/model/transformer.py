"""The decoder-only transformer of the Qwen2/Qwen2.5, Llama and Mistral families, in plain PyTorch.

Module and parameter names follow Hugging Face (`model.layers.0.self_attn.q_proj.weight`), so
checkpoints load by name and PEFT adapter keys line up. Every projection is a MultiLoRALinear:
each token picks its adapter (-1 = base), so attacker, defender and reference rows share a pass.

One forward serves three callers:
- training / scoring: padded batches or packed rows (several sequences per row, positions
  restarting at 0), a document-causal mask built from `position_ids`;
- rollout prefill: the same, writing keys and values into a KVCache;
- rollout decode: one new token per row, attending to its row of the KVCache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from abs_fast.model.lora import MultiLoRALinear

__all__ = ["TARGET_MODULES", "ArchConfig", "KVCache", "Transformer", "document_ids"]

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
                   bool(getattr(config, "tie_word_embeddings", False)), windows, eos_ids)


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, S, D]; cos/sin [B, S, D]."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + _rotate_half(x) * sin


def document_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """[B, S] -> [B, S]: a new document starts wherever a position restarts at 0 (packed rows)."""
    return torch.cumsum((position_ids == 0).to(torch.int32), dim=-1)


class KVCache:
    """Preallocated keys and values: [layers, rows, kv_heads, max_len, head_dim] each.

    Row r of the cache belongs to one sequence at a time; its first `length` positions are valid.
    The engine keeps live rows in slots 0..n-1 (see `move_row`), so decode reads a slice, not a gather.
    """

    def __init__(self, config: ArchConfig, rows: int, max_len: int, device: torch.device, dtype: torch.dtype):
        shape = (config.num_layers, rows, config.num_kv_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.rows, self.max_len = rows, max_len

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def move_row(self, src: int, dst: int, length: int) -> None:
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]


@dataclass
class CacheWrite:
    """Where a forward writes its keys/values: rows `slots` [B] of `cache`, at `position_ids`.
    `decode`: each row attends to its cache row up to and including its new position."""

    cache: KVCache
    slots: torch.Tensor
    decode: bool
    leading_slots: bool = False  # slots are 0..B-1: decode reads a slice of the cache, not a gather


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

    def forward(self, x, ids, cos, sin, position_ids, mask, cache: CacheWrite | None):
        B, S, _ = x.shape
        q = _project(self.q_proj, x, ids).view(B, S, self.num_heads, self.head_dim).transpose(1, 2)
        k = _project(self.k_proj, x, ids).view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = _project(self.v_proj, x, ids).view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            ck, cv = cache.cache.k[self.layer], cache.cache.v[self.layer]
            rows = cache.slots[:, None]
            ck[rows, :, position_ids] = k.transpose(1, 2).to(ck.dtype)  # [B, S, kv_heads, D]
            cv[rows, :, position_ids] = v.transpose(1, 2).to(cv.dtype)
            if cache.decode:  # attend to the row's cache prefix (the mask bounds it)
                span = mask.shape[-1]
                if cache.leading_slots:
                    k, v = ck[: len(cache.slots), :, :span], cv[: len(cache.slots), :, :span]
                else:
                    k, v = ck[cache.slots, :, :span], cv[cache.slots, :, :span]
                k, v = k.to(q.dtype), v.to(q.dtype)
        groups = self.num_heads // self.num_kv_heads
        if groups > 1:
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return _project(self.o_proj, out.transpose(1, 2).reshape(B, S, -1), ids)


def _project(layer: MultiLoRALinear, x: torch.Tensor, ids: torch.Tensor | None) -> torch.Tensor:
    """A layer outside target_modules holds no adapters: every token takes its base (as in PEFT)."""
    return layer(x, ids if layer.lora_A else None)


class MLP(nn.Module):
    def __init__(self, config: ArchConfig, device=None, dtype=None):
        super().__init__()
        h, inter, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = MultiLoRALinear(h, inter, bias, device, dtype)
        self.up_proj = MultiLoRALinear(h, inter, bias, device, dtype)
        self.down_proj = MultiLoRALinear(inter, h, bias, device, dtype)

    def forward(self, x, ids):
        hidden = F.silu(_project(self.gate_proj, x, ids)) * _project(self.up_proj, x, ids)
        return _project(self.down_proj, hidden, ids)


class DecoderLayer(nn.Module):
    def __init__(self, config: ArchConfig, layer: int, device=None, dtype=None):
        super().__init__()
        self.self_attn = Attention(config, layer, device, dtype)
        self.mlp = MLP(config, device, dtype)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, device, dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, device, dtype)

    def forward(self, x, ids, cos, sin, position_ids, masks, cache):
        mask = masks[self.self_attn.window]
        x = x + self.self_attn(self.input_layernorm(x), ids, cos, sin, position_ids, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x), ids)


class DecoderModel(nn.Module):
    """Hugging Face's `model.` prefix: embeddings, layers, final norm."""

    def __init__(self, config: ArchConfig, device=None, dtype=None):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, device=device, dtype=dtype)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(DecoderLayer(config, i, device, dtype) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, device, dtype)


class Transformer(nn.Module):
    """The whole causal LM. `forward` returns the final normed hidden states [B, S, hidden];
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

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def target_layers(self) -> dict[str, MultiLoRALinear]:
        return {name: m for name, m in self.named_modules() if isinstance(m, MultiLoRALinear)}

    def forward(self, input_ids: torch.Tensor, adapter_ids: torch.Tensor | None, position_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None, cache: CacheWrite | None = None,
                key_length: int | None = None) -> torch.Tensor:
        """input_ids, position_ids [B, S]; adapter_ids [B, S] (-1 = base) or None (base for all);
        attention_mask [B, S] (1 = real token) or None. With a decode cache, `key_length` is how many
        cache positions to attend over (max position + 1)."""
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.rotary(x, position_ids)
        ids = None if adapter_ids is None else adapter_ids.reshape(-1)
        masks = self._masks(position_ids, attention_mask, cache, key_length)
        for layer in self.model.layers:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(layer, x, ids, cos, sin, position_ids, masks, cache, use_reentrant=False)
            else:
                x = layer(x, ids, cos, sin, position_ids, masks, cache)
        return self.model.norm(x)

    def _masks(self, position_ids, attention_mask, cache, key_length) -> dict[int | None, torch.Tensor]:
        """One boolean mask [B, 1, S, keys] per distinct sliding window (True = may attend)."""
        S = position_ids.shape[1]
        if cache is not None and cache.decode:
            keys = torch.arange(key_length, device=position_ids.device)
            query = position_ids[:, :, None]
            allowed = keys[None, None, :] <= query
            out = {}
            for window in set(self.config.sliding_window):
                m = allowed if window is None else allowed & (query - keys[None, None, :] < window)
                out[window] = m[:, None]
            return out
        doc = document_ids(position_ids)
        same_doc = doc[:, :, None] == doc[:, None, :]
        idx = torch.arange(S, device=position_ids.device)
        allowed = same_doc & (idx[None, :, None] >= idx[None, None, :])
        if attention_mask is not None:
            allowed = allowed & attention_mask.bool()[:, None, :]
        allowed = allowed | torch.eye(S, dtype=torch.bool, device=allowed.device)  # padding rows see themselves
        out = {}
        for window in set(self.config.sliding_window):
            m = allowed
            if window is not None:
                distance = position_ids[:, :, None] - position_ids[:, None, :]
                m = m & (distance < window)
            out[window] = m[:, None]
        return out
