"""The `abs-fast` command line."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shlex
import signal
import sys
from pathlib import Path

from abs_fast.io import check_text, shorten


def _warmstart_defaults() -> dict:
    import dataclasses

    from abs_fast.train.config import WarmstartSettings

    return {f.name: f.default for f in dataclasses.fields(WarmstartSettings)}


def _train_presets():
    from abs_fast.train.config import TRAIN_PRESETS

    return TRAIN_PRESETS


def _info(args: argparse.Namespace) -> int:
    from abs_fast.info import environment_report, format_report

    def run():
        report = environment_report()
        text = None if args.json else format_report(report)
        if args.model is not None:  # the checkpoint, from its files (no weights read)
            from abs_fast.train import TrainConfig
            from abs_fast.train.build import checkpoint_header, describe_checkpoint, load_tokenizer_for

            config = TrainConfig(model=args.model, tokenizer=args.tokenizer or "")
            report["checkpoint"] = describe_checkpoint(config, load_tokenizer_for(config))
            text = None if args.json else f"{text}\n{checkpoint_header(report['checkpoint'])}"
        print(json.dumps(report, indent=2) if args.json else text)
        return 0

    return _guarded("info", run)


def _train_config(args: argparse.Namespace):
    from abs_fast.model import PRESETS
    from abs_fast.train import apply_overrides, config_from_file, preset_config

    if getattr(args, "resume", False) and args.preset is None and args.config is None:
        if not args.output:
            raise ValueError("train --resume needs --output RUN_DIR (the run to continue)")
        saved = Path(args.output) / "config.json"
        if not saved.is_file():
            raise FileNotFoundError(f"{saved}: missing, so {args.output} is not a run to resume (give the original "
                                    "--preset / --config to start one there)")
        config = config_from_file(saved)
    elif args.config is not None:
        config = config_from_file(args.config)
    elif args.preset is None and args.model is not None and args.model not in PRESETS:
        config = _derived_config(args)  # a real checkpoint without a preset: settings that fit it
    else:
        config = preset_config(args.preset or "tiny")
    if args.model is not None:
        config = apply_overrides(config, {"model": args.model}, where="--model")
    if getattr(args, "output", None) is not None:
        config = apply_overrides(config, {"output": args.output}, where="--output")
    return apply_overrides(config, args.set or [])


def _derived_config(args: argparse.Namespace):
    """The paper's recipe scaled to the checkpoint in --model and the device (--set device=..., or
    plan's --device / --gpu-memory); printed, and every --set still wins."""
    from abs_fast.train import TrainConfig, apply_overrides
    from abs_fast.train.defaults import derive_settings
    from abs_fast.train.plan import parse_gib

    probe = apply_overrides(TrainConfig(model=args.model, output="runs/abs"), args.set or [])
    gib = parse_gib(args.gpu_memory) if getattr(args, "gpu_memory", None) is not None else None
    device = probe.device
    if hasattr(args, "gpu_memory"):  # plan: its own --device, else CUDA unless the config says cpu (as plan_memory)
        device = args.device or ("cpu" if probe.device == "cpu" else "cuda")
    derived = derive_settings(probe, device=device, gpu_memory_gb=gib)
    for line in derived.describe():
        logging.getLogger("abs_fast").info("%s", line)
    return apply_overrides(TrainConfig(model=args.model, output="runs/abs"), derived.values, where="derived settings")


def _plan(args: argparse.Namespace) -> int:
    from abs_fast.train.plan import parse_gib, plan_memory

    def run():
        config = _train_config(args).validate(require_model=False)
        gib = parse_gib(args.gpu_memory) if args.gpu_memory is not None else None
        plan = plan_memory(config, preset=args.preset, gpu_memory_gb=gib, device=args.device)
        print(json.dumps(plan.to_dict(), indent=2) if args.json else plan.table())
        return 1 if plan.fits is False else 0  # a script can gate on it

    return _guarded("plan", run)


def _train(args: argparse.Namespace) -> int:
    def run():
        from abs_fast.train import Trainer

        trainer = Trainer(_train_config(args), resume=args.resume)
        try:
            trainer.train()
        except _sglang_errors() as err:
            raise type(err)(f"{err}\nThe run continues from its last checkpoint with: abs-fast train --output "
                            f"{trainer.run_dir} --resume") from None
        finally:
            trainer.close()
        if trainer.collective.is_main:  # data parallel: rank 0 reports
            _print_summary(trainer.run_dir)

    return _guarded("train", run, resume=lambda err: f"`abs-fast train --output {shlex.quote(str(err.run_dir))} "
                                                    "--resume` continues")


def _print_summary(run_dir: Path) -> None:
    from abs_fast.train import plot_metrics, read_metrics, summary_table

    records = read_metrics(run_dir / "metrics.jsonl")
    plot = plot_metrics(records, run_dir / "rewards.png") if records else None
    print(summary_table(records))
    print(f"\nrun directory: {run_dir}" + (f" (plot: {plot.name})" if plot else ""))


def _warmstart(args: argparse.Namespace) -> int:
    def run():
        from abs_fast.train.config import WarmstartSettings
        from abs_fast.train.warmstart import run_warmstart

        values = {key: getattr(args, key) for key in ("steps", "batch_size", "lr", "rank", "turn_tokens", "examples",
                                                       "eval_seeds", "eval_samples", "quantize", "device", "seed")
                  if getattr(args, key) is not None}
        if args.seeds:
            values["seeds"] = tuple(args.seeds)
        record = run_warmstart(args.model, args.output, WarmstartSettings(**values),
                               tokenizer_source=args.tokenizer or "")
        before, after = record["validity_before"], record["validity_after"]
        print(f"format validity on {record['held_out_seeds']} held-out seeds: attacker {before['attacker']:.0%} -> "
              f"{after['attacker']:.0%}, defender {before['defender']:.0%} -> {after['defender']:.0%}\n"
              f"warm-started checkpoint: {args.output} (train --model {shlex.quote(args.output)} uses it as the base)")

    return _guarded("warmstart", run, resume=lambda err: "`abs-fast warmstart` with the same --output starts it over")


def _demo(args: argparse.Namespace) -> int:
    def run():
        from abs_fast.train.demo import run_demo

        run_demo(Path(args.output), args.steps, seed=args.seed, progress=not args.quiet)

    return _guarded("demo", run, resume=lambda err: f"`abs-fast demo --output {shlex.quote(str(err.run_dir))}` "
                                                  "starts it over")


_USER_ERRORS = (KeyError, ValueError, OSError, UnicodeDecodeError)


def _sglang_errors() -> tuple[type[Exception], ...]:
    from abs_fast.rollout.sglang import SGLangRequestError, SGLangServerError

    return SGLangServerError, SGLangRequestError


def _is_user_error(err: BaseException) -> bool:
    """Bad input or a bad environment, which the user can fix: exit 2 with a message. An OSError counts
    only when it names a file (an internal one keeps its traceback)."""
    if isinstance(err, OSError):
        return err.filename is not None or isinstance(err, (FileNotFoundError, FileExistsError, IsADirectoryError,
                                                             NotADirectoryError, PermissionError))
    return isinstance(err, _USER_ERRORS)


def _message(err: BaseException) -> str:
    if isinstance(err, KeyError):
        return str(err.args[0]) if err.args else "missing key"
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        return f"{err.filename}: {err.strerror}" if str(err.filename) not in err.strerror else err.strerror
    return str(err)


def _user_error(command: str, err: Exception) -> int:
    """Exit 2 for bad input; exit 1 for an SGLang server that failed (its log tail is in the message)."""
    print(f"abs-fast {command}: {_message(err)}", file=sys.stderr)
    return 1 if isinstance(err, _sglang_errors()) else 2


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, so that it stops as on Ctrl-C (exit 143)."""

    exit_code = 143


def _interrupted(command: str, err: KeyboardInterrupt, resume) -> int:
    """One line for Ctrl-C / SIGTERM; exit 130 / 143."""
    from abs_fast.train import TrainingInterrupted

    code = getattr(err, "exit_code", 130)
    if isinstance(err, TrainingInterrupted):
        if err.checkpoint is None:
            line = f"interrupted at step {err.step}, before the run's first checkpoint: nothing to resume"
        else:
            saved = err.checkpoint.name.removeprefix("step_").lstrip("0") or "0"
            line = f"interrupted at step {err.step}; the checkpoint of step {saved} is intact"
            if resume is not None:
                line += f"; {resume(err)}"
    else:
        line = "interrupted; nothing after the last completed write was kept"
    print(f"abs-fast {command}: {line}", file=sys.stderr)
    return code


def _guarded(command: str, run, *args, resume=None) -> int:
    """Run a command; user errors exit 2 (SGLang failures 1, non-finite training 3) with one line on stderr;
    Ctrl-C and SIGTERM exit 130 and 143 with one line (`resume`: what to run next after an interrupted
    training run, from its TrainingInterrupted)."""
    from abs_fast.train import NonFiniteTrainingError

    try:
        result = run(*args)
    except KeyboardInterrupt as err:
        return _interrupted(command, err, resume)
    except _sglang_errors() as err:
        return _user_error(command, err)
    except NonFiniteTrainingError as err:
        print(f"abs-fast {command}: {err}", file=sys.stderr)
        return 3
    except Exception as err:
        if not _is_user_error(err):
            raise
        return _user_error(command, err)
    return result if isinstance(result, int) else 0


def _split_list(values: list[str] | None) -> list[str]:
    return [v.strip() for value in values or [] for v in value.split(",") if v.strip()]


def _eval(args: argparse.Namespace) -> int:
    from abs_fast.evaluate.commands import eval_command

    return _guarded("eval", lambda: eval_command(
        args.policy, args.suite or [], base_only=args.base_only, model=args.model, overrides=args.set or [],
        output=args.output, limit=args.limit, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        attack_seeds=args.attack_seeds or [], attack_samples=args.attack_samples,
        attacker_probe_on=not args.no_attacker_probe, progress=not args.quiet))


def _crossplay(args: argparse.Namespace) -> int:
    from abs_fast.evaluate.commands import crossplay_command

    return _guarded("crossplay", lambda: crossplay_command(
        _split_list(args.attackers), _split_list(args.defenders), args.seeds, model=args.model,
        overrides=args.set or [], output=args.output, limit=args.limit, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, progress=not args.quiet))


def _exploit(args: argparse.Namespace) -> int:
    from abs_fast.evaluate.commands import exploit_command

    def resume(err) -> str:
        return (f"`abs-fast exploit --defender {shlex.quote(args.defender)} --steps {args.steps} --output "
                f"{shlex.quote(str(err.run_dir))} --resume` continues")

    return _guarded("exploit", lambda: exploit_command(
        args.defender, args.steps, model=args.model, overrides=args.set or [], output=args.output,
        resume=args.resume, progress=not args.quiet), resume=resume)


def _report(args: argparse.Namespace) -> int:
    def run():
        from abs_fast.evaluate.report import build_report

        html_path, md_path = build_report(args.paths, args.output)
        print(f"wrote {html_path} (self-contained) and {md_path}")

    return _guarded("report", run)


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", metavar="LOCAL_DIR", help="base model (default: the run's, or the adapter's "
                                                             "base_model_name_or_path)")
    parser.add_argument("--set", nargs="+", metavar="KEY=VALUE", help="config keys, e.g. judge=wildguard "
                                                                      "judge_model=DIR device=cuda")
    parser.add_argument("--max-new-tokens", type=int, default=512,
                        help="per turn (default 512, docs/GAME.md section 6)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    from abs_fast.train.demo import DEMO_STEPS

    parser = argparse.ArgumentParser(prog="abs-fast", description="Anchored Bipolicy Self-Play trainer")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    info = commands.add_parser("info", help="versions, devices and which backend each op uses (paste into bug reports)")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.add_argument("--model", metavar="DIR", help="also describe this checkpoint: architecture, size, tied "
                      "embeddings, GQA ratio, chat template source, stop ids (reads no weights)")
    info.add_argument("--tokenizer", metavar="DIR", help="the tokenizer to describe it with (default: the model's)")
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

    plan = commands.add_parser(
        "plan", help="predict a training run's peak memory per phase and whether it fits (loads nothing)",
        description="The memory plan of a run (the same configuration options as train): base weights, adapters and "
                    "Adam, KV cache, judge, activations at the token budget, transients; the peak phase, whether it "
                    "fits --gpu-memory, and which knob to turn if it does not.")
    plan_start = plan.add_mutually_exclusive_group()
    plan_start.add_argument("--preset", choices=list(_train_presets()), help="named starting configuration")
    plan_start.add_argument("--config", metavar="FILE", help="JSON or TOML file of config keys")
    plan.add_argument("--model", metavar="LOCAL_DIR", help="checkpoint directory (its config.json gives the shape)")
    plan.add_argument("--set", nargs="+", metavar="KEY=VALUE", help="config keys, as for train")
    plan.add_argument("--gpu-memory", metavar="GB", help="memory of the device, e.g. 24 or 80 (default: unknown)")
    plan.add_argument("--device", choices=["cuda", "cpu"], help="plan for this device (default: cuda unless "
                                                                "device=cpu)")
    plan.add_argument("--json", action="store_true", help="machine-readable (peak_gb, fits, every part)")
    plan.set_defaults(run=_plan)

    warm = commands.add_parser(
        "warmstart", help="teach a checkpoint the game's turn format before self-play (writes a new checkpoint)",
        description="Format warm start: the model's own reasoning and answers, asked for apart and wrapped in the "
                    "game's tags, plus its own valid turns; a LoRA trained on them is merged into a copy of the "
                    "checkpoint. Format validity on held-out seeds is measured before and after.")
    warm.add_argument("--model", required=True, metavar="LOCAL_DIR", help="the checkpoint to warm-start")
    warm.add_argument("--output", required=True, metavar="DIR", help="the warm-started checkpoint (new or empty, "
                                                                      "or an earlier warm start)")
    warm.add_argument("--tokenizer", metavar="DIR", help="default: the checkpoint's own")
    defaults = _warmstart_defaults()
    for flag, kind, text in (("--steps", int, "supervised steps"), ("--batch-size", int, "turns per step"),
                             ("--lr", float, "learning rate"), ("--rank", int, "LoRA rank"),
                             ("--turn-tokens", int, "a turn's length, as train's *_max_new_tokens"),
                             ("--examples", int, "assembled turns"), ("--eval-seeds", int, "held-out seeds"),
                             ("--eval-samples", int, "sampled turns per held-out prompt"),
                             ("--seed", int, "random seed")):
        warm.add_argument(flag, type=kind, help=f"{text} (default {defaults[flag[2:].replace('-', '_')]})")
    warm.add_argument("--seeds", nargs="+", metavar="SPEC", help="seed sets, as train's seeds (default builtin)")
    warm.add_argument("--quantize", choices=["nf4", "none"], help="the base while the adapter trains (default nf4)")
    warm.add_argument("--device", help="auto, cpu, cuda or cuda:N (default auto)")
    warm.set_defaults(run=_warmstart)

    demo = commands.add_parser("demo", help="ABS on the built-in tiny model with the heuristic judge (CPU, minutes)")
    demo.add_argument("--output", default="runs/demo", help="run directory (default runs/demo; replaced only if it "
                                                            "holds an earlier demo)")
    demo.add_argument("--steps", type=int, default=DEMO_STEPS, help=f"self-play steps (default {DEMO_STEPS})")
    demo.add_argument("--seed", type=int, default=0, help="random seed of the run (default 0)")
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    demo.set_defaults(run=_demo)

    evaluate = commands.add_parser(
        "eval", help="safety suites and GSM8K for a policy's defender (and its attacker's diversity)",
        description="Answer every suite prompt with the policy's defender (greedy, batched through the engine), judge "
                    "the answers, and report docs/GAME.md section 6 rates with counts and 95% intervals. GSM8K is "
                    "answered by the defender and by the base. Writes eval.json, eval.md, generations.jsonl.")
    evaluate.add_argument("--policy", metavar="RUN_OR_ADAPTER_DIR", help="a training run directory or a PEFT "
                                                                         "adapter directory")
    evaluate.add_argument("--base-only", action="store_true", help="evaluate the base model without adapters")
    evaluate.add_argument("--suite", action="append", metavar="NAME=PATH",
                          help="repeatable; NAME: xstest, wildjailbreak, wildguardtest, harmbench, orbench-hard, "
                               "orbench-toxic, gsm8k (NAME.x=PATH for a second file of one kind)")
    evaluate.add_argument("--limit", type=int, help="first N items of each suite")
    evaluate.add_argument("--output", metavar="DIR", help="default RUN_DIR/eval (RUN_DIR/eval-base with --base-only)")
    evaluate.add_argument("--attack-seeds", nargs="+", metavar="SPEC", help="seeds for the attacker probe (default: "
                                                                            "the run's training seeds)")
    evaluate.add_argument("--attack-samples", type=int, default=64, help="seeds in the attacker probe (default 64)")
    evaluate.add_argument("--no-attacker-probe", action="store_true", help="skip attack diversity / collapse probe")
    _add_model_options(evaluate)
    evaluate.set_defaults(run=_eval)

    cross = commands.add_parser(
        "crossplay", help="every attacker against every defender: attack-success and over-refusal matrices",
        description="Both turns batched across all pairs through the engine. Writes crossplay.json, .csv, .md, "
                    ".png (heatmaps) and games.jsonl.")
    cross.add_argument("--attackers", nargs="+", required=True, metavar="A",
                       help="run or adapter directories, or 'base' (comma or space separated)")
    cross.add_argument("--defenders", nargs="+", required=True, metavar="D",
                       help="run or adapter directories, or 'base' (comma or space separated)")
    cross.add_argument("--seeds", nargs="+", required=True, metavar="SPEC",
                       help="held-out seeds: PATH (with a type column), harmful=PATH, benign=PATH or builtin")
    cross.add_argument("--limit", type=int, help="N seeds (a seeded sample)")
    cross.add_argument("--output", default="crossplay", metavar="DIR", help="default ./crossplay")
    _add_model_options(cross)
    cross.set_defaults(run=_crossplay)

    exploit = commands.add_parser(
        "exploit", help="train a fresh attacker against a frozen defender; its plateau estimates exploitability",
        description="Attacker-only training against the defender held fixed; reports the attack-success curve and "
                    "its plateau (exploit.json, exploit.md, exploit.png in the run directory).")
    exploit.add_argument("--defender", required=True, metavar="D", help="run or adapter directory, or 'base'")
    exploit.add_argument("--steps", type=int, required=True, help="attacker training steps")
    exploit.add_argument("--model", metavar="LOCAL_DIR", help="base model (default: the defender run's)")
    exploit.add_argument("--output", metavar="RUN_DIR", help="default D/exploit for a run directory")
    exploit.add_argument("--set", nargs="+", metavar="KEY=VALUE", help="training config keys (lr_attacker, ...)")
    exploit.add_argument("--resume", action="store_true", help="continue an interrupted exploit run")
    exploit.add_argument("--quiet", action="store_true", help="no progress bar")
    exploit.set_defaults(run=_exploit)

    report = commands.add_parser("report", help="one HTML page (and markdown) from saved results; runs no model")
    report.add_argument("paths", nargs="+", metavar="RUN_DIR", help="run or results directories")
    report.add_argument("--output", default="report", metavar="DIR", help="default ./report")
    report.set_defaults(run=_report)
    return parser


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time of each message (progress bars and test captures
    swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def configure_logging() -> None:
    """abs-fast's messages (logger "abs_fast") at INFO on stderr, prefixed by the data-parallel rank
    under torchrun."""
    logger = logging.getLogger("abs_fast")
    if any(isinstance(h, _StderrHandler) for h in logger.handlers):
        return
    rank = int(os.environ.get("RANK", "0") or 0)
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter((f"[rank {rank}] " if rank else "") + "%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


# commands that load models: their token counts vary from call to call, which fragments CUDA's caching
# allocator; expandable segments let it grow and reuse segments instead of reserving new ones
_MODEL_COMMANDS = ("train", "demo", "eval", "crossplay", "exploit")


def set_thread_wait_default() -> None:
    """OMP_WAIT_POLICY=PASSIVE unless the user chose a wait policy: OpenMP threads that spin between
    parallel regions take the core a loaded machine's other process needs, and each region then waits
    for a descheduled thread (bench/RESULTS.md: a CPU rollout 2x slower under load with spinning, 10-20%
    faster idle). Read once, when torch loads OpenMP: too late once torch is imported."""
    if "torch" in sys.modules or "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"


def set_allocator_defaults(command: str | None) -> None:
    """PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True for the commands that load models, unless the
    user set PYTORCH_CUDA_ALLOC_CONF (read when CUDA first allocates, so set before any model loads)."""
    if command in _MODEL_COMMANDS:
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")


def main(argv: list[str] | None = None) -> int:
    set_thread_wait_default()
    configure_logging()
    parser = build_parser()
    args = parser.parse_args(argv)
    if (refusal := _undecodable_argument(sys.argv[1:] if argv is None else argv)) is not None:
        print(f"abs-fast {args.command or ''}: {refusal}".replace("  ", " "), file=sys.stderr)
        return 2
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    set_allocator_defaults(args.command)
    previous = signal.getsignal(signal.SIGTERM)
    with contextlib.suppress(ValueError):  # not the main thread: leave SIGTERM as it is
        signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return args.run(args)
    except BrokenPipeError:  # the reader went away (abs-fast info | head): not an error of ours
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (python flushes stdout at exit)
        return 0
    finally:
        with contextlib.suppress(ValueError, TypeError):
            signal.signal(signal.SIGTERM, previous)


def _undecodable_argument(argv: list[str]) -> str | None:
    """Arguments are written into JSON and metadata later: one holding bytes that are not UTF-8 (a
    file name from another encoding) is refused now, not after the work."""
    for argument in argv:
        try:
            check_text(argument, f"argument {shorten(argument)}")
        except ValueError as err:
            return f"{err} (rename the path, or pass a UTF-8 name)"
    return None


def _raise_terminated(signum, frame):
    raise _Terminated()


if __name__ == "__main__":
    sys.exit(main())
