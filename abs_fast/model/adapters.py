"""LoRA adapters in PEFT's on-disk format, so PEFT and SGLang load what abs-fast saves and abs-fast
loads what PEFT trains.

    <dir>/<adapter>/adapter_config.json        peft_type LORA, r, lora_alpha, target_modules, ...
    <dir>/<adapter>/adapter_model.safetensors  base_model.model.<module>.lora_A.weight [r, in]
                                               base_model.model.<module>.lora_B.weight [out, r]
    <dir>/<adapter>/abs-fast-base.json         what the adapter was trained on (abs-fast's own, optional):
                                               model, tokenizer, chat template, quantisation, dtype, ...
                                               so that eval, crossplay and exploit need nothing else
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

import torch

from abs_fast.io import atomic_write_text, open_safetensors, read_text, replace_directory, save_safetensors
from abs_fast.model.lora import MultiLoRALinear

__all__ = ["BASE_INFO_NAME", "CONFIG_NAME", "WEIGHTS_NAME", "load_peft_adapter", "peft_adapter_state",
           "read_adapter_base", "read_adapter_config", "save_peft_adapter"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
BASE_INFO_NAME = "abs-fast-base.json"
_PREFIX = "base_model.model."
_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")


def peft_adapter_state(layers: dict[str, MultiLoRALinear], name: str, base_model_name_or_path: str | None = None,
                       to_cpu: bool = True) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config.json contents, PEFT-named tensors) of adapter `name` of `layers`.
    to_cpu=False keeps the tensors on the layers' device (detached views, not copies)."""
    tensors, ranks, alphas = {}, {}, {}
    for path, layer in layers.items():
        if name not in layer.lora_A:
            continue
        a, b = layer.lora_A[name].detach(), layer.lora_B[name].detach()
        if to_cpu:
            a, b = a.to("cpu"), b.to("cpu")
        tensors[f"{_PREFIX}{path}.lora_A.weight"] = a.contiguous()
        tensors[f"{_PREFIX}{path}.lora_B.weight"] = b.contiguous()
        ranks[path], alphas[path] = layer.ranks[name], layer.alphas[name]
    if not tensors:
        raise KeyError(f"no layer holds an adapter named {name!r}")
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": alpha,
        "target_modules": sorted({path.rsplit(".", 1)[-1] for path in ranks}),
        "rank_pattern": {path: v for path, v in ranks.items() if v != r},
        "alpha_pattern": {path: v for path, v in alphas.items() if v != alpha},
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "inference_mode": True,
        "revision": None,
    }
    return config, tensors


def save_peft_adapter(layers: dict[str, MultiLoRALinear], name: str, directory: str | Path,
                      base_model_name_or_path: str | None = None, base_info: dict | None = None) -> Path:
    """Write adapter `name` of `layers` (module path -> layer) to `directory` atomically, with
    `base_info` (what it was trained on) as BASE_INFO_NAME when given."""
    return write_peft_adapter(directory, *peft_adapter_state(layers, name, base_model_name_or_path), base_info)


def write_peft_adapter(directory: str | Path, config: dict, tensors: dict[str, torch.Tensor],
                       base_info: dict | None = None) -> Path:
    """A PEFT adapter directory (adapter_config.json + adapter_model.safetensors, and BASE_INFO_NAME
    when `base_info` is given), written atomically."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with replace_directory(directory) as staging:
        save_safetensors(tensors, staging / WEIGHTS_NAME, metadata={"format": "pt"})
        atomic_write_text(staging / CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True) + "\n")
        if base_info is not None:
            atomic_write_text(staging / BASE_INFO_NAME, json.dumps(base_info, indent=2, sort_keys=True) + "\n")
    return Path(directory)


def read_adapter_base(directory: str | Path) -> dict | None:
    """The BASE_INFO_NAME of an adapter directory (None when it has none: an adapter PEFT or an older
    abs-fast wrote)."""
    path = Path(directory) / BASE_INFO_NAME
    if not path.is_file():
        return None
    try:
        info = json.loads(read_text(path, "adapter base description"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: line {err.lineno}: not valid JSON ({err.msg})") from None
    if not isinstance(info, dict) or not isinstance(info.get("model"), str):
        raise ValueError(f"{path}: expected a JSON object with a 'model' string")
    return info


def read_adapter_config(directory: str | Path) -> dict:
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no adapter config (expected a PEFT adapter directory holding "
                                f"{CONFIG_NAME} and {WEIGHTS_NAME})")
    try:
        config = json.loads(read_text(path, "adapter config"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: line {err.lineno}: not valid JSON ({err.msg})") from None
    for field, expected in (("peft_type", "LORA"),):
        if config.get(field) != expected:
            raise ValueError(f"{path}: field {field!r} is {config.get(field)!r}; only {expected!r} adapters load")
    for field in ("r", "lora_alpha"):
        if not isinstance(config.get(field), int | float) or config[field] <= 0:
            raise ValueError(f"{path}: field {field!r} must be a positive number, got {config.get(field)!r}")
    unsupported = {"use_dora": False, "fan_in_fan_out": False, "bias": "none", "modules_to_save": None}
    for field, supported in unsupported.items():
        value = config.get(field, supported)
        if value not in (supported, [], {}) and not (field == "modules_to_save" and not value):
            raise ValueError(f"{path}: field {field!r} = {value!r} is not supported (expected {supported!r})")
    return config


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern: a key matches a module path by full path, by suffix or
    as a regular expression."""
    for key, value in patterns.items():
        if module == key or module.endswith("." + key) or re.fullmatch(key, module):
            return value
    return default


def load_peft_adapter(layers: dict[str, MultiLoRALinear], directory: str | Path, name: str) -> list[str]:
    """Load the PEFT adapter in `directory` into `layers` as adapter `name`; returns the module
    paths it covers. Target layers it does not cover get a fresh PEFT-initialised adapter (B = 0:
    no change to their output), so adapter ids stay aligned across layers."""
    directory = Path(directory)
    config = read_adapter_config(directory)
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        pickled = (directory / "adapter_model.bin").exists()
        hint = " (a .bin adapter is a pickle: re-save it with safetensors)" if pickled else ""
        raise FileNotFoundError(f"{weights}: missing{hint}")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    with open_safetensors(weights, "adapter weights") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
            match = _KEY.match(key.removeprefix(_PREFIX))
            if match is None:
                raise ValueError(f"{weights}: tensor {key!r} is not a LoRA weight (expected "
                                 f"'{_PREFIX}<module>.lora_A.weight' or '.lora_B.weight')")
            module = match["module"]
            if module not in layers:
                known = ", ".join(sorted(layers)[:3])
                raise ValueError(f"{weights}: tensor {key!r} targets module {module!r}, which is not a target "
                                 f"layer of this model (target layers look like: {known}, ...)")
            tensor = f.get_tensor(key)
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise ValueError(f"{weights}: tensor {key!r} holds NaN or infinite values; this adapter cannot be "
                                 "played (train from the checkpoint before it went non-finite)")
            pairs.setdefault(module, {})[match["part"]] = tensor
    if not pairs:
        raise ValueError(f"{weights}: holds no LoRA tensors")
    rslora = bool(config.get("use_rslora", False))
    for module, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            missing = "lora_B" if "A" in pair else "lora_A"
            raise ValueError(f"{weights}: module {module!r} has no {missing} tensor")
        rank = pair["A"].shape[0]
        expected = int(_pattern_value(config.get("rank_pattern") or {}, module, config["r"]))
        if rank != expected or pair["B"].shape[-1] != rank:
            raise ValueError(f"{weights}: module {module!r}: lora_A has rank {rank} and lora_B {pair['B'].shape[-1]}, "
                             f"but {directory / CONFIG_NAME} says r={expected}: the config and the weights disagree")
        alpha = float(_pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"]))
        if rslora:  # PEFT scales by alpha / sqrt(r); the layer scales by alpha / r
            alpha *= math.sqrt(rank)
        try:
            layers[module].set_adapter_weights(name, pair["A"].float(), pair["B"].float(), alpha)
        except ValueError as err:
            raise ValueError(f"{weights}: module {module!r}: {err}") from None
    rank = int(config["r"])
    for module, layer in layers.items():
        if module in pairs:
            continue
        if name in layer.lora_A:
            with torch.no_grad():
                layer.lora_B[name].zero_()
        else:
            layer.add_adapter(name, rank, float(config["lora_alpha"]))
    return sorted(pairs)
