"""What a path on the command line names: a training run directory (config.json + adapters) or one
PEFT adapter directory, and the base model every evaluation of it must load."""

from __future__ import annotations

from pathlib import Path

from abs_fast.model import PRESETS
from abs_fast.model.adapters import BASE_INFO_NAME, CONFIG_NAME, read_adapter_base, read_adapter_config
from abs_fast.train.build import BASE_INFO_KEYS, check_before_loading
from abs_fast.train.checkpoint import latest_checkpoint
from abs_fast.train.config import TrainConfig, apply_overrides, config_from_file, preset_config, role_adapters

__all__ = ["adapter_config", "eval_config", "is_run_dir", "load_role_adapters", "owning_run", "role_adapter",
           "run_adapter"]


def is_run_dir(path: str | Path) -> bool:
    return (Path(path) / "config.json").is_file() and not (Path(path) / CONFIG_NAME).is_file()


def run_adapter(run_dir: str | Path, name: str) -> Path:
    """run_dir/<name>/ (written when the run finished), else the newest checkpoint's copy."""
    run_dir = Path(run_dir)
    final = run_dir / name
    if (final / CONFIG_NAME).is_file():
        return final
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is not None and (checkpoint / "adapters" / name / CONFIG_NAME).is_file():
        return checkpoint / "adapters" / name
    raise FileNotFoundError(f"{run_dir}: no adapter {name!r} (neither {final}/ nor one in a checkpoint)")


def role_adapter(path: str | Path, role: str) -> Path | None:
    """The adapter directory that plays `role` ("attacker" or "defender") in `path`: a run directory
    (None when the base played that role) or an adapter directory (itself)."""
    path = Path(path)
    if (path / CONFIG_NAME).is_file():
        return path
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist (expected a run directory or a PEFT adapter directory)")
    if not is_run_dir(path):
        raise FileNotFoundError(f"{path}: neither a run directory (config.json) nor a PEFT adapter directory "
                                f"({CONFIG_NAME})")
    config = config_from_file(path / "config.json")
    if role == "defender" and config.frozen_defender:
        return Path(config.frozen_defender)
    name = role_adapters(config.mode)[role]
    return None if name is None else run_adapter(path, name)


def owning_run(adapter: str | Path) -> Path | None:
    """The run directory an adapter directory lies in: RUN/<name>/ or RUN/checkpoints/step_N/adapters/<name>/."""
    for parent in list(Path(adapter).resolve().parents)[:4]:
        if is_run_dir(parent):
            return parent
    return None


def adapter_config(adapter: str | Path) -> TrainConfig:
    """The config an adapter directory is played with: what its abs-fast-base.json says it was trained
    on (model, tokenizer, chat template, quantisation, dtype, turn format; a preset's seed); else the
    config of the run it lies in; else the tiny preset with its base_model_name_or_path (an adapter
    PEFT wrote)."""
    adapter = Path(adapter)
    peft_config = read_adapter_config(adapter)  # a broken adapter is named before anything else is read
    info = read_adapter_base(adapter)
    if info is not None:
        values = {key: info[key] for key in (*BASE_INFO_KEYS, "chat_template", "seed") if key in info}
        return apply_overrides(preset_config("tiny"), values, where=str(adapter / BASE_INFO_NAME))
    run = owning_run(adapter)
    if run is not None:
        return config_from_file(run / "config.json")
    base = peft_config.get("base_model_name_or_path")
    if base:
        return apply_overrides(preset_config("tiny"), {"model": base}, where=str(adapter / CONFIG_NAME))
    return preset_config("tiny")


def eval_config(paths: list[str | Path], model: str | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """The config (base model, tokenizer, quantisation, device, seed, judge, reasoning) for evaluating
    `paths` together: the first run directory's config, else the first adapter's (adapter_config);
    then --model and --set. Runs or adapters on different base models cannot be compared and are
    refused."""
    runs = [Path(p) for p in paths if p != "base" and is_run_dir(p)]
    configs = [config_from_file(run / "config.json") for run in runs]
    for run, other in zip(runs[1:], configs[1:], strict=True):
        keys = ["model", "quantize"]
        if other.model in PRESETS:  # a preset's random weights depend on the seed
            keys.append("seed")
        for key in keys:
            if getattr(other, key) != getattr(configs[0], key):
                raise ValueError(f"{run}: {key}={getattr(other, key)!r} differs from {runs[0]}'s "
                                 f"{getattr(configs[0], key)!r}; runs compared together must share one base model")
    if configs:
        config = configs[0]
    else:
        adapters = [Path(p) for p in paths if p != "base" and (Path(p) / CONFIG_NAME).is_file()]
        config = adapter_config(adapters[0]) if adapters else preset_config("tiny")
        for other in adapters[1:]:
            info = read_adapter_base(other)
            if info is not None and info["model"] != config.model:
                raise ValueError(f"{other / BASE_INFO_NAME}: trained on model={info['model']!r}, but {adapters[0]} on "
                                 f"{config.model!r}; adapters compared together must share one base model")
    config = apply_overrides(config, {"progress": True, "tensorboard": False}, where="evaluation")
    if model is not None:
        config = apply_overrides(config, {"model": model}, where="--model")
    config = apply_overrides(config, overrides or [])
    check_before_loading(config)  # a bad device or judge directory is refused before any weights load
    return config


def load_role_adapters(policy, paths: dict[str, Path | None]) -> dict[str, str | None]:
    """Load each key's adapter directory into `policy` under the key's name (one copy per distinct
    directory: a shared-mode run's attacker and defender are the same adapter); None stays the base.
    Returns key -> adapter name (or None)."""
    names: dict[str, str | None] = {}
    loaded: dict[Path, str] = {}
    for key, path in paths.items():
        if path is None:
            names[key] = None
            continue
        resolved = Path(path).resolve()
        if resolved not in loaded:
            policy.load_adapter(path, key)
            loaded[resolved] = key
        names[key] = loaded[resolved]
    return names
