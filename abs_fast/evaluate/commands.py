"""The evaluation commands behind `abs-fast eval | crossplay | exploit | report`: resolve what the
paths name, load the base model once with every adapter needed, run (on the embedded engine, or on
SGLang with rollout_engine=sglang), write the result files."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

from abs_fast.evaluate.crossplay import crossplay, crossplay_markdown, write_crossplay
from abs_fast.evaluate.evaluation import EvalSettings, attacker_probe, eval_markdown, evaluate_policy, write_eval
from abs_fast.evaluate.exploit import exploit_markdown, exploit_summary, write_exploit
from abs_fast.evaluate.policies import eval_config, is_run_dir, load_role_adapters, role_adapter
from abs_fast.evaluate.suites import load_suite, parse_suite_spec
from abs_fast.game import parse_seed_spec
from abs_fast.game.seeds import SeedStream
from abs_fast.io import RunDirectory, atomic_write_text
from abs_fast.train.build import load_judge, load_policy_for, load_tokenizer_for, sglang_engine_for, stop_token_ids
from abs_fast.train.config import TrainConfig, apply_overrides

__all__ = ["crossplay_command", "eval_command", "exploit_command"]

logger = logging.getLogger(__name__)

def _settings(config: TrainConfig, max_new_tokens: int | None, temperature: float, attack_samples: int = 64,
              progress: bool = True) -> EvalSettings:
    return EvalSettings(max_new_tokens=512 if max_new_tokens is None else max_new_tokens, temperature=temperature,
                        reasoning=config.reasoning,
                        engine_max_batch=config.engine_max_batch, seed=config.seed, attack_samples=attack_samples,
                        attack_temperature=config.temperature, token_budget=config.token_budget, progress=progress)


def _seeds(specs: Sequence[str], limit: int | None, seed: int) -> list:
    seeds = [s for spec in specs for s in parse_seed_spec(spec)]
    if not seeds:
        raise ValueError(f"no seeds in {', '.join(specs)}")
    return SeedStream(seeds, seed).take(min(limit, len(seeds)) if limit else len(seeds))


class _Loaded(NamedTuple):
    tokenizer: object
    engine: object | None  # an SGLangEngine serving `policy`'s adapters; None = the embedded engine
    policy: object
    names: dict[str, str | None]  # path key -> adapter name in `policy` (None = the base)
    judge: object


@contextlib.contextmanager
def _loaded(config: TrainConfig, paths: dict[str, Path | None], output: str | Path) -> Iterator[_Loaded]:
    """Everything an evaluation runs on: the tokenizer; with rollout_engine=sglang an SGLang engine
    (started before the policy, since a launched server sizes its memory pool from what is free; its
    log is OUTPUT/sglang-server.log); the base with the adapters of `paths`, pushed to that engine;
    the judge. A server started here stops on exit."""
    tokenizer = load_tokenizer_for(config)
    engine = None
    if config.rollout_engine == "sglang":
        adapters = [key for key, path in paths.items() if path is not None]
        engine = sglang_engine_for(config, tokenizer, adapters, Path(output) / "sglang-server.log",
                                   version_swaps=False)
    try:
        policy = load_policy_for(config)
        names = load_role_adapters(policy, paths)
        if engine is not None and policy.adapter_names:
            engine.update_adapters(policy)
        yield _Loaded(tokenizer, engine, policy, names, load_judge(config))
    finally:
        if engine is not None:
            engine.close()


def eval_command(policy: str | None, suite_specs: Sequence[str], base_only: bool = False, model: str | None = None,
                 overrides: Sequence[str] = (), output: str | None = None, limit: int | None = None,
                 max_new_tokens: int | None = None, temperature: float = 0.0, attack_seeds: Sequence[str] = (),
                 attack_samples: int = 64, attacker_probe_on: bool = True, progress: bool = True) -> tuple[Path, dict]:
    """`abs-fast eval`. Returns (output directory, results)."""
    if policy is None and not base_only:
        raise ValueError("give --policy RUN_OR_ADAPTER_DIR, or --base-only (with --model DIR) for the base model")
    if not suite_specs:
        raise ValueError("give at least one --suite NAME=PATH")
    _check_limit(limit, max_new_tokens, attack_samples)
    config = eval_config([policy] if policy else [], model, list(overrides))
    paths = {"defender": None if base_only else role_adapter(policy, "defender"),
             "attacker": role_adapter(policy, "attacker") if policy and is_run_dir(policy) and not base_only
             and attacker_probe_on else None}
    suites = []
    for spec in suite_specs:
        name, kind, path = parse_suite_spec(spec)
        suites.append((name, kind, load_suite(kind, path, limit)))
    if output is None:
        if policy and is_run_dir(policy):
            output = str(Path(policy) / ("eval-base" if base_only else "eval"))
        else:
            output = str(Path("eval") / ("base" if base_only or not policy else Path(policy).name))
    logger.info(f"eval: loading {config.model} ({config.quantize}) with defender {paths['defender'] or 'none (base)'}")
    settings = _settings(config, max_new_tokens, temperature, attack_samples, progress)
    with RunDirectory(output, "eval"), _loaded(config, paths, output) as m:
        stops = stop_token_ids(m.tokenizer, m.policy)
        results, records = evaluate_policy(m.policy, m.tokenizer, m.judge, suites, m.names["defender"], stops,
                                           settings, engine=m.engine)
        results = {"policy": str(policy) + (" (base only)" if base_only else "") if policy else
                   f"{config.model} (base)", "model": config.model, "judge": config.judge,
                   "engine": config.rollout_engine, **results}
        probe_records: list[dict] = []
        if paths["attacker"] is not None:
            seeds = _seeds(list(attack_seeds) or config.seeds, attack_samples, config.seed)
            results["attacker_probe"], probe_records = attacker_probe(m.policy, m.tokenizer, m.judge, seeds,
                                                                      m.names["attacker"], m.names["defender"],
                                                                      stops, settings, engine=m.engine)
        written = write_eval(results, records, output)
        if probe_records:
            atomic_write_text(Path(output) / "attacks.jsonl", "".join(json.dumps(r) + "\n" for r in probe_records))
    logger.info(f"eval: wrote {', '.join(str(p) for p in written)}")
    print(eval_markdown(results))
    return Path(output), results


def _label(spec: str, taken: set[str]) -> str:
    base = "base" if spec == "base" else (Path(spec).name or spec)
    label, n = base, 2
    while label in taken:
        label, n = f"{base}-{n}", n + 1
    taken.add(label)
    return label


def crossplay_command(attackers: Sequence[str], defenders: Sequence[str], seed_specs: Sequence[str],
                      model: str | None = None, overrides: Sequence[str] = (), output: str = "crossplay",
                      limit: int | None = None, max_new_tokens: int | None = None, temperature: float = 0.0,
                      progress: bool = True) -> tuple[Path, dict]:
    """`abs-fast crossplay`. Returns (output directory, results)."""
    if not attackers or not defenders:
        raise ValueError("give at least one attacker and one defender (adapter or run directories, or 'base')")
    _check_limit(limit, max_new_tokens)
    config = eval_config([*attackers, *defenders], model, list(overrides))
    seeds = _seeds(seed_specs, limit, config.seed)
    paths, labels = {}, {"attacker": [], "defender": []}
    for role, specs in (("attacker", attackers), ("defender", defenders)):
        taken: set[str] = set()
        for i, spec in enumerate(specs):
            key = f"{role}_{i}"
            paths[key] = None if spec == "base" else role_adapter(spec, role)
            labels[role].append((key, _label(spec, taken)))
    logger.info(f"cross-play: loading {config.model} with {sum(p is not None for p in paths.values())} adapter(s)")
    settings = _settings(config, max_new_tokens, temperature, progress=progress)
    with RunDirectory(output, "crossplay"), _loaded(config, paths, output) as m:
        results, records = crossplay(m.policy, m.tokenizer, m.judge,
                                     [(label, m.names[k]) for k, label in labels["attacker"]],
                                     [(label, m.names[k]) for k, label in labels["defender"]], seeds,
                                     stop_token_ids(m.tokenizer, m.policy), settings, engine=m.engine)
        results.update({"model": config.model, "judge": config.judge, "engine": config.rollout_engine,
                        "attacker_paths": list(attackers), "defender_paths": list(defenders)})
        written = write_crossplay(results, records, output)
    logger.info(f"cross-play: wrote {', '.join(str(p) for p in written)}")
    print(crossplay_markdown(results))
    return Path(output), results


def _check_limit(limit: int | None, max_new_tokens: int | None = None, attack_samples: int | None = None) -> None:
    """A number option means what it says or is refused: 0 is never read as "the default"."""
    for flag, value, what in (("--limit", limit, "items per suite or seeds"),
                              ("--max-new-tokens", max_new_tokens, "tokens per answer"),
                              ("--attack-samples", attack_samples, "seeds in the attacker probe")):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be >= 1 ({what}), got {value}")


def exploit_command(defender: str, steps: int, model: str | None = None, overrides: Sequence[str] = (),
                    output: str | None = None, resume: bool = False, progress: bool = True) -> tuple[Path, dict]:
    """`abs-fast exploit`: train a fresh attacker against the frozen defender. Returns (run dir, summary)."""
    from abs_fast.train import Trainer, read_metrics

    frozen = None if defender == "base" else role_adapter(defender, "defender")
    config = eval_config([] if defender == "base" else [defender], model)
    if output is None:
        output = str(Path(defender) / "exploit") if defender != "base" and is_run_dir(defender) else \
            str(Path("exploit") / ("base" if defender == "base" else Path(defender).name))
    config = apply_overrides(config, {"mode": "attacker-only", "frozen_defender": str(frozen or ""), "steps": steps,
                                      "output": output, "generated_fraction": 1.0, "progress": progress,
                                      "tensorboard": True}, where="exploit")
    config = apply_overrides(config, list(overrides))
    logger.info(f"exploit: a fresh attacker for {config.steps} steps against {frozen or 'the base model'} (frozen)")
    if steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    trainer = Trainer(config, resume=resume, run_kind="exploit")
    try:
        trainer.train()
    finally:
        trainer.close()
    summary = exploit_summary(read_metrics(trainer.run_dir / "metrics.jsonl"), str(frozen or "base"))
    written = write_exploit(summary, trainer.run_dir)
    logger.info(f"exploit: wrote {', '.join(str(p) for p in written)}")
    print(exploit_markdown(summary))
    return trainer.run_dir, summary
