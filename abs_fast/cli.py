"""The `abs-fast` command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _train_presets():
    from abs_fast.train.config import TRAIN_PRESETS

    return TRAIN_PRESETS


def _info(args: argparse.Namespace) -> int:
    from abs_fast.info import environment_report, format_report

    report = environment_report()
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def _train_config(args: argparse.Namespace):
    from abs_fast.train import apply_overrides, config_from_file, preset_config

    if args.resume and args.preset is None and args.config is None:
        saved = Path(args.output or "") / "config.json"
        if not args.output or not saved.is_file():
            raise SystemExit("abs-fast train --resume needs --output RUN_DIR (holding config.json), or the original "
                             "--preset / --config")
        config = config_from_file(saved)
    elif args.config is not None:
        config = config_from_file(args.config)
    else:
        config = preset_config(args.preset or "tiny")
    if args.model is not None:
        config = apply_overrides(config, {"model": args.model}, where="--model")
    if args.output is not None:
        config = apply_overrides(config, {"output": args.output}, where="--output")
    return apply_overrides(config, args.set or [])


def _train(args: argparse.Namespace) -> int:
    from abs_fast.train import Trainer, plot_metrics, read_metrics, summary_table

    try:
        config = _train_config(args)
        trainer = Trainer(config, resume=args.resume)
    except (KeyError, ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"abs-fast train: {err.args[0] if isinstance(err, KeyError) else err}", file=sys.stderr)
        return 2
    trainer.train()
    records = read_metrics(trainer.run_dir / "metrics.jsonl")
    plot = plot_metrics(records, trainer.run_dir / "rewards.png") if records else None
    print(summary_table(records))
    print(f"\nrun directory: {trainer.run_dir}" + (f" (plot: {plot.name})" if plot else ""))
    return 0


def _demo(args: argparse.Namespace) -> int:
    import time

    from abs_fast.train import Trainer, apply_overrides, plot_metrics, preset_config, read_metrics, summary_table

    output = Path(args.output)
    if output.exists() and any(output.iterdir()):
        if not (output / "config.json").is_file():
            print(f"abs-fast demo: {output} exists and is not an abs-fast run; choose another --output",
                  file=sys.stderr)
            return 2
        import shutil

        print(f"replacing the previous demo run in {output}", file=sys.stderr)
        shutil.rmtree(output)
    config = apply_overrides(preset_config("tiny"), {"output": str(output), "steps": args.steps, "judge": "heuristic",
                                                     "device": "cpu"})
    print("abs-fast demo: ABS self-play (attacker + defender adapters) on the tiny random-weight model, CPU, with "
          "the HEURISTIC judge (keyword matching, not a safety judge). It shows the machinery, not safety results.",
          file=sys.stderr)
    start = time.perf_counter()
    trainer = Trainer(config)
    trainer.train(progress=not args.quiet)
    records = read_metrics(output / "metrics.jsonl")
    plot = plot_metrics(records, output / "rewards.png")
    print(summary_table(records))
    print(f"\n{len(records)} steps in {time.perf_counter() - start:.0f} s. Wrote {output}/attacker/ and "
          f"{output}/defender/ (PEFT adapters), metrics.jsonl, {plot.name}, tensorboard/, checkpoints/.")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="abs-fast", description="Anchored Bipolicy Self-Play trainer")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    info = commands.add_parser("info", help="versions, devices and which backend each op uses (paste into bug reports)")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.set_defaults(run=_info)

    train = commands.add_parser("train", help="train attacker and defender adapters by self-play (ABS)",
                                description="Self-play RL of the red-teaming game. Start from a preset or a config "
                                            "file; --set key=value changes any config key.")
    start = train.add_mutually_exclusive_group()
    start.add_argument("--preset", choices=list(_train_presets()), help="named starting configuration (default tiny)")
    start.add_argument("--config", metavar="FILE", help="JSON or TOML file of config keys (may name a preset)")
    train.add_argument("--model", metavar="LOCAL_DIR", help="local checkpoint directory (Qwen2.5-*-Instruct class)")
    train.add_argument("--output", metavar="RUN_DIR", help="run directory (checkpoints, adapters, metrics)")
    train.add_argument("--set", nargs="+", metavar="KEY=VALUE", help="override config keys, e.g. --set steps=50 "
                                                                      "mode=shared lr_defender=1e-5")
    train.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in RUN_DIR")
    train.set_defaults(run=_train)

    demo = commands.add_parser("demo", help="ABS on the built-in tiny model with the heuristic judge (CPU, minutes)")
    demo.add_argument("--output", default="runs/demo", help="run directory (default runs/demo; replaced if it "
                                                            "holds an earlier run)")
    demo.add_argument("--steps", type=int, default=24, help="self-play steps (default 24)")
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    demo.set_defaults(run=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
