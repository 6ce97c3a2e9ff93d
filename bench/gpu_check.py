"""Every GPU claim of abs-fast, measured in one run: the driver behind scripts/gpu-check.sh.

Stages run most-valuable first, each in its own process group with its own time limit (a stage
that runs out is killed whole, pytest and all), under one deadline for the whole run, so a run cut
short still reports what finished. Each figure is appended to OUT/figures.jsonl the moment it is
measured; after every stage OUT/gpu-check.json and OUT/gpu-check.md are rewritten from what exists.
Every stage shares one Triton cache (OUT/triton-cache, or TRITON_CACHE_DIR): what the compile stage
builds, the timed stages find built.

    compile      stage 0: every Triton variant a 7B self-play step and a decode wave launch, compiled
                 and autotuned before anything is timed; how long that took and how many it built
    environment  abs-fast info, nvidia-smi, measured copy bandwidth and matrix-product rate (the
                 ceilings every later figure is compared with)
    gpu_tests    pytest -m gpu, pass/fail per test
    kernels      lora_linear vs PEFT and vs the base GEMM; NF4 fused vs buffer vs bitsandbytes; NF4
                 decode bandwidth at 1/16/64/256 rows; token_logprobs vs full logits
    decode       embedded-engine decode tokens/s (NF4 base, mixed adapters) vs HF generate + PEFT over
                 bitsandbytes and vs the bytes-per-step roofline; then the poll_every sweep
    selfplay     one self-play step, seconds per phase and peak memory, vs HF + PEFT
    presets      each preset's peak memory as it would run (reserved by the allocator plus the CUDA
                 context), vs the planner and the GPU it claims

--smoke runs every stage at tiny shapes on whatever device there is (CPU in CI) in under 3 minutes,
so the script cannot rot between GPU sessions; its numbers mean nothing.

    python bench/gpu_check.py OUT_DIR [--smoke] [--stages a,b]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent


@dataclass(frozen=True)
class Stage:
    name: str
    gpu_limit_s: int
    smoke_limit_s: int
    budget: str  # how gpu_limit_s was reckoned


# The budget. The device gives a session 15 minutes, machine start-up included; the script gets 9 of
# them: about 1 for the wheel install and the native build (sm_90 only), DEADLINE_S for the stages.
# Each stage's limit is its work on an H200 plus its Triton compiles. Compiles are counted on CPU by
# the compile census (tests/test_compile_census.py: at most COMPILE_VARIANTS variants for a 7B step
# with 40 micro-batches of 1k-16k tokens plus decode batches of 1-256 rows and the log-prob pass), at
# about 1.5 s each on the device machine's 16 cores (3-4 s measured for one sm_90 compile on 2 cores;
# ptxas is single-threaded, Triton compiles one variant at a time per process). The compile stage
# pays for them once; the timed stages then find them in the shared cache. A smoke run's stages take
# 10-20 s each on 2 CPU cores; their limit (90 s) only catches a hang, on a slow or busy machine too.
COMPILE_VARIANTS = 32
COMPILE_SECONDS_EACH = 1.5
DEADLINE_S = 470
STAGES = (
    Stage("compile", 110, 90, f"{COMPILE_VARIANTS} variants x {COMPILE_SECONDS_EACH} s + 7B weights drawn on the GPU"),
    Stage("environment", 30, 90, "2 GiB copy and 8192^3 GEMM, 100 ms each, plus nvidia-smi and abs-fast info"),
    Stage("gpu_tests", 90, 90, "about 25 gpu-marked tests at small shapes, each under 3 s once compiled"),
    Stage("kernels", 70, 90, "14 layer shapes x 3 variants x ~1 s of do_bench, NF4 and log-prob cases"),
    Stage("decode", 60, 90, "7B engine at 64 and 256 rows (2 x 80 tokens each), HF baseline at 64, poll sweep"),
    Stage("selfplay", 60, 90, "one 7B step of 64 games twice (warm-up, timed) and the HF + PEFT step"),
    Stage("presets", 50, 90, "4 presets: build (weights on the GPU), prefill, one update"),
)
FIGURE_FIELDS = ("name", "value", "unit", "compared_with", "shapes", "dtype", "device", "versions", "commit", "stage")
COMPARED_FIELDS = ("name", "value", "unit", "ratio")


# ---------------------------------------------------------------------------------------------
# Recording (child side)
# ---------------------------------------------------------------------------------------------

def _commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("ABS_FAST_COMMIT", "unknown")


class Recorder:
    """Appends one JSON line per figure to OUT/figures.jsonl, flushed at once (a killed stage keeps them)."""

    def __init__(self, out: Path, stage: str, smoke: bool):
        import torch

        self.path, self.stage, self.smoke = out / "figures.jsonl", stage, smoke
        self.cuda = torch.cuda.is_available()
        self.device = torch.cuda.get_device_name() if self.cuda else f"cpu ({platform.processor() or 'x86_64'})"
        try:
            import triton
            triton_version = triton.__version__
        except ImportError:
            triton_version = None
        self.versions = {"torch": torch.__version__, "triton": triton_version}
        self.commit = os.environ.get("ABS_FAST_COMMIT") or _commit()
        self.references = _read_json(out / "references.json") or {}

    def figure(self, name: str, value: float | None, unit: str, compared_name: str, compared_value: float | None,
               compared_unit: str | None = None, ratio: float | None = None, shapes: str = "", dtype: str = "",
               **extra) -> dict:
        """ratio: value / compared_value unless given (None when either is missing)."""
        if ratio is None and value is not None and compared_value:
            ratio = value / compared_value
        record = {"name": name, "value": _rounded(value), "unit": unit,
                  "compared_with": {"name": compared_name, "value": _rounded(compared_value),
                                    "unit": compared_unit or unit, "ratio": _rounded(ratio)},
                  "shapes": shapes, "dtype": dtype, "device": self.device, "versions": self.versions,
                  "commit": self.commit, "stage": self.stage, **extra}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        print(f"  {name}: {value if value is None else f'{value:.4g}'} {unit}"
              + ("" if ratio is None else f"  ({ratio:.3g}x {compared_name})"), flush=True)
        return record

    def reference(self, key: str, value: float) -> None:
        self.references[key] = value
        (self.path.parent / "references.json").write_text(json.dumps(self.references, indent=1))


def _rounded(x):
    return None if x is None or not math.isfinite(x) else float(f"{x:.5g}")


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def median_seconds(fn, smoke: bool, rep_ms: int = 100) -> float:
    """Median seconds of fn(): CUDA events through triton.testing.do_bench on a GPU (warmed up), a
    host clock around a few calls on CPU."""
    import torch

    if torch.cuda.is_available():
        from triton.testing import do_bench

        return do_bench(fn, warmup=max(10, rep_ms // 4), rep=rep_ms, return_mode="median") / 1e3
    fn()
    times = []
    for _ in range(2 if smoke else 5):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _wall(fn) -> float:
    _sync()
    start = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - start


def _peak(fn) -> tuple[float, int | None]:
    """(seconds, peak CUDA bytes allocated during fn; None on CPU)."""
    import torch

    if not torch.cuda.is_available():
        return _wall(fn), None
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    seconds = _wall(fn)
    return seconds, torch.cuda.max_memory_allocated()


def _bench_modules():
    """The benchmark modules (their problems and baselines are the ones gpu-check measures)."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    import test_bench_lora_linear
    import test_bench_nf4
    import test_bench_rollout
    import test_bench_selfplay

    return test_bench_lora_linear, test_bench_nf4, test_bench_rollout, test_bench_selfplay


# ---------------------------------------------------------------------------------------------
# Stages (each runs in its own process: python gpu_check.py --run-stage NAME OUT)
# ---------------------------------------------------------------------------------------------

DATASHEET = {"H200": (4800.0, 989.0), "H100": (3350.0, 989.0), "A100": (2039.0, 312.0)}  # GB/s, dense bf16 TFLOP/s


def _copy_gbs(device: str, numel: int, smoke: bool) -> tuple[float, int]:
    import torch

    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    return 2 * src.nbytes / median_seconds(lambda: dst.copy_(src), smoke) / 1e9, src.nbytes


def _gemm_tflops(device: str, n: int, dtype, smoke: bool) -> float:
    import torch

    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    return 2 * n**3 / median_seconds(lambda: a @ b, smoke) / 1e12


def stage_compile(rec: Recorder, out: Path) -> None:
    """Stage 0: compile and autotune, into the shared Triton cache, every variant that a 7B self-play
    step (rollout waves, the no-grad log-prob pass, the packed update over micro-batches up to the
    token budget) and decode waves of 1 to 256 rows launch, before any stage is timed."""
    import torch

    from abs_fast.model import load_policy, load_qwen25_tokenizer
    from abs_fast.rollout import EmbeddedEngine

    _, _, rollout_bench, selfplay = _bench_modules()
    full = rec.cuda and not rec.smoke
    preset = "qwen2.5-7b" if full else "tiny"
    cache = Path(os.environ["TRITON_CACHE_DIR"])
    before, start = _cache_entries(cache), time.perf_counter()
    policy = load_policy(preset, quantize="nf4", device="cuda" if rec.cuda else "cpu")
    loaded = time.perf_counter() - start
    policy.gradient_checkpointing(True)
    games, prompt_len, new_tokens = (64, 256, 128) if full else (4, 16, 4)
    step = selfplay._abs_fast_step(policy, load_qwen25_tokenizer(), selfplay._Workload(games, prompt_len, new_tokens),
                                   token_budget=16384 if full else 256)
    step({})
    for rows in (1, 16, 64, 256) if full else (1, 4):
        engine = EmbeddedEngine(policy, max_batch=rows, max_seq_len=prompt_len + 8)
        with torch.no_grad():
            engine.generate(rollout_bench._greedy_half_and_half(rollout_bench._prompts(rows, prompt_len), 4))
        del engine
    _sync()
    seconds, built = time.perf_counter() - start, _cache_entries(cache) - before
    rec.figure("compile stage: Triton cache entries built", built, "entries", "the compile census bound",
               COMPILE_VARIANTS, shapes=f"{preset}: a step of {games} games, decode waves", dtype="")
    rec.figure("compile stage: seconds", seconds, "s", "its budget", next(s.gpu_limit_s for s in STAGES
                                                                         if s.name == "compile"),
               shapes=f"{preset}; {loaded:.0f} s of it loading the weights", dtype="")


def stage_environment(rec: Recorder, out: Path) -> None:
    import torch

    info = subprocess.run([sys.executable, "-m", "abs_fast.cli", "info", "--json"], capture_output=True, text=True,
                          timeout=60)
    (out / "abs-fast-info.json").write_text(info.stdout or info.stderr)
    if info.returncode != 0:
        raise RuntimeError(f"abs-fast info --json failed: {info.stderr[-2000:]}")
    try:
        smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as err:
        smi = f"nvidia-smi not available: {err}"
    (out / "nvidia-smi.txt").write_text(smi)
    sheet = next((v for k, v in DATASHEET.items() if rec.cuda and k in rec.device), (None, None))
    device = "cuda" if rec.cuda else "cpu"
    full = rec.cuda and not rec.smoke
    copy_gbs, nbytes = _copy_gbs(device, 2**29 if full else 2**24, rec.smoke)  # 2 GiB / 64 MiB of fp32
    rec.reference("copy_gbs", copy_gbs)
    rec.figure("copy bandwidth (read + write)", copy_gbs, "GB/s", "datasheet memory bandwidth" if sheet[0] else
               "none (this is the measured ceiling)", sheet[0], shapes=f"{nbytes / 2**30:.2f} GiB", dtype="fp32")
    n, dtype = (8192, torch.bfloat16) if full else (512, torch.bfloat16 if rec.cuda else torch.float32)
    tflops = _gemm_tflops(device, n, dtype, rec.smoke)
    rec.reference("gemm_tflops", tflops)
    rec.figure("matrix product rate", tflops, "TFLOP/s", "datasheet dense bf16 rate" if sheet[1] else
               "none (this is the measured ceiling)", sheet[1], shapes=f"{n}x{n}x{n}", dtype=str(dtype))


def stage_gpu_tests(rec: Recorder, out: Path) -> None:
    """pytest -m gpu; -v lines are parsed as they come, so a stage cut short keeps the verdicts so far."""
    log = out / "gpu-tests.log"
    command = [sys.executable, "-m", "pytest", str(REPO / "tests"), "-m", "gpu", "-v", "-p", "no:cacheprovider",
               "--no-header", "-rN", "--rootdir", str(REPO)]
    with open(log, "w") as f:
        proc = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, cwd=out, timeout=None)
    verdicts = parse_pytest_verdicts(log.read_text())
    (out / "gpu-tests.json").write_text(json.dumps(verdicts, indent=1))
    counts = {k: sum(1 for v in verdicts.values() if v == k) for k in ("PASSED", "FAILED", "ERROR", "SKIPPED")}
    ran = counts["PASSED"] + counts["FAILED"] + counts["ERROR"]
    rec.figure("gpu tests passed", counts["PASSED"], "tests", "gpu tests run (passed + failed + errors)", ran,
               shapes="", failed=sorted(k for k, v in verdicts.items() if v in ("FAILED", "ERROR")),
               skipped=counts["SKIPPED"], pytest_exit=proc.returncode)
    if proc.returncode not in (0, 5) and not rec.smoke:
        raise RuntimeError(f"pytest -m gpu exited {proc.returncode}: see gpu-tests.log")


def parse_pytest_verdicts(text: str) -> dict[str, str]:
    verdicts = {}
    for line in text.splitlines():
        m = re.match(r"^(\S+::\S+)\s+(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b", line)
        if m:
            verdicts[m.group(1)] = m.group(2)
    return verdicts


def _lora_case(rec: Recorder, lora_bench, shape: str, out_f: int, in_f: int) -> None:
    """lora_linear forward + backward: fused vs PEFT (two adapters, two passes) and vs the base GEMM."""
    problem = lora_bench.Problem(out_f, in_f)
    peft_problem = lora_bench.PeftProblem(problem)
    times = {}
    for variant, fn in (("fused", problem.fused), ("peft", peft_problem.run), ("base_only", problem.base_only)):
        def step(fn=fn):
            problem.clear_grads()
            fn()
        times[variant] = median_seconds(step, rec.smoke)
    where = f"[{lora_bench.TOKENS}, {in_f}] x [{out_f}, {in_f}], 2 adapters r={lora_bench.RANK}"
    dtype = str(lora_bench.DTYPE)
    rec.figure(f"lora_linear fwd+bwd {shape}", times["fused"] * 1e3, "ms", "PEFT LoRA, one pass per adapter",
               times["peft"] * 1e3, shapes=where, dtype=dtype)
    rec.figure(f"lora_linear fwd+bwd {shape} over the base GEMM", times["fused"] * 1e3, "ms",
               "base GEMM forward + input gradient alone", times["base_only"] * 1e3, shapes=where, dtype=dtype)


@contextlib.contextmanager
def _environ(name: str, value: str):
    """`name` set to `value` inside the block, then back to what it was (unset included)."""
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def _nf4_gemm_case(rec: Recorder, nf4_bench, shape: str, out_f: int, in_f: int, tokens: int) -> None:
    """NF4 base forward GEMM: decode-in-K-loop vs dequantise-to-buffer (the rule's two paths) vs bitsandbytes."""
    import bitsandbytes as bnb
    import torch

    from abs_fast.ops import lora_linear

    problem = nf4_bench.NF4Problem(out_f, in_f, tokens)
    x = problem.x.detach()
    no_adapters = (torch.empty(0, 16, in_f, device=x.device), torch.empty(0, out_f, 16, device=x.device),
                   torch.full((tokens,), -1, device=x.device, dtype=torch.int32), torch.empty(0, device=x.device))
    packed, state = problem.weight.to_bnb()
    packed_t = packed.t()
    times = {"bitsandbytes": median_seconds(lambda: bnb.matmul_4bit(x, packed_t, quant_state=state), rec.smoke)}
    paths = ("fused", "buffer") if rec.cuda else ("buffer",)  # the fused path is a Triton kernel
    backend = "triton" if rec.cuda else "reference"
    for path in paths:
        with _environ("ABS_FAST_NF4_PATH", path), torch.no_grad():
            times[path] = median_seconds(lambda: lora_linear(x, problem.weight, *no_adapters, backend=backend),
                                         rec.smoke)
    for path in paths:
        rec.figure(f"nf4 gemm fwd {shape} {path}", times[path] * 1e3, "ms", "bitsandbytes matmul_4bit",
                   times["bitsandbytes"] * 1e3, shapes=f"[{tokens}, {in_f}] x NF4 [{out_f}, {in_f}]",
                   dtype="bf16 activations")


def decode_roofline_gbs(copy_gbs: float | None, gemm_tflops: float | None, rows: int) -> float | None:
    """The packed-weight bandwidth an NF4 decode product of `rows` rows can reach at most: the copy
    bandwidth, or, where the products take longer, the bf16 matrix rate over the 4 * rows FLOPs each
    packed byte (two weights) costs. At 7B shapes on an H200 (4.3 TB/s, ~790 TFLOP/s measured) the
    products bind from ~46 rows: 70% of the copy bandwidth cannot be reached at 64 or 256 rows."""
    if not copy_gbs:
        return None
    if not gemm_tflops:
        return copy_gbs
    return min(copy_gbs, gemm_tflops * 1e3 / (4 * rows))


def _nf4_decode_case(rec: Recorder, nf4_bench, shape: str, out_f: int, in_f: int, rows: int) -> None:
    """The engine's own decode call for one projection (the layer, its routing built once, the NF4
    scales decoded once; whatever the dispatch picks at this row count): bytes of the packed NF4
    weight per second, as a fraction of the measured copy bandwidth and of the roofline (the bf16
    matrix rate binds at many rows). Up to 16 rows on a GPU, the native CUDA kernel is timed too
    (ABS_FAST_NF4_DECODE=native), against the dispatch's choice."""
    from abs_fast import native

    fn, path, nbytes = nf4_bench.engine_decode_call(out_f, in_f, rows)
    seconds = median_seconds(fn, rec.smoke)
    copy_gbs = rec.references.get("copy_gbs")
    roofline = decode_roofline_gbs(copy_gbs, rec.references.get("gemm_tflops"), rows)
    gbs = nbytes / seconds / 1e9
    where = f"[{rows}, {in_f}] x NF4 [{out_f}, {in_f}], the engine's call"
    dtype = "bf16 activations" if rec.cuda else "fp32 activations"
    rec.figure(f"nf4 decode {shape} rows {rows} ({path})", gbs, "GB/s", "measured copy bandwidth", copy_gbs,
               shapes=where, path=path, dtype=dtype, roofline_gbs=_rounded(roofline),
               fraction_of_roofline=_rounded(gbs / roofline) if roofline else None)
    if rec.cuda and rows <= 16 and path != "native" and native.cuda_library() is not None:
        with _environ("ABS_FAST_NF4_DECODE", "native"):
            fn, native_path, nbytes = nf4_bench.engine_decode_call(out_f, in_f, rows)
            native_gbs = nbytes / median_seconds(fn, rec.smoke) / 1e9
        rec.figure(f"nf4 decode {shape} rows {rows} ({native_path})", native_gbs, "GB/s", f"the {path} call", gbs,
                   shapes=where, path=native_path, dtype=dtype)
    if rec.cuda and path == "triton-decode":
        _register_decode_case(rec, shape, out_f, in_f, rows)


def _register_decode_case(rec: Recorder, shape: str, out_f: int, in_f: int, rows: int) -> None:
    """The decode matmul alone (no LoRA), its codes decoded in registers against looked up in a
    shared-memory table: the register decode was designed from machine-code counts, not timings."""
    import torch

    from abs_fast.ops import lora
    from abs_fast.quant import NF4Weight

    weight = NF4Weight.quantize(torch.randn(out_f, in_f, device="cuda")).with_scales()
    x = torch.randn(rows, in_f, device="cuda", dtype=torch.bfloat16)
    ids = torch.full((rows,), -1, dtype=torch.int32, device="cuda")
    seconds = {}
    for name, decode in (("register", lora.nf4_register_decode_for(torch.bfloat16)),
                         ("table", lora.NO_REGISTER_DECODE)):
        seconds[name] = median_seconds(lambda d=decode: lora.nf4_decode_matmul(x, weight, None, ids, None, None, d),
                                       rec.smoke)
    nbytes = weight.nbytes()
    rec.figure(f"nf4 decode matmul {shape} rows {rows} register decode", nbytes / seconds["register"] / 1e9, "GB/s",
               "table decode", nbytes / seconds["table"] / 1e9, shapes=f"[{rows}, {in_f}] x NF4 [{out_f}, {in_f}]",
               dtype="bf16 activations")


def _logprobs_case(rec: Recorder, rollout_bench, T: int, K: int, V: int) -> None:
    """token_logprobs forward + backward vs full logits + log_softmax: time, and peak memory on a GPU."""
    import torch

    dtype = torch.bfloat16 if rec.cuda else torch.float32
    results = {}
    for variant in ("fused", "full_logits"):
        fn = rollout_bench._logprob_fn(variant, *rollout_bench._logprob_problem(T, K, V, dtype))
        _, peak = _peak(fn)
        results[variant] = (median_seconds(fn, rec.smoke), peak)
    where = f"T={T} hidden={K} vocab={V}"
    rec.figure("token_logprobs fwd+bwd", results["fused"][0] * 1e3, "ms", "full logits + log_softmax",
               results["full_logits"][0] * 1e3, shapes=where, dtype=str(dtype))
    if rec.cuda:
        rec.figure("token_logprobs fwd+bwd peak memory", results["fused"][1] / 2**30, "GiB",
                   "full logits + log_softmax peak memory", results["full_logits"][1] / 2**30, shapes=where,
                   dtype=str(dtype))


def stage_kernels(rec: Recorder, out: Path) -> None:
    from abs_fast.model import linear_shapes

    lora_bench, nf4_bench, rollout_bench, _ = _bench_modules()
    full = rec.cuda and not rec.smoke
    if full:  # Qwen2.5-7B and 14B layer shapes, named like 7b-q_proj
        shapes = {f"{p.split('-')[1]}-{k}": v for p in ("qwen2.5-7b", "qwen2.5-14b")
                  for k, v in linear_shapes(p).items()}
    else:
        shapes = dict(list(lora_bench.SHAPES.items())[:2])
    for shape, (out_f, in_f) in shapes.items():
        _lora_case(rec, lora_bench, shape, out_f, in_f)
    nf4_shapes = {k: v for k, v in shapes.items() if k.endswith(("q_proj", "gate_proj", "down_proj"))} if full \
        else {"cpu-512x1024": (512, 1024)}
    for shape, (out_f, in_f) in nf4_shapes.items():
        _nf4_gemm_case(rec, nf4_bench, shape, out_f, in_f, tokens=8192 if full else 256)
    decode_shapes = {k: v for k, v in shapes.items() if k.endswith(("gate_proj", "down_proj"))} if full \
        else {"cpu-1024x1024": (1024, 1024)}
    for shape, (out_f, in_f) in decode_shapes.items():
        for rows in (1, 16, 64, 256):
            _nf4_decode_case(rec, nf4_bench, shape, out_f, in_f, rows)
    _logprobs_case(rec, rollout_bench, *((8192, 3584, 152064) if full else (256, 128, 8192)))


def _decode_bytes_per_step(policy, rows: int, context: int) -> int:
    """The fewest bytes one decode step must read: every weight except the embedding table (only
    `rows` of its rows), plus each row's K and V for `context` positions in every layer."""
    model = policy.model
    embed = model.model.embed_tokens.weight
    total = sum(t.nbytes for t in (*model.parameters(), *model.buffers()))
    total -= embed.nbytes - rows * embed.shape[1] * embed.element_size()
    arch = policy.config
    kv = 2 * arch.num_layers * arch.num_kv_heads * arch.head_dim * embed.element_size()
    return total + rows * context * kv


def _engine_decode_rate(rec: Recorder, rollout_bench, policy, rows: int, prompt: int, short: int, long: int,
                        poll_every: int | None = None):
    """Decode tokens/s of the embedded engine: (time of `long` new tokens - time of `short`) over the
    tokens between, so prefill cancels; both adapters mixed in one batch."""
    import torch

    from abs_fast.rollout import EmbeddedEngine
    from abs_fast.rollout.embedded import DEFAULT_POLL_EVERY

    engine = EmbeddedEngine(policy, max_batch=rows, max_seq_len=prompt + long,
                            poll_every=poll_every or DEFAULT_POLL_EVERY)
    prompts = rollout_bench._prompts(rows, prompt)

    def run(new_tokens):
        requests = rollout_bench._greedy_half_and_half(prompts, new_tokens)
        with torch.no_grad():
            return _wall(lambda: engine.generate(requests))

    run(short)  # warm-up: compilation, CUDA graph capture
    return rows * (long - short) / (min(run(long) for _ in range(2)) - min(run(short) for _ in range(2)))


def _hf_decode_rate(rec: Recorder, rollout_bench, nf4_bench, preset: str, rows: int, prompt: int, short: int,
                    long: int) -> float:
    """The same with HF generate + PEFT (over bitsandbytes NF4 on a GPU), one adapter after the other."""
    import peft
    import torch

    if rec.cuda and not rec.smoke:
        model = nf4_bench.hf_bnb_nf4_model(preset)
    else:
        from abs_fast.model import build_model

        model = build_model(preset, device="cuda" if rec.cuda else "cpu", dtype=torch.float32)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    config = lambda: peft.LoraConfig(r=16, lora_alpha=32, target_modules=targets)
    model = peft.get_peft_model(model, config(), adapter_name="attacker")
    model.add_adapter("defender", config())
    model.eval()
    prompts = rollout_bench._prompts(rows, prompt).to("cuda" if rec.cuda else "cpu")
    half = rows // 2

    def run(new_tokens):
        def fn():
            for name, ids in (("attacker", prompts[:half]), ("defender", prompts[half:])):
                model.set_adapter(name)
                model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                               pad_token_id=0)
        with torch.no_grad():
            return _wall(fn)

    run(short)
    return rows * (long - short) / (run(long) - run(short))


def stage_decode(rec: Recorder, out: Path) -> None:
    """Batch 64 against the roofline and against HF first (most valuable), then batch 256."""
    from abs_fast.model import load_policy

    _, nf4_bench, rollout_bench, _ = _bench_modules()
    full = rec.cuda and not rec.smoke
    preset = "qwen2.5-7b" if full else "tiny"
    # (rows, prompt tokens): decode at 1-2k context for batch 64, 0.5k for batch 256 (prefill time)
    cases = [(64, 1024), (256, 512)] if full else [(8, 32), (16, 16)]
    short, long = (16, 80) if full else (2, 6)
    policy = load_policy(preset, quantize="nf4", device="cuda" if rec.cuda else "cpu")
    dtype = str(next(policy.model.parameters()).dtype)
    copy_gbs = rec.references.get("copy_gbs")
    for i, (rows, prompt) in enumerate(cases):
        rate = _engine_decode_rate(rec, rollout_bench, policy, rows, prompt, short, long)
        step_bytes = _decode_bytes_per_step(policy, rows, prompt + (short + long) // 2)
        roofline = rows / (step_bytes / (copy_gbs * 1e9)) if copy_gbs else None
        where = f"{preset} NF4, {rows} rows (half attacker, half defender), prompt {prompt}, tokens {short}..{long}"
        rec.figure(f"engine decode {preset} batch {rows}", rate, "tokens/s",
                   "bytes-per-step roofline at the measured copy bandwidth", roofline, shapes=where, dtype=dtype,
                   bytes_per_step=step_bytes)
        if i == 0:
            hf_rate = _hf_decode_rate(rec, rollout_bench, nf4_bench, preset, rows, prompt, short, long)
            rec.figure(f"engine decode {preset} batch {rows} vs HF", rate, "tokens/s",
                       "HF generate + PEFT" + (" over bitsandbytes NF4" if full else " (dense)"), hf_rate,
                       shapes=where, dtype=dtype)
    # the poll interval (rollout/embedded.py DEFAULT_POLL_EVERY): the first case at 1, 4 and 32 steps
    # between host polls, against the default; last, so a stage cut short loses only this
    from abs_fast.rollout.embedded import DEFAULT_POLL_EVERY

    rows, prompt = cases[0]
    for poll in (1, 4, 32):
        rate = _engine_decode_rate(rec, rollout_bench, policy, rows, prompt, short, long, poll_every=poll)
        default = _engine_decode_rate(rec, rollout_bench, policy, rows, prompt, short, long)
        rec.figure(f"engine decode {preset} batch {rows} poll_every {poll}", rate, "tokens/s",
                   f"poll_every {DEFAULT_POLL_EVERY} (the default), measured beside it", default,
                   shapes=f"{preset} NF4, {rows} rows, prompt {prompt}", dtype=dtype)


def stage_selfplay(rec: Recorder, out: Path) -> None:
    import torch

    from abs_fast.model import load_policy, load_qwen25_tokenizer

    _, nf4_bench, _, selfplay = _bench_modules()
    cuda, smoke = rec.cuda, rec.smoke
    preset = "qwen2.5-7b" if cuda and not smoke else "tiny"
    games, prompt_len, new_tokens = (64, 256, 128) if cuda and not smoke else (4, 16, 4)
    work = selfplay._Workload(games, prompt_len, new_tokens)
    tokenizer = load_qwen25_tokenizer()
    device = "cuda" if cuda else "cpu"
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        policy = load_policy(preset, quantize="nf4", device=device)
        policy.gradient_checkpointing(True)
        step = selfplay._abs_fast_step(policy, tokenizer, work, token_budget=16384)
        step({})  # warm-up
        phases: dict[str, float] = {}
        seconds, peak = _peak(lambda: step(phases))
        results["abs_fast"] = (seconds, peak, phases)
        policy.save_adapters(Path(tmp))
        step = policy = None  # free the policy before the baseline loads its own
        if cuda:
            torch.cuda.empty_cache()
        if cuda and not smoke:
            base = nf4_bench.hf_bnb_nf4_model(preset)
        else:
            from abs_fast.model import build_model

            base = build_model(preset, device=device, dtype=torch.float32)
        base.gradient_checkpointing_enable()
        hf_step = selfplay._hf_peft_step(selfplay._peft_model(base, Path(tmp)), tokenizer, work, device)
        hf_step({})
        phases = {}
        seconds, peak = _peak(lambda: hf_step(phases))
        results["hf_peft"] = (seconds, peak, phases)
    where = f"{preset} NF4, {games} games, prompt {prompt_len}, {new_tokens} new tokens, heuristic judge"
    dtype = "bf16" if cuda else "fp32"
    ours, theirs = results["abs_fast"], results["hf_peft"]
    rec.figure(f"self-play step {preset}", ours[0], "s", "HF generate + PEFT step", theirs[0], shapes=where,
               dtype=dtype)
    for phase in selfplay.PHASES:
        rec.figure(f"self-play step {preset} phase {phase}", ours[2].get(phase, 0.0), "s",
                   f"HF + PEFT phase {phase}", theirs[2].get(phase, 0.0), shapes=where, dtype=dtype)
    if cuda:
        rec.figure(f"self-play step {preset} peak memory", ours[1] / 2**30, "GiB", "HF + PEFT peak memory",
                   theirs[1] / 2**30, shapes=where, dtype=dtype)


# The presets as the README says they run: (preset, built-in model shape, the GPU memory it claims)
PRESET_RUNS = (("consumer-24gb", "qwen2.5-7b", 24), ("qwen2.5-14b", "qwen2.5-14b", 80),
               ("qwen2.5-7b", "qwen2.5-7b", 80), ("qwen2.5-14b-h200", "qwen2.5-14b", 141))


def stage_presets(rec: Recorder, out: Path) -> None:
    """Each preset's policy, optimizer and engine built as `train` builds them, the rollout batch
    prefilled at its longest prompts, then one update over samples of the preset's longest lengths
    (enough of them that micro-batches reach the token budget), under a cap of the GPU memory the
    preset claims. The peak is compared with the planner's."""
    import torch

    from abs_fast.train import Sample, Trainer, apply_overrides, preset_config
    from abs_fast.train.memory import LiveTensorBytes, resident_bytes
    from abs_fast.train.plan import plan_memory

    cuda, smoke = rec.cuda, rec.smoke
    runs = PRESET_RUNS if cuda and not smoke else (("tiny", "tiny", None),)
    for preset, shape, gpu_gb in runs:
        with tempfile.TemporaryDirectory() as tmp:
            overrides = [f"model={shape}", "tokenizer=qwen2.5", "judge=heuristic", f"output={tmp}/run", "steps=1",
                         "progress=false", "tensorboard=false", f"device={'cuda' if cuda else 'cpu'}",
                         "check_memory=false"]
            config = apply_overrides(preset_config(preset), overrides)
            plan = plan_memory(config, preset=preset, gpu_memory_gb=gpu_gb)
            if cuda:
                torch.cuda.empty_cache()
                total = torch.cuda.get_device_properties(0).total_memory
                torch.cuda.set_per_process_memory_fraction(min(1.0, gpu_gb * 2**30 / total))
                torch.cuda.reset_peak_memory_stats()
                # the CUDA context (and anything else on the GPU): used memory that the allocator did not reserve
                free, _ = torch.cuda.mem_get_info()
                context = total - free - torch.cuda.memory_reserved()
            tracker = contextlib.nullcontext() if cuda else LiveTensorBytes()
            trainer = Trainer(config)
            gen = torch.Generator().manual_seed(0)
            prompt = config.max_prompt_tokens
            lengths = {"attacker": (prompt, config.attacker_max_new_tokens),
                       "defender": (prompt, config.defender_max_new_tokens)}
            samples = [Sample(role, trainer.adapters[role], torch.randint(0, 20000, (p,), generator=gen).tolist(),
                              torch.randint(0, 20000, (r,), generator=gen).tolist(), float(i % 3 - 1), group=i // 4,
                              logprobs=[-1.0] * r)
                       for role, (p, r) in lengths.items() if trainer.adapters[role] is not None
                       for i in range(min(config.train_batch_size, config.token_budget // (p + r) + 2))]
            from abs_fast.rollout import RolloutRequest, SamplingParams

            params = SamplingParams(temperature=1.0, max_new_tokens=2, ignore_eos=True)
            requests = [RolloutRequest(s.prompt_ids, s.adapter, params) for s in samples[: config.engine_max_batch]]
            with torch.no_grad():  # the first generate allocates the KV cache: resident from then on
                trainer.engine.generate(requests[:1])
            resident = resident_bytes(trainer.policy, trainer.optimizer, trainer.engine.cache.k, trainer.engine.cache.v)
            with tracker:
                with torch.no_grad():
                    trainer.engine.generate(requests)
                trainer._update(samples)  # as a step runs it: the config's settings, the trainer's optimizer
                _sync()
            # on a GPU what the run takes from it: the allocator's peak reservation plus the context (the plan
            # counts both); on CPU the live tensor bytes
            measured = torch.cuda.max_memory_reserved() + context if cuda else resident + tracker.peak
            where = (f"{preset} ({shape}, random NF4 weights), {len(samples)} samples of {prompt}+"
                     f"{config.attacker_max_new_tokens}/{config.defender_max_new_tokens} tokens, "
                     f"token_budget {config.token_budget}, engine {config.engine_max_batch} rows")
            rec.figure(f"preset {preset} peak memory", measured / 2**30, "GiB", "the planner's peak", plan.peak / 2**30,
                       shapes=where + (" (reserved + context)" if cuda else " (live tensors)"),
                       dtype="bf16" if cuda else "fp32", gpu_memory_gb=gpu_gb,
                       fits=None if gpu_gb is None else measured <= gpu_gb * 2**30,
                       allocated_gb=torch.cuda.max_memory_allocated() / 2**30 if cuda else None)
            del trainer, samples
            if cuda:
                torch.cuda.set_per_process_memory_fraction(1.0)


STAGE_FUNCTIONS = {"compile": stage_compile, "environment": stage_environment, "gpu_tests": stage_gpu_tests,
                   "kernels": stage_kernels, "decode": stage_decode, "selfplay": stage_selfplay,
                   "presets": stage_presets}


# ---------------------------------------------------------------------------------------------
# The run (parent side): stages in child processes, the report rewritten after each
# ---------------------------------------------------------------------------------------------

def read_figures(out: Path) -> list[dict]:
    figures = []
    path = out / "figures.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError):  # a line cut by a kill
                figures.append(json.loads(line))
    return figures


def write_report(out: Path, meta: dict, stages: list[dict]) -> None:
    figures = read_figures(out)
    report = {**meta, "stages": stages, "figures": figures}
    tmp = out / "gpu-check.json.tmp"
    tmp.write_text(json.dumps(report, indent=1))
    tmp.replace(out / "gpu-check.json")
    (out / "gpu-check.md").write_text(markdown(report))


def _built(stage: dict) -> str:
    n = stage.get("triton_variants_built")
    return f"{n} Triton cache entries built" if n else ""


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.4g}"


def markdown(report: dict) -> str:
    lines = [f"### gpu-check {'smoke ' if report['smoke'] else ''}{report['date']}", "",
             f"device: {report['device']}; commit {report['commit']}; torch {report['versions']['torch']}, "
             f"triton {report['versions']['triton']}; command: `{report['command']}`", "",
             "| stage | status | seconds | note |", "|---|---|---|---|"]
    lines += [f"| {s['name']} | {s['status']} | {s['seconds']:.0f} | "
              f"{'; '.join(x for x in (s.get('note', ''), _built(s)) if x)} |" for s in report["stages"]]
    lines += ["", "| figure | value | unit | compared with | its value | ratio | shapes | dtype |",
              "|---|---|---|---|---|---|---|---|"]
    for f in report["figures"]:
        c = f["compared_with"]
        lines.append(f"| {f['name']} | {_fmt(f['value'])} | {f['unit']} | {c['name']} | {_fmt(c['value'])} | "
                     f"{_fmt(c['ratio'])} | {f['shapes']} | {f['dtype']} |")
    return "\n".join(lines) + "\n"


def budget_table(smoke: bool) -> str:
    lines = ["| stage | limit (s) | reckoned from |", "|---|---|---|"]
    lines += [f"| {s.name} | {s.smoke_limit_s if smoke else s.gpu_limit_s} | {s.budget} |" for s in STAGES]
    total = sum(s.smoke_limit_s if smoke else s.gpu_limit_s for s in STAGES)
    deadline = "no deadline: a smoke run" if smoke else f"deadline {DEADLINE_S}"
    lines.append(f"| all stages | {total} ({deadline}) | plus about 60 s of install and native build |")
    return "\n".join(lines)


def run_stage_process(argv: list[str], limit: float, cwd: Path) -> tuple[str, str]:
    """Run a stage in its own process group; past `limit` seconds the whole group is killed (a stage's
    pytest and its workers too). Returns (status, note)."""
    proc = subprocess.Popen(argv, cwd=cwd, start_new_session=True)
    try:
        code = proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return "timeout", f"cut at {limit:.0f} s (its process group killed); figures measured before are kept"
    with contextlib.suppress(ProcessLookupError):  # a child left behind by a finished stage
        os.killpg(proc.pid, signal.SIGKILL)
    return ("ok", "") if code == 0 else ("failed", f"exit {code}: see the stage's output")


def _cache_entries(path: Path) -> int:
    return sum(1 for _ in path.iterdir()) if path.is_dir() else 0


def run(out: Path, smoke: bool, names: list[str], command: str, deadline_s: float | None = None) -> int:
    import torch

    out.mkdir(parents=True, exist_ok=True)
    cache = Path(os.environ.setdefault("TRITON_CACHE_DIR", str(out / "triton-cache")))  # shared by every stage
    cache.mkdir(parents=True, exist_ok=True)
    deadline_s = deadline_s if deadline_s is not None else (None if smoke else DEADLINE_S)
    print("== budget\n" + budget_table(smoke), flush=True)
    for stale in ("figures.jsonl", "references.json"):
        (out / stale).unlink(missing_ok=True)
    meta = {"smoke": smoke, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": command,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "commit": os.environ.get("ABS_FAST_COMMIT") or _commit(),
            "versions": {"torch": torch.__version__, "python": platform.python_version(),
                         "triton": _version("triton"), "bitsandbytes": _version("bitsandbytes"),
                         "liger-kernel": _version("liger-kernel"), "peft": _version("peft"),
                         "transformers": _version("transformers")},
            "native": os.environ.get("ABS_FAST_NATIVE_NOTE", ""), "budget": budget_table(smoke),
            "triton_cache": str(cache)}
    stages: list[dict] = []
    failed = 0
    began = time.perf_counter()
    for stage in STAGES:
        if stage.name not in names:
            stages.append({"name": stage.name, "status": "not requested", "seconds": 0.0})
            continue
        limit = stage.smoke_limit_s if smoke else stage.gpu_limit_s
        if deadline_s is not None:
            limit = min(limit, deadline_s - (time.perf_counter() - began))
        entry = {"name": stage.name, "limit_s": round(limit, 1)}
        if limit < 5:
            entry.update(status="timeout", seconds=0.0, note=f"not run: the run's deadline ({deadline_s:.0f} s) passed")
            failed += 1
            stages.append(entry)
            write_report(out, meta, stages)
            continue
        print(f"== stage {stage.name} (limit {limit:.0f} s)", flush=True)
        argv = [sys.executable, str(Path(__file__).resolve()), "--run-stage", stage.name, str(out)]
        if smoke:
            argv.append("--smoke")
        start, cached = time.perf_counter(), _cache_entries(cache)
        entry["status"], note = run_stage_process(argv, limit, out)
        if note:
            entry["note"] = note
        entry["seconds"] = round(time.perf_counter() - start, 1)
        entry["triton_variants_built"] = _cache_entries(cache) - cached
        failed += entry["status"] != "ok"
        stages.append(entry)
        write_report(out, meta, stages)
    write_report(out, meta, stages)
    print((out / "gpu-check.md").read_text())
    return 1 if failed else 0


def _version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on any device: checks that it runs")
    parser.add_argument("--stages", default=",".join(s.name for s in STAGES))
    parser.add_argument("--deadline", type=float, help=f"seconds for all stages (default {DEADLINE_S}; none with "
                                                       "--smoke)")
    parser.add_argument("--run-stage", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run_stage:
        import torch

        os.environ.setdefault("TRITON_CACHE_DIR", str(args.out / "triton-cache"))
        if args.smoke:
            torch.manual_seed(0)
        rec = Recorder(args.out, args.run_stage, args.smoke)
        if os.environ.get("ABS_FAST_GPU_CHECK_FAIL_STAGE") == args.run_stage:  # tests: a stage that fails
            raise RuntimeError(f"stage {args.run_stage} failed on purpose (ABS_FAST_GPU_CHECK_FAIL_STAGE)")
        STAGE_FUNCTIONS[args.run_stage](rec, args.out)
        return 0
    names = [n for n in args.stages.split(",") if n]
    unknown = sorted(set(names) - set(STAGE_FUNCTIONS))
    if unknown:
        parser.error(f"unknown stage(s) {unknown}; stages: {', '.join(STAGE_FUNCTIONS)}")
    return run(args.out.resolve(), args.smoke, names, " ".join(sys.argv), args.deadline)


if __name__ == "__main__":
    sys.exit(main())
