"""The policy: a frozen base causal LM (NF4 or dense) with named LoRA adapters, loaded from a local
directory of safetensors files or built from a preset with seeded random weights.

Loading streams tensor by tensor: each target linear is quantised as soon as its weight is read,
so a full-precision copy of the model never exists in memory.
"""

from __future__ import annotations

import dataclasses
import json
import math
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from abs_fast.io import open_safetensors, read_text, shorten
from abs_fast.model.adapters import CONFIG_NAME, load_peft_adapter, save_peft_adapter
from abs_fast.model.attention import Documents, PackedBatch
from abs_fast.model.lora import MultiLoRALinear
from abs_fast.model.tiny import PRESETS, qwen2_config
from abs_fast.model.transformer import TARGET_MODULES, ArchConfig, Transformer
from abs_fast.ops.routing import AdapterRouting
from abs_fast.quant.nf4 import NESTED_BLOCKSIZE, NF4_CODE, NF4Weight

__all__ = ["Policy", "load_policy", "resolve_target_modules"]

QUANTIZE_CHOICES = ("nf4", None)
_IGNORED_KEYS = ("rotary_emb.inv_freq",)


# ---------------------------------------------------------------------------------------------
# Where the weights come from
# ---------------------------------------------------------------------------------------------


_BNB_STATE = ".quant_state.bitsandbytes__"  # + quant type: the JSON quant state bitsandbytes saves per weight
_BNB_PARTS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")


def _nf4_from_bnb(name: str, tensors: dict[str, torch.Tensor], where: str) -> NF4Weight:
    """The NF4Weight that a transformers + bitsandbytes 4-bit checkpoint stores as `name` (packed
    uint8 codes) with its `.absmax`, `.quant_map`, `.nested_*` and JSON quant-state tensors."""
    (state_key,) = [k for k in tensors if _BNB_STATE in k]
    quant_type = state_key.rsplit("__", 1)[-1]
    if quant_type != "nf4":
        raise ValueError(f"{where}: {name!r} is bitsandbytes {quant_type!r}; only NF4 4-bit checkpoints load "
                         "(re-quantise with bnb_4bit_quant_type='nf4', or give the unquantised checkpoint)")
    try:
        state = json.loads(bytes(tensors[state_key].to(torch.uint8).tolist()).decode("utf-8"))
        shape, blocksize = torch.Size(state["shape"]), int(state["blocksize"])
        dtype = getattr(torch, str(state.get("dtype", "float32")).removeprefix("torch."))
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as err:
        raise ValueError(f"{where}: tensor {state_key!r} is not a readable bitsandbytes quant state ({err})") from None
    def part(key: str) -> torch.Tensor:
        if f"{name}.{key}" not in tensors:
            raise ValueError(f"{where}: {name!r} is bitsandbytes NF4 but has no {name}.{key} tensor")
        return tensors[f"{name}.{key}"]
    if not torch.equal(part("quant_map").float(), NF4_CODE):
        raise ValueError(f"{where}: {name}.quant_map is not the NF4 code table")
    packed = tensors[name].contiguous().view(torch.uint8).reshape(-1)
    numel = math.prod(shape)
    blocks = -(-numel // blocksize)
    if packed.numel() != (numel + 1) // 2 or blocksize < 2 or blocksize & (blocksize - 1):
        raise ValueError(f"{where}: {name!r} holds {packed.numel()} bytes with blocksize {blocksize}; an NF4 weight "
                         f"of shape {tuple(shape)} needs {(numel + 1) // 2} bytes and a power-of-two blocksize")
    absmax = part("absmax")
    if absmax.numel() != blocks:
        raise ValueError(f"{where}: {name}.absmax has {absmax.numel()} entries, {tuple(shape)} in blocks of "
                         f"{blocksize} needs {blocks}")
    if "nested_blocksize" not in state:
        return NF4Weight(packed, absmax.float().reshape(-1), shape, dtype, blocksize)
    nested_absmax, nested_code = part("nested_absmax").float().reshape(-1), part("nested_quant_map").float()
    if int(state["nested_blocksize"]) != NESTED_BLOCKSIZE or nested_code.numel() != 256 or \
            nested_absmax.numel() != -(-blocks // NESTED_BLOCKSIZE) or absmax.dtype != torch.uint8:
        raise ValueError(f"{where}: {name!r} has nested statistics abs-fast cannot read (nested blocksize "
                         f"{state['nested_blocksize']}, expected {NESTED_BLOCKSIZE} with uint8 absmax codes)")
    offset = torch.tensor(float(state["nested_offset"]), dtype=torch.float32)
    return NF4Weight(packed, absmax.reshape(-1), shape, dtype, blocksize, nested_absmax, offset, nested_code)


class _SafetensorsSource:
    """Every tensor of a local checkpoint directory (one file, or shards with an index). A weight
    that bitsandbytes saved in 4 bits comes out as one NF4Weight built from its parts."""

    def __init__(self, directory: Path):
        index = directory / "model.safetensors.index.json"
        self.files: dict[str, Path] = {}  # tensor name -> file
        if index.is_file():
            try:
                weight_map = json.loads(read_text(index, "weight index"))["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ValueError(f"{index}: expected JSON with a 'weight_map' object ({err})") from None
            for name, file in weight_map.items():
                path = directory / file
                if not path.is_file():
                    raise FileNotFoundError(f"{index}: tensor {name!r} is in {file}, which does not exist")
                self.files[name] = path
        else:
            shards = sorted(directory.glob("*.safetensors"))
            if not shards:
                pickles = [p.name for p in directory.glob("*.bin")] + [p.name for p in directory.glob("*.pt")]
                hint = f" (found {', '.join(pickles)}: pickle checkpoints are not loaded; convert them to " \
                       "safetensors)" if pickles else ""
                raise FileNotFoundError(f"{directory}: no *.safetensors weight files{hint}")
            for shard in shards:
                with open_safetensors(shard, "model weights") as f:
                    for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                        if name in self.files:
                            raise ValueError(f"{shard}: tensor {name!r} also appears in {self.files[name]}")
                        self.files[name] = shard

        # bitsandbytes 4-bit weights: the packed codes under the weight's own name, its parts beside it
        self.parts: dict[str, list[str]] = {name.split(_BNB_STATE)[0]: [] for name in self.files if _BNB_STATE in name}
        for name in self.files:
            weight, _, suffix = name.partition(_BNB_STATE) if _BNB_STATE in name else name.rpartition(".")
            if weight in self.parts and (_BNB_STATE in name or suffix in _BNB_PARTS):
                self.parts[weight].append(name)
        self.part_names = {name for names in self.parts.values() for name in names}

    def names(self) -> list[str]:
        return [name for name in self.files if name not in self.part_names]

    def where(self, name: str) -> str:
        return str(self.files[name])

    def _read(self, names: list[str]) -> dict[str, torch.Tensor]:
        out = {}
        for name in names:
            with open_safetensors(self.files[name], "model weights") as f:
                out[name] = f.get_tensor(name)
        return out

    def tensors(self) -> Iterator[tuple[str, torch.Tensor | NF4Weight]]:
        by_file: dict[Path, list[str]] = {}
        for name in self.names():
            by_file.setdefault(self.files[name], []).append(name)
        for file, names in by_file.items():
            with open_safetensors(file, "model weights") as f:
                for name in names:
                    if name in self.parts:
                        parts = self._read(self.parts[name])
                        yield name, _nf4_from_bnb(name, {name: f.get_tensor(name), **parts}, str(file))
                    else:
                        yield name, f.get_tensor(name)


class _RandomSource:
    """Seeded random weights for a preset (HF's initialisation: normal(0, 0.02), zero biases, unit
    norms), drawn per tensor so the draw of one does not depend on the others. On a GPU they are
    drawn there (a 7B preset takes about a minute to draw on one CPU thread); a GPU's generator gives
    other numbers than the CPU's for the same seed, so a preset's weights are the same for one seed
    on one kind of device."""

    def __init__(self, expected: dict[str, torch.Size], seed: int, device: torch.device, std: float = 0.02):
        self.shapes, self.seed, self.std = expected, seed, std
        self.device = device if device.type == "cuda" else torch.device("cpu")

    def names(self) -> list[str]:
        return list(self.shapes)

    def where(self, name: str) -> str:
        return f"random weights (seed {self.seed})"

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, shape in self.shapes.items():
            if name.endswith("norm.weight"):
                yield name, torch.ones(shape, device=self.device)
            elif name.endswith(".bias"):
                yield name, torch.zeros(shape, device=self.device)
            else:
                gen = torch.Generator(self.device).manual_seed(self.seed * 1_000_003 + zlib.crc32(name.encode()))
                yield name, torch.randn(shape, generator=gen, device=self.device).mul_(self.std)


def _read_hf_config(path_or_preset: str | Path):
    """(transformers config, weight source factory, display name) for a directory or preset."""
    text = str(path_or_preset)
    path = Path(text).expanduser()
    if not path.exists() and text in PRESETS:
        return qwen2_config(text), None, text
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such directory (and not a preset: {', '.join(sorted(PRESETS))})")
    if not path.is_dir():
        raise NotADirectoryError(f"{path}: expected a model directory holding config.json and *.safetensors")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file}: missing (a model directory needs config.json and *.safetensors)")
    try:
        raw = json.loads(read_text(config_file, "model config"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_file}: line {err.lineno}: not valid JSON ({err.msg})") from None
    model_type = raw.get("model_type")
    quantization = raw.get("quantization_config") or {}
    method = quantization.get("quant_method")
    if method is not None and (method != "bitsandbytes" or not quantization.get("load_in_4bit", False)):
        kind = "8-bit bitsandbytes" if method == "bitsandbytes" else repr(method)
        raise ValueError(f"{config_file}: quantization_config is {kind}; abs-fast reads unquantised checkpoints and "
                         "bitsandbytes 4-bit NF4 ones (load_in_4bit, bnb_4bit_quant_type='nf4')")
    for field in ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
                  "intermediate_size"):
        if field not in raw:
            raise ValueError(f"{config_file}: field {field!r} is missing")
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except Exception as err:  # transformers raises many types; name the file either way
        raise ValueError(f"{config_file}: transformers cannot read it as a {model_type!r} config: {err}") from err
    return config, path, str(path)


def generation_eos_ids(directory: Path | None) -> tuple[int, ...]:
    """Every eos id of the checkpoint's generation_config.json (Llama-3 style lists several end-of-turn
    tokens there, config.json often only one); () without the file or the field."""
    if directory is None or not (directory / "generation_config.json").exists():
        return ()
    path = directory / "generation_config.json"
    try:
        raw = json.loads(read_text(path, "generation config"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: line {err.lineno}: not valid JSON ({err.msg})") from None
    eos = raw.get("eos_token_id") if isinstance(raw, dict) else None
    ids = eos if isinstance(eos, list) else ([] if eos is None else [eos])
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise ValueError(f"{path}: eos_token_id must be a token id or a list of them, got {shorten(eos)}")
    return tuple(dict.fromkeys(ids))


def with_generation_eos(arch: ArchConfig, directory: Path | None) -> ArchConfig:
    """arch with the stop ids a checkpoint generates with: generation_config.json's eos ids when it
    lists any, else config.json's (the tokenizer's eos is the last resort, in stop_token_ids)."""
    ids = generation_eos_ids(directory)
    return dataclasses.replace(arch, eos_token_ids=ids, eos_source="generation_config.json") if ids else arch


def read_arch_config(path_or_preset: str | Path) -> tuple[object, Path | None, ArchConfig]:
    """(transformers config, directory or None for a preset, ArchConfig with its stop ids) without
    reading any weights."""
    hf_config, directory, source_name = _read_hf_config(path_or_preset)
    where = f"{directory / 'config.json'}" if directory is not None else f"preset {source_name!r}"
    return hf_config, directory, with_generation_eos(ArchConfig.from_hf(hf_config, where), directory)


def resolve_target_modules(target_modules: str | Sequence[str]) -> tuple[str, ...]:
    """The module names a target_modules setting names ("all-linear" = every projection)."""
    if target_modules == "all-linear":
        return TARGET_MODULES
    names = (target_modules,) if isinstance(target_modules, str) else tuple(target_modules)
    unknown = [n for n in names if n not in TARGET_MODULES]
    if unknown or not names:
        raise ValueError(f"target_modules {unknown or names!r} unknown; choose 'all-linear' or names from "
                         f"{', '.join(TARGET_MODULES)}")
    return names


# ---------------------------------------------------------------------------------------------
# The policy
# ---------------------------------------------------------------------------------------------


class Policy(nn.Module):
    """A frozen base with named adapters. Adapter ids: index into `adapter_names`; -1 = the base."""

    def __init__(self, model: Transformer, hf_config, source: str, target_modules: tuple[str, ...], quantize):
        super().__init__()
        self.model = model
        self.hf_config = hf_config
        self.source = source
        self.target_modules = target_modules
        self.quantize = quantize

    # --- adapters -----------------------------------------------------------------------

    def target_layers(self) -> dict[str, MultiLoRALinear]:
        """Module path (as in Hugging Face / PEFT) -> layer, for the layers that carry adapters."""
        return {path: layer for path, layer in self.model.target_layers().items()
                if path.rsplit(".", 1)[-1] in self.target_modules}

    @property
    def adapter_names(self) -> list[str]:
        layers = self.target_layers()
        return next(iter(layers.values())).adapter_names if layers else []

    @property
    def config(self) -> ArchConfig:
        return self.model.config

    @property
    def device(self) -> torch.device:
        return self.model.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.model.embed_tokens.weight.dtype

    def adapter_id(self, name: str | None) -> int:
        """The id of adapter `name`; None or "base" -> -1."""
        if name is None or name == "base":
            return -1
        names = self.adapter_names
        if name not in names:
            raise KeyError(f"no adapter named {name!r}; this policy has {names} (None or 'base' = no adapter)")
        return names.index(name)

    def add_adapter(self, name: str, rank: int = 16, alpha: float = 32.0, seed: int = 0) -> None:
        """A new PEFT-initialised adapter on every target layer (B = 0: it starts as the base)."""
        if name == "base":
            raise ValueError("'base' names the adapter-free model; choose another adapter name")
        gen = torch.Generator(device=self.device).manual_seed(seed)
        for layer in self.target_layers().values():
            layer.add_adapter(name, rank, alpha, generator=gen)

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        self.adapter_id(name)
        params = []
        for layer in self.target_layers().values():
            params += [layer.lora_A[name], layer.lora_B[name]]
        return params

    def save_adapters(self, directory: str | Path, names: Sequence[str] | None = None,
                      base_info: dict | None = None) -> list[Path]:
        """Write each adapter to directory/<name>/ in PEFT format (each directory replaced atomically),
        with `base_info` (what it was trained on: model, tokenizer, chat template, ...) beside it."""
        layers = self.target_layers()
        out = []
        for name in names or self.adapter_names:
            self.adapter_id(name)
            out.append(save_peft_adapter(layers, name, Path(directory) / name, self.source, base_info))
        return out

    def load_adapters(self, directory: str | Path, names: Sequence[str] | None = None) -> list[str]:
        """Read adapters back: every directory/<name>/ holding an adapter_config.json (or just `names`).
        A directory that is itself one PEFT adapter loads under its own name (PEFT's single-adapter
        layout). New names become new adapters; existing ones are overwritten in place."""
        directory = Path(directory)
        if names is None:
            if (directory / CONFIG_NAME).is_file():
                found = {directory.name: directory}
            else:
                found = {p.name: p for p in sorted(directory.iterdir()) if (p / CONFIG_NAME).is_file()} \
                    if directory.is_dir() else {}
            if not found:
                raise FileNotFoundError(f"{directory}: no adapters (expected {CONFIG_NAME} in it or in its "
                                        "subdirectories)")
        else:
            found = {name: directory / name for name in names}
        for name, path in found.items():
            self.load_adapter(path, name)
        return list(found)

    def load_adapter(self, directory: str | Path, name: str) -> None:
        """Load the one PEFT adapter in `directory` as adapter `name` (new, or overwritten in place)."""
        if not name.isidentifier() or name == "base":
            raise ValueError(f"{directory}: adapter name {name!r} must be a Python identifier other than 'base'")
        load_peft_adapter(self.target_layers(), directory, name)

    # --- forward --------------------------------------------------------------------------

    def gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each decoder layer in backward instead of keeping its activations."""
        self.model.gradient_checkpointing = enabled

    def routing(self, adapter_ids, shape: torch.Size) -> AdapterRouting | None:
        """The batch's AdapterRouting from per-sequence ([B], names or ints) or per-token ([B, S]) ids,
        range-checked once (None: the base for every token)."""
        if adapter_ids is None:
            return None
        B, S = shape
        n = len(self.adapter_names)
        if isinstance(adapter_ids, str | int):
            adapter_ids = [adapter_ids] * B
        if isinstance(adapter_ids, list | tuple):
            per_row = [self.adapter_id(a) if not isinstance(a, int) else a for a in adapter_ids]
            if len(per_row) != B:
                raise ValueError(f"adapter_ids has {len(per_row)} entries for a batch of {B} rows")
            return AdapterRouting.from_ids([a for a in per_row for _ in range(S)], n, device=self.device)
        ids = adapter_ids.to(device=self.device)
        if ids.dim() == 1:
            if ids.shape[0] != B:
                raise ValueError(f"adapter_ids has {ids.shape[0]} entries for a batch of {B} rows")
            ids = ids[:, None].expand(B, S)
        elif ids.shape != (B, S):
            raise ValueError(f"adapter_ids must be [B]={B} or [B, S]={B, S}, got {tuple(ids.shape)}")
        try:
            return AdapterRouting.from_ids(ids, n)
        except ValueError:
            raise ValueError(f"adapter_ids must lie in [-1, {n - 1}] ({n} adapters: {self.adapter_names})") from None

    def forward(self, input_ids: torch.Tensor, adapter_ids=None, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states [B, S, hidden].

        input_ids [B, S]. adapter_ids: None (base everywhere), one per row ([B] ints or names) or
        one per token ([B, S]); -1 = base. Packed rows: position_ids restart at 0 where each sequence
        starts, and attention never crosses a restart. Padded rows: attention_mask (1 = token; the
        padding at the start or the end of each row). The documents and the adapter routing are
        read here once for the whole forward."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, S], got {tuple(input_ids.shape)}")
        input_ids = input_ids.to(self.device)
        if attention_mask is not None:
            attention_mask = attention_mask.to(self.device)
        if position_ids is None:
            if attention_mask is None:
                position_ids = torch.arange(input_ids.shape[1], device=self.device).expand_as(input_ids)
            else:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        elif position_ids.shape != input_ids.shape:
            raise ValueError(f"position_ids {tuple(position_ids.shape)} must match input_ids {tuple(input_ids.shape)}")
        routing = self.routing(adapter_ids, input_ids.shape)
        batch = PackedBatch(Documents.from_positions(position_ids, attention_mask))
        hidden = self.model(input_ids.reshape(-1), routing, position_ids.reshape(-1).to(self.device), batch)
        return hidden.view(*input_ids.shape, -1)

    def logits(self, input_ids: torch.Tensor, adapter_ids=None, position_ids=None, attention_mask=None):
        """Logits [B, S, vocab] as fp32, from the head in the model's dtype: for tests and small
        batches (training uses token_logprobs)."""
        from abs_fast.model.scoring import head_logits

        return head_logits(self(input_ids, adapter_ids, position_ids, attention_mask), self.model.lm_head_weight)


def load_policy(path_or_preset: str | Path, quantize: str | None = "nf4",
                adapters: Sequence[str] = ("attacker", "defender"), rank: int = 16, alpha: float = 32,
                target_modules: str | Sequence[str] = "all-linear", device: torch.device | str | None = None,
                dtype: torch.dtype | None = None, seed: int = 0, blocksize: int = 64, double_quant: bool = True,
                progress: Callable[[int, int, str], None] | None = None, deterministic: bool = True) -> Policy:
    """Load a Qwen2/Qwen2.5, Llama or Mistral causal LM and give it adapters.

    path_or_preset: a local directory (config.json + *.safetensors, sharded or not; never a hub
    name) or a preset of abs_fast.model.PRESETS with seeded random weights. quantize: "nf4" stores
    every target-family linear in NF4 as it is read (the embeddings, norms and head stay in
    `dtype`); None keeps them dense. Defaults: the GPU when there is one, bf16 there and fp32 on CPU.
    A checkpoint saved by transformers from a bitsandbytes 4-bit NF4 model loads its codes as they
    are (no dequantise / requantise); with quantize=None they are dequantised. deterministic: the
    attention backward sums in a fixed order on GPU (FlashAttention without atomics).
    """
    if quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"quantize must be 'nf4' or None, got {quantize!r}")
    targets = resolve_target_modules(target_modules)
    hf_config, directory, source_name = _read_hf_config(path_or_preset)
    where = f"{directory / 'config.json'}" if directory is not None else f"preset {source_name!r}"
    arch = with_generation_eos(ArchConfig.from_hf(hf_config, where), directory)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)

    model = Transformer(arch, hf_config, device="meta", dtype=dtype)
    model.rotary.to(device)
    expected = {name: p.shape for name, p in model.named_parameters()}
    source = _SafetensorsSource(directory) if directory is not None else _RandomSource(expected, seed, device)
    modules = dict(model.named_modules())
    loaded: set[str] = set()
    total = len(expected)
    for name, tensor in source.tensors():
        if name not in expected:
            if (name == "lm_head.weight" and arch.tie_word_embeddings) or name.endswith(_IGNORED_KEYS):
                continue
            raise ValueError(f"{source.where(name)}: tensor {name!r} is not part of a {arch.model_type} model with "
                             "this config (a different architecture, or a checkpoint with extra heads?)")
        if tuple(tensor.shape) != tuple(expected[name]):
            raise ValueError(f"{source.where(name)}: tensor {name!r} has shape {tuple(tensor.shape)}, config.json "
                             f"implies {tuple(expected[name])}")
        module_name, _, field = name.rpartition(".")
        module = modules[module_name]
        nf4_target = isinstance(module, MultiLoRALinear) and field == "weight" and quantize == "nf4"
        if isinstance(tensor, NF4Weight) and nf4_target:  # pre-quantised: its codes are used as they are
            module.set_nf4_base_(dataclasses.replace(tensor, dtype=dtype).to(device))
        else:
            dense = tensor.dequantize(dtype) if isinstance(tensor, NF4Weight) else tensor
            setattr(module, field, nn.Parameter(dense.to(device=device, dtype=dtype), requires_grad=False))
            del dense
            if nf4_target:
                module.quantize_base_(blocksize, double_quant)
        del tensor
        loaded.add(name)
        if progress is not None:
            progress(len(loaded), total, name)
    missing = [name for name in expected if name not in loaded]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ValueError(f"{directory or source_name}: the checkpoint lacks {len(missing)} tensor(s) the config "
                         f"needs: {shown}")
    for layer in model.target_layers().values():  # scaling buffers were made on the meta device
        layer.scaling = torch.empty(0, dtype=torch.float32, device=device)

    model.select_kernels(deterministic)
    policy = Policy(model, hf_config, source_name, targets, quantize).eval()
    for i, name in enumerate(adapters):
        policy.add_adapter(name, rank, alpha, seed=seed + i)
    return policy

