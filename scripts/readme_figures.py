"""The README's demo figures, measured: `bash scripts/readme-figures.sh [SEED ...]` (default seeds 0 1 2).

For each seed, `abs-fast demo` runs twice in a fresh process: first with an empty cache (the
offline tokenizer and the warm-started tiny base are built), then with that cache (only the demo).
It prints a markdown report: the machine and its load, each run's wall time, the range over the
seeds of the first-quarter and last-quarter means of the headline metrics (and on how many seeds
each moved by more than its step-to-step noise), and the disk used by the environment and caches.
Everything goes to a temporary directory that is removed at the end.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
METRICS = (("reward/attacker", "attacker reward"), ("reward/defender", "defender reward"),
           ("format_violation/attacker", "attacker format violations"),
           ("format_violation/defender", "defender format violations"))


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _du(path: Path) -> int:
    if not path.exists():
        return 0
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def _demo(seed: int, output: Path, cache: Path) -> tuple[float, float | None]:
    """(wall seconds, warm-start seconds when it ran) of one `abs-fast demo` in a fresh process."""
    env = {**os.environ, "ABS_FAST_CACHE": str(cache)}
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "abs_fast.cli", "demo", "--seed", str(seed), "--output", str(output),
                          "--quiet"], env=env, capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - start
    if run.returncode != 0:
        sys.exit(f"demo --seed {seed} failed ({run.returncode}):\n{run.stderr[-2000:]}")
    warm = re.search(r"warm start done in (\d+) s", run.stderr)
    return wall, float(warm.group(1)) if warm else None


def _range(values: list[float]) -> str:
    return f"{min(values):.2f}" if min(values) == max(values) else f"{min(values):.2f} .. {max(values):.2f}"


def main() -> None:
    from abs_fast.train import read_metrics
    from abs_fast.train.metrics import quarter_change

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("seeds", nargs="*", type=int, default=[0, 1, 2])
    args = parser.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout
    load_before = os.getloadavg()
    rows, moved = [], {key: [] for key, _ in METRICS}
    with tempfile.TemporaryDirectory(prefix="abs-fast-figures-") as tmp:
        for seed in args.seeds:
            cache, output = Path(tmp) / f"cache-{seed}", Path(tmp) / f"demo-{seed}"
            fresh, warm_start = _demo(seed, output, cache)
            cached, _ = _demo(seed, output, cache)
            rows.append((seed, fresh, warm_start, cached))
            records = read_metrics(output / "metrics.jsonl")
            for key, _ in METRICS:
                moved[key].append(quarter_change(records, key))
            cache_bytes, run_bytes = _du(cache), _du(output)
    load_after = os.getloadavg()
    print(f"## Demo figures (scripts/readme-figures.sh, commit {commit.strip() or '?'}, "
          f"{time.strftime('%Y-%m-%d')})\n")
    print(f"Machine: {_cpu_model()}, {os.cpu_count()} logical CPUs; load average {load_before[0]:.2f} before and "
          f"{load_after[0]:.2f} after (1 min).\n")
    print("| seed | empty cache (tokenizer + warm start built) | of which warm start | cached |")
    print("|---|---|---|---|")
    for seed, fresh, warm_start, cached in rows:
        print(f"| {seed} | {fresh:.0f} s | {'n/a' if warm_start is None else f'{warm_start:.0f} s'} | {cached:.0f} s |")
    print(f"\nOver seeds {', '.join(map(str, args.seeds))}: first-quarter and last-quarter means (ranges over the "
          "seeds), and on how many seeds the change exceeded the step-to-step noise.\n")
    print("| metric | first quarter | last quarter | moved beyond noise |")
    print("|---|---|---|---|")
    for key, label in METRICS:
        values = [v for v in moved[key] if v[2] is not None]
        if not values:
            print(f"| {label} | n/a | n/a | n/a |")
            continue
        beyond = sum(1 for a, b, change, noise in values if noise is not None and abs(change) > noise)
        print(f"| {label} | {_range([v[0] for v in values])} | {_range([v[1] for v in values])} | "
              f"{beyond} of {len(values)} |")
    venv = Path(sys.prefix)
    print(f"\nDisk: the environment {venv.name}/ {_du(venv) / 2**30:.1f} GiB, the SGLang contract environment "
          f"{_du(REPO / '.sglang-contract') / 2**20:.0f} MiB (tests only), the cache (tokenizer + one warm-started "
          f"base) {cache_bytes / 2**20:.0f} MiB, a demo run directory {run_bytes / 2**20:.0f} MiB.")


if __name__ == "__main__":
    main()
