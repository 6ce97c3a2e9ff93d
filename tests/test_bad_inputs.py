"""Bad input, table-driven: every case exits 2 with one message that names the culprit (file, line,
field or tensor), prints no traceback, and leaves every file that existed before byte-identical.
Plus two processes on one run directory: the second is refused at once and told the holder's PID.

The cases run in-process through abs_fast.cli.main (an unexpected exception fails the test with its
traceback); the shared fixtures (a tiny model, a one-step training run) are built once."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from abs_fast.cli import main
from abs_fast.model import build_model, load_qwen25_tokenizer

QUIET = ["progress=false", "tensorboard=false", "device=cpu"]


def T(*settings: str, before: tuple[str, ...] = ()) -> list[str]:
    """train --preset tiny [before...] --set QUIET + settings (argparse keeps only the last --set)."""
    return ["train", "--preset", "tiny", *before, "--set", *QUIET, *settings]


@pytest.fixture(scope="module", autouse=True)
def reference_backend():
    """The PyTorch reference ops: these tests check input handling, not kernels (the interpreter is slow)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ABS_FAST_BACKEND", "reference")
        yield


@pytest.fixture(scope="module")
def world(tmp_path_factory, reference_backend):
    """model/ (tiny, saved), run/ (one training step: adapters, checkpoint, metrics), and bad files."""
    root = tmp_path_factory.mktemp("world")
    build_model("tiny", seed=0).save_pretrained(root / "model")
    load_qwen25_tokenizer().save_pretrained(root / "model")
    run = root / "run"
    assert main(T("steps=1", "checkpoint_every=1", "diagnostics_every=0", "rollout_batch_size=2",
                  "train_batch_size=2", "attacker_max_new_tokens=4", "defender_max_new_tokens=4",
                  before=("--model", str(root / "model"), "--output", str(run)))) == 0
    files = {
        "empty.csv": "", "noprompt.csv": "foo,bar\nhello,harmful\n",
        "bad.jsonl": '{"prompt": "a", "type": "harmful"}\n{oops\n',
        "badtype.csv": "prompt,type\nhello,evil\n", "config.json": '{"steps": 3,\n "lr_attacker": }',
        "config_list.json": "[1, 2]", "config_bad.toml": "steps = = 3\n", "config_unknown.json": '{"colour": 1}',
        "xstest_nocols.csv": "foo,bar\n1,2\n", "plain.txt": "just a file\n",
        "xstest_ok.csv": "prompt,label,type\nHow do I kill a Python process?,safe,homonyms\n",
    }
    for name, text in files.items():
        (root / name).write_text(text)
    (root / "latin1.csv").write_bytes("prompt,type\nol\xe9,harmful\n".encode("latin-1"))
    (root / "latin1.json").write_bytes('{"steps": "\xe9"}'.encode("latin-1"))
    (root / "adir").mkdir()
    # a foreign folder, a model-like folder and a metrics-only folder: never written into
    (root / "foreign").mkdir()
    (root / "foreign" / "notes.txt").write_text("mine\n")
    (root / "metrics_only").mkdir()
    (root / "metrics_only" / "metrics.jsonl").write_text("".join(json.dumps({"step": i}) + "\n" for i in range(8)))
    # broken model directories
    for name in ("model_truncated", "model_badconfig", "model_arch", "model_noconfig"):
        shutil.copytree(root / "model", root / name)
    shutil.copytree(root / "model", root / "model_tokenizer_truncated")
    tokenizer_file = root / "model_tokenizer_truncated" / "tokenizer.json"
    tokenizer_file.write_bytes(tokenizer_file.read_bytes()[:5000])
    weights = root / "model_truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    (root / "model_badconfig" / "config.json").write_text('{"model_type": ')
    config = json.loads((root / "model_arch" / "config.json").read_text())
    (root / "model_arch" / "config.json").write_text(json.dumps({**config, "model_type": "gpt_neox"}))
    (root / "model_noconfig" / "config.json").unlink()
    # broken adapters (copies of the run's defender)
    for name in ("adapter_rank", "adapter_truncated", "adapter_badconfig", "adapter_nolora"):
        shutil.copytree(run / "defender", root / name)
    adapter_config = json.loads((root / "adapter_rank" / "adapter_config.json").read_text())
    (root / "adapter_rank" / "adapter_config.json").write_text(json.dumps({**adapter_config, "r": 8}))
    adapter_weights = root / "adapter_truncated" / "adapter_model.safetensors"
    adapter_weights.write_bytes(adapter_weights.read_bytes()[:500])
    (root / "adapter_badconfig" / "adapter_config.json").write_text("{")
    (root / "adapter_nolora" / "adapter_config.json").write_text(json.dumps({**adapter_config, "peft_type": "IA3"}))
    # broken checkpoints (copies of the run)
    for name in ("run_optimizer", "run_state", "run_latest"):
        shutil.copytree(run, root / name)
        (root / name / ".abs-fast-lock").unlink(missing_ok=True)
    step = sorted((root / "run_optimizer" / "checkpoints").glob("step_*"))[-1]
    optimizer = step / "optimizer.safetensors"
    optimizer.write_bytes(optimizer.read_bytes()[:700])
    (sorted((root / "run_state" / "checkpoints").glob("step_*"))[-1] / "state.json").write_text("{")
    (root / "run_latest" / "checkpoints" / "latest").write_text("step_999999\n")
    # hostile files: a run directory whose lock is a link to someone's file, a FIFO, a symbolic link loop,
    # seeds with a lone surrogate or a NUL byte (JSON escapes), a config value of 300k characters
    (root / "victim.txt").write_text("someone else's file\n")
    (root / "run_symlock").mkdir()
    (root / "run_symlock" / ".abs-fast-run").write_text('{"kind": "train"}\n')
    (root / "run_symlock" / ".abs-fast-lock").symlink_to(root / "victim.txt")
    os.mkfifo(root / "fifo.json")
    os.mkfifo(root / "fifo.csv")
    (root / "loop.json").symlink_to(root / "loop2.json")
    (root / "loop2.json").symlink_to(root / "loop.json")
    (root / "surrogate.jsonl").write_text('{"prompt": "fine", "type": "benign"}\n{"prompt": "bad \\ud800 here", '
                                          '"type": "harmful"}\n')
    (root / "nul.jsonl").write_text('{"prompt": "a\\u0000b", "type": "harmful"}\n')
    (root / "config_huge.json").write_text(json.dumps({"steps": "9" * 10 + "x" * 300_000}))
    # runs whose saved state must not be resumed or played: NaN adapters, a pointer out of the run
    for name in ("run_rank", "run_nan", "run_outside"):
        shutil.copytree(run, root / name)
        (root / name / ".abs-fast-lock").unlink(missing_ok=True)
    from safetensors.torch import load_file, save_file

    for adapters in (sorted((root / "run_nan" / "checkpoints").glob("step_*"))[-1] / "adapters" / "defender",):
        tensors = load_file(adapters / "adapter_model.safetensors")
        save_file({k: v * float("nan") for k, v in tensors.items()}, adapters / "adapter_model.safetensors")
    shutil.copytree(run / "defender", root / "adapter_nan")
    tensors = load_file(root / "adapter_nan" / "adapter_model.safetensors")
    save_file({k: v * float("nan") for k, v in tensors.items()}, root / "adapter_nan" / "adapter_model.safetensors")
    step = sorted((root / "run_outside" / "checkpoints").glob("step_*"))[-1].name
    (root / "run_outside" / "checkpoints" / "latest").write_text(f"../../run/checkpoints/{step}\n")
    # a demo run (train must not take it) and a broken results folder for report
    (root / "demo").mkdir()
    (root / "demo" / ".abs-fast-run").write_text('{"kind": "demo"}\n')
    (root / "results").mkdir()
    (root / "results" / "eval.json").write_text("{ not json")
    return root


def _snapshot(root: Path) -> dict[str, object]:
    """Content hashes (files over 1 MiB, the weights: size and modification time, to stay fast)."""
    out: dict[str, object] = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != ".abs-fast-lock" and ".cache" not in p.parts:
            stat = p.stat()
            out[str(p.relative_to(root))] = (stat.st_size, stat.st_mtime_ns) if stat.st_size > 2**20 else \
                hashlib.sha1(p.read_bytes()).hexdigest()
    return out


W = "{w}"  # replaced by the world directory
CASES = [
    # --- train: hyper-parameters and config keys
    ("lr-nan", T("lr_attacker=nan"), "lr_attacker"),
    ("lr-inf", T("lr_defender=inf"), "lr_defender"),
    ("kl-nan", T("kl_beta=nan"), "kl_beta"),
    ("clip-nan", T("grad_clip=nan"), "grad_clip"),
    ("temperature-inf", T("temperature=inf"), "temperature"),
    ("lr-absurd", T("lr_attacker=5"), "lr_attacker"),
    ("beta-one", T("adam_beta2=1"), "adam_beta2"),
    ("device-banana", T("device=banana"), "banana"),
    ("device-cuda-absent", T("device=cuda:7"), "cuda:7"),
    ("engine-huge", T("engine_max_batch=65536"), "GiB"),
    ("prompt-budget", T("max_prompt_tokens=1"), "max_prompt_tokens"),
    ("steps-zero", T("steps=0"), "steps"),
    ("unknown-key", T("colour=1"), "colour"),
    ("steps-text", T("steps=abc"), "steps"),
    ("mode-bad", T("mode=banana"), "mode"),
    ("set-no-equals", T("steps"), "steps"),
    ("nonfinite-patience", T("max_nonfinite_steps=0"), "max_nonfinite_steps"),
    ("wildguard-no-model", T("judge=wildguard"), "judge_model"),
    ("wildguard-missing", T("judge=wildguard", "judge_model={w}/nope"), "{w}/nope"),
    # --- train: seed files
    ("seeds-missing", T("seeds={w}/missing.csv"), "{w}/missing.csv"),
    ("seeds-empty", T("seeds={w}/empty.csv"), "{w}/empty.csv"),
    ("seeds-no-prompt", T("seeds={w}/noprompt.csv"), "{w}/noprompt.csv"),
    ("seeds-bad-jsonl", T("seeds={w}/bad.jsonl"), "{w}/bad.jsonl:2"),
    ("seeds-bad-type", T("seeds={w}/badtype.csv"), "{w}/badtype.csv:2"),
    ("seeds-latin1", T("seeds={w}/latin1.csv"), "{w}/latin1.csv"),
    ("seeds-directory", T("seeds={w}/adir"), "is a directory"),
    ("seeds-bad-kind", T("seeds=evil={w}/plain.txt"), "evil"),
    # --- train: config files
    ("config-missing", ["train", "--config", "{w}/missing.json"], "{w}/missing.json"),
    ("config-bad-json", ["train", "--config", "{w}/config.json"], "{w}/config.json:2"),
    ("config-list", ["train", "--config", "{w}/config_list.json"], "{w}/config_list.json"),
    ("config-bad-toml", ["train", "--config", "{w}/config_bad.toml"], "{w}/config_bad.toml"),
    ("config-unknown", ["train", "--config", "{w}/config_unknown.json"], "colour"),
    ("config-latin1", ["train", "--config", "{w}/latin1.json"], "{w}/latin1.json"),
    ("config-directory", ["train", "--config", "{w}/adir"], "is a directory"),
    # --- train: models
    ("model-file", T(before=("--model", "{w}/plain.txt",)), "{w}/plain.txt"),
    ("model-missing", T(before=("--model", "{w}/nope",)), "{w}/nope"),
    ("model-no-config", T(before=("--model", "{w}/model_noconfig",)), "config.json"),
    ("model-bad-config", T(before=("--model", "{w}/model_badconfig",)), "{w}/model_badconfig/config.json"),
    ("model-arch", T(before=("--model", "{w}/model_arch",)), "gpt_neox"),
    ("model-truncated", T(before=("--model", "{w}/model_truncated",)), "{w}/model_truncated/model.safetensors"),
    ("tokenizer-truncated", T(before=("--model", "{w}/model_tokenizer_truncated",)),
     "{w}/model_tokenizer_truncated: its tokenizer files"),
    # --- train: output directories and checkpoints
    ("output-file", T(before=("--output", "{w}/plain.txt",)), "{w}/plain.txt"),
    ("output-under-file", T(before=("--output", "{w}/plain.txt/run",)), "plain.txt"),
    ("output-foreign", T(before=("--output", "{w}/foreign",)), "{w}/foreign"),
    ("output-model-dir", T(before=("--output", "{w}/model",)), "{w}/model"),
    ("output-metrics-only", T(before=("--output", "{w}/metrics_only",)), "{w}/metrics_only"),
    ("output-demo-run", T(before=("--output", "{w}/demo",)), "demo run"),
    ("output-existing-run", T(before=("--output", "{w}/run",)), "--resume"),
    ("resume-none", ["train", "--resume", "--output", "{w}/adir"], "{w}/adir"),
    ("resume-optimizer", ["train", "--resume", "--output", "{w}/run_optimizer", "--model", "{w}/model"],
     "optimizer.safetensors"),
    ("resume-state", ["train", "--resume", "--output", "{w}/run_state", "--model", "{w}/model"], "state.json"),
    ("resume-latest", ["train", "--resume", "--output", "{w}/run_latest", "--model", "{w}/model"], "latest"),
    # --- demo
    ("demo-steps-zero", ["demo", "--steps", "0", "--output", "{w}/demo_new", "--quiet"], "--steps"),
    ("demo-output-file", ["demo", "--output", "{w}/plain.txt", "--quiet"], "{w}/plain.txt"),
    ("demo-output-train-run", ["demo", "--output", "{w}/run", "--quiet"], "{w}/run"),
    ("demo-output-foreign", ["demo", "--output", "{w}/foreign", "--quiet"], "{w}/foreign"),
    ("demo-output-model", ["demo", "--output", "{w}/model", "--quiet"], "{w}/model"),
    # --- eval
    ("eval-limit", ["eval", "--policy", "{w}/run", "--suite", "xstest={w}/xstest_nocols.csv", "--limit", "-1"],
     "--limit"),
    ("eval-no-suite", ["eval", "--policy", "{w}/run"], "--suite"),
    ("eval-policy-missing", ["eval", "--policy", "{w}/nope", "--suite", "xstest={w}/plain.txt"], "{w}/nope"),
    ("eval-suite-name", ["eval", "--policy", "{w}/run", "--suite", "badname={w}/plain.txt"], "badname"),
    ("eval-suite-missing", ["eval", "--policy", "{w}/run", "--suite", "xstest={w}/missing.csv"], "{w}/missing.csv"),
    ("eval-suite-columns", ["eval", "--policy", "{w}/run", "--suite", "xstest={w}/xstest_nocols.csv"],
     "{w}/xstest_nocols.csv"),
    ("eval-suite-directory", ["eval", "--policy", "{w}/run", "--suite", "xstest={w}/adir"], "is a directory"),
    ("eval-adapter-rank", ["eval", "--policy", "{w}/adapter_rank", "--model", "{w}/model", "--suite",
                           "xstest={w}/xstest_ok.csv", "--quiet"], "r=8"),
    ("eval-adapter-truncated", ["eval", "--policy", "{w}/adapter_truncated", "--model", "{w}/model", "--suite",
                                "xstest={w}/xstest_ok.csv", "--quiet"], "adapter_model.safetensors"),
    ("eval-adapter-config", ["eval", "--policy", "{w}/adapter_badconfig", "--model", "{w}/model", "--suite",
                             "xstest={w}/noprompt.csv"], "adapter_config.json"),
    ("eval-adapter-type", ["eval", "--policy", "{w}/adapter_nolora", "--model", "{w}/model", "--suite",
                           "xstest={w}/noprompt.csv"], "IA3"),
    # --- crossplay
    ("crossplay-limit", ["crossplay", "--attackers", "{w}/run", "--defenders", "base", "--seeds", "builtin",
                         "--limit", "0"], "--limit"),
    ("crossplay-seeds", ["crossplay", "--attackers", "{w}/run", "--defenders", "base", "--seeds", "{w}/missing.csv"],
     "{w}/missing.csv"),
    ("crossplay-attacker", ["crossplay", "--attackers", "{w}/nope", "--defenders", "base", "--seeds", "builtin"],
     "{w}/nope"),
    ("crossplay-seeds-latin1", ["crossplay", "--attackers", "{w}/run", "--defenders", "base", "--seeds",
                                "{w}/latin1.csv"], "{w}/latin1.csv"),
    # --- exploit
    ("exploit-steps", ["exploit", "--defender", "{w}/run", "--steps", "0"], "--steps"),
    ("exploit-defender", ["exploit", "--defender", "{w}/nope", "--steps", "1"], "{w}/nope"),
    ("exploit-output-foreign", ["exploit", "--defender", "{w}/run", "--steps", "1", "--output", "{w}/foreign"],
     "{w}/foreign"),
    # --- report
    ("report-output-file", ["report", "{w}/run", "--output", "{w}/plain.txt"], "{w}/plain.txt"),
    ("report-output-foreign", ["report", "{w}/run", "--output", "{w}/foreign"], "{w}/foreign"),
    ("report-missing", ["report", "{w}/nope", "--output", "{w}/report_new"], "{w}/nope"),
    ("report-corrupt", ["report", "{w}/results", "--output", "{w}/report_new2"], "{w}/results/eval.json"),
    # --- plan
    ("plan-gpu-memory", ["plan", "--preset", "tiny", "--gpu-memory", "lots"], "lots"),
    # --- hostile input, round 2: links and special files
    ("lock-symlink", T(before=("--output", "{w}/run_symlock")), ".abs-fast-lock is a symbolic link"),
    ("config-fifo", ["train", "--config", "{w}/fifo.json"], "named pipe"),
    ("seeds-fifo", T("seeds={w}/fifo.csv"), "named pipe"),
    ("config-loop", ["train", "--config", "{w}/loop.json"], "symbolic link loop"),
    ("seeds-loop", T("seeds={w}/loop.json"), "symbolic link loop"),
    ("eval-suite-fifo", ["eval", "--policy", "{w}/run", "--suite", "xstest={w}/fifo.csv"], "named pipe"),
    # ranges
    ("samples-huge", T("samples_per_prompt=1000000"), "samples_per_prompt"),
    ("rank-huge", T("lora_rank=100000"), "lora_rank"),
    ("games-per-step", T("rollout_batch_size=65536", "samples_per_prompt=256"), "samples_per_prompt"),
    ("judge-seq-huge", T("judge_max_seq_len=99999999"), "judge_max_seq_len"),
    # resume drift and non-finite state
    ("resume-rank", ["train", "--resume", "--output", "{w}/run_rank", "--set", "lora_rank=4"], "lora_rank was 16"),
    ("resume-alpha", ["train", "--resume", "--output", "{w}/run_rank", "--set", "lora_alpha=8"], "lora_alpha"),
    ("resume-targets", ["train", "--resume", "--output", "{w}/run_rank", "--set", "target_modules=q_proj"],
     "target_modules"),
    ("resume-nan", ["train", "--resume", "--output", "{w}/run_nan"], "NaN"),
    ("resume-outside", ["train", "--resume", "--output", "{w}/run_outside"], "checkpoint pointer"),
    ("eval-nan-adapter", ["eval", "--policy", "{w}/adapter_nan", "--model", "{w}/model", "--suite",
                          "xstest={w}/xstest_ok.csv", "--quiet"], "NaN"),
    # zero means zero, or is refused
    ("eval-max-new-tokens-zero", ["eval", "--policy", "{w}/run", "--suite", "xstest={w}/xstest_ok.csv",
                                  "--max-new-tokens", "0"], "--max-new-tokens"),
    ("eval-attack-samples-zero", ["eval", "--policy", "{w}/run", "--suite", "xstest={w}/xstest_ok.csv",
                                  "--attack-samples", "0"], "--attack-samples"),
    ("crossplay-max-new-tokens-zero", ["crossplay", "--attackers", "{w}/run", "--defenders", "base", "--seeds",
                                       "builtin", "--max-new-tokens", "0"], "--max-new-tokens"),
    # SGLang's argparse expands prefixes: --hos is --host
    ("sglang-host-prefix", T("rollout_engine=sglang", "sglang_args=--hos 0.0.0.0",
                             before=("--model", "{w}/model", "--output", "{w}/run_sglang")), "--host"),
    # odd text
    ("seeds-surrogate", T("seeds={w}/surrogate.jsonl"), "{w}/surrogate.jsonl:2"),
    ("seeds-nul", T("seeds={w}/nul.jsonl"), "NUL byte"),
    ("config-nul", T("tokenizer=a\x00b"), "NUL byte"),
    ("config-huge-value", ["train", "--config", "{w}/config_huge.json"], "(300012 characters)"),
    # a file name in another encoding: refused before any work, for every command
    ("output-not-utf8", T(before=("--output", "{w}/r\udcff",)), "byte 0xff"),
    ("report-not-utf8", ["report", "{w}/run", "--output", "{w}/r\udce9"], "byte 0xe9"),
    ("seeds-not-utf8", T("seeds={w}/s\udcff.csv"), "not UTF-8"),
]


def test_the_table_has_100_cases_across_the_commands():
    assert len(CASES) >= 100
    assert {argv[0] for _, argv, _ in CASES} >= {"train", "demo", "eval", "crossplay", "exploit", "report"}


@pytest.mark.parametrize(("name", "argv", "culprit"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_exits_2_names_the_culprit_and_changes_nothing(world, name, argv, culprit, capsys, monkeypatch):
    monkeypatch.chdir(world)
    monkeypatch.setenv("ABS_FAST_CACHE", str(world / ".cache"))
    args = [a.replace(W, str(world)) for a in argv]
    before = _snapshot(world)
    code = main(args)
    out, err = capsys.readouterr()
    assert code == 2, f"exit {code}\nstdout: {out[-2000:]}\nstderr: {err[-2000:]}"
    assert "Traceback" not in err and "Traceback" not in out
    message = err.strip().splitlines()[-1] if err.strip() else ""
    assert culprit.replace(W, str(world)) in err, f"the message does not name {culprit!r}: {err[-1500:]}"
    assert message.startswith("abs-fast ") or "usage:" in err, err[-1500:]
    after = _snapshot(world)
    changed = sorted(k for k in before if after.get(k) != before[k])
    assert not changed, f"pre-existing files changed or vanished: {changed[:10]}"


def test_nonfinite_updates_roll_back_and_stop_the_run(world, tmp_path, capsys, monkeypatch):
    """An update that leaves a non-finite adapter rolls back (parameters and Adam state); after
    max_nonfinite_steps such steps in a row the run stops with exit 3, adapters finite and unchanged."""
    import abs_fast.train.update as update

    monkeypatch.setattr(update, "_parameters_finite", lambda optimizer: False)
    out = tmp_path / "run"
    code = main(T("steps=6", "max_nonfinite_steps=2", "rollout_batch_size=2", "train_batch_size=2",
                  "diagnostics_every=0", "attacker_max_new_tokens=4", "defender_max_new_tokens=4", "checkpoint_every=1",
                  before=("--model", str(world / "model"), "--output", str(out))))
    err = capsys.readouterr().err
    assert code == 3 and "2 steps in a row" in err, err[-2000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(r["nonfinite_rolled_back"] >= 1 for r in records)
    from safetensors.torch import load_file

    checkpoints = sorted((out / "checkpoints").glob("step_*"))
    assert [c.name for c in checkpoints] == ["step_000001"], "a checkpoint was written at the stopping step"
    for name in ("attacker", "defender"):  # rolled back: still the fresh adapters (B = 0), all finite
        tensors = load_file(str(checkpoints[0] / "adapters" / name / "adapter_model.safetensors"))
        assert all(torch.isfinite(t).all() for t in tensors.values())
        assert all(not t.any() for k, t in tensors.items() if "lora_B" in k)


def test_rollback_restores_parameters_and_adam_state():
    import abs_fast.train.update as update

    p = torch.nn.Parameter(torch.randn(4, 3))
    opt = torch.optim.AdamW([{"params": [p], "name": "a"}], lr=1e-2)
    p.grad = torch.randn_like(p)
    opt.step()
    before_value, before_state = p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}
    snapshot = update._optimizer_snapshot(opt)
    p.grad = torch.full_like(p, float("nan"))
    opt.step()
    assert not update._parameters_finite(opt)
    update._restore(opt, snapshot)
    assert torch.equal(p.detach(), before_value)
    for key, value in before_state.items():
        assert torch.equal(opt.state[p][key], value), key


def _wait_for(predicate, timeout=120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def test_a_second_process_on_the_same_run_directory_is_refused_with_the_holders_pid(world, tmp_path):
    out = tmp_path / "shared"
    env = {**os.environ, "ABS_FAST_CACHE": str(world / ".cache"), "ABS_FAST_BACKEND": "reference"}
    command = [sys.executable, "-m", "abs_fast.cli", *T("steps=1000", "diagnostics_every=0", "rollout_batch_size=2",
                                                        "train_batch_size=2", "attacker_max_new_tokens=4",
                                                        "defender_max_new_tokens=4",
                                                        before=("--model", str(world / "model"), "--output", str(out)))]
    first = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        lock = out / ".abs-fast-lock"
        assert _wait_for(lambda: lock.is_file() and lock.read_text().strip() == str(first.pid)), \
            "the first run never took its lock"
        start = time.monotonic()
        second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr
        assert f"PID {first.pid}" in second.stderr and "Traceback" not in second.stderr
        assert time.monotonic() - start < 60
        assert first.poll() is None, "the first run stopped"
    finally:
        first.kill()
        first.wait()


# --- hostile input, round 2: what is not a refusal ------------------------------------------------

def test_text_with_a_byte_order_mark_and_paths_with_commas_load(tmp_path):
    """A CSV saved with a UTF-8 byte order mark reads its header as written; a seed path holding a comma
    is given in double quotes."""
    from abs_fast.game import load_seeds
    from abs_fast.train import apply_overrides, preset_config

    path = tmp_path / "with,comma.csv"
    path.write_bytes("\ufeffprompt,type\nhello there,benign\n".encode())
    assert [s.prompt for s in load_seeds(path)] == ["hello there"]
    config = apply_overrides(preset_config("tiny"), [f'seeds="{path}",builtin'])
    assert config.seeds == [str(path), "builtin"]


def test_a_full_disk_while_saving_names_the_file_and_keeps_the_checkpoint(world, tmp_path, capsys, monkeypatch):
    """safetensors reports a full disk with its own error type, not an OSError: the save names the file
    and what to do, exits 2, and the run's previous checkpoint stays whole."""
    import safetensors.torch
    from safetensors import SafetensorError

    from abs_fast.train import latest_checkpoint

    run = tmp_path / "run"
    assert main(T("steps=1", "checkpoint_every=1", "rollout_batch_size=2", "train_batch_size=2",
                  "attacker_max_new_tokens=4", "defender_max_new_tokens=4", "diagnostics_every=0",
                  before=("--model", str(world / "model"), "--output", str(run)))) == 0
    saved = latest_checkpoint(run)

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")
    monkeypatch.setattr(safetensors.torch, "save_file", full)
    capsys.readouterr()
    code = main(["train", "--resume", "--output", str(run), "--set", "steps=2"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err[-2000:]
    assert "cannot write" in err and "safetensors" in err and "disk" in err, err[-1000:]
    assert latest_checkpoint(run) == saved


def test_a_full_disk_when_the_run_starts_names_the_lock_file(world, tmp_path, capsys, monkeypatch):
    """No space for the lock's PID (an injected ENOSPC): exit 2 naming the lock file and what to do."""
    import errno

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "pwrite", full)
    run = tmp_path / "run"
    code = main(T("steps=1", before=("--model", str(world / "model"), "--output", str(run))))
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err[-2000:]
    assert f"cannot write {run / '.abs-fast-lock'}" in err and "free some disk space" in err, err[-1000:]


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    if os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_a_disk_that_fills_mid_run_stops_cleanly_and_resumes_equal(world, tmp_path):
    """A real full disk (a 1.5 MB tmpfs; root only): the second checkpoint does not fit. The run exits 2
    naming the file, leaves no staging directory and keeps the first checkpoint; moved to a larger disk,
    it resumes to adapters bitwise equal to a run that never stopped."""
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "1500k"):
        pytest.skip("mounting a tmpfs needs root (the injected ENOSPC tests cover the rest)")
    env = {**os.environ, "ABS_FAST_CACHE": str(world / ".cache"), "ABS_FAST_BACKEND": "reference"}
    settings = ["steps=3", "checkpoint_every=1", "rollout_batch_size=2", "train_batch_size=2", "seed=3",
                "attacker_max_new_tokens=4", "defender_max_new_tokens=4", "diagnostics_every=0"]

    def train(output: Path, *extra: str, steps: str = "steps=3") -> subprocess.CompletedProcess:
        argv = T(*settings, steps, before=("--model", str(world / "model"), "--output", str(output), *extra))
        return subprocess.run([sys.executable, "-m", "abs_fast.cli", *argv], env=env, capture_output=True, text=True,
                              timeout=600)
    try:
        full = train(disk / "run")
        assert full.returncode == 2, full.stderr[-2000:]
        assert "Traceback" not in full.stderr
        last = full.stderr.strip().splitlines()[-1]
        assert str(disk / "run" / "checkpoints") in last and "No space left on device" in last, last
        assert "previous checkpoint is intact" in last, last
        checkpoints = disk / "run" / "checkpoints"
        assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step_000001"]
        shutil.copytree(disk / "run", tmp_path / "moved")
    finally:
        subprocess.run(["umount", str(disk)], check=False)
    (tmp_path / "moved" / ".abs-fast-lock").unlink(missing_ok=True)
    resumed = train(tmp_path / "moved", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    straight = train(tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr[-2000:]
    for name in ("attacker", "defender"):
        assert (tmp_path / "moved" / name / "adapter_model.safetensors").read_bytes() == \
            (tmp_path / "straight" / name / "adapter_model.safetensors").read_bytes(), name
