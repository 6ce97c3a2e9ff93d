"""Per-step metrics: metrics.jsonl (one JSON object per line, fsynced), TensorBoard, the plot and the
summary table."""

from __future__ import annotations

import itertools
import json
import math
import os
from pathlib import Path

from abs_fast.io import atomic_write_bytes, atomic_write_text, figure_png

__all__ = ["TIMING_PREFIXES", "MetricsLog", "figure_png", "plot_metrics", "quarter_change", "read_metrics",
           "render_metrics_png", "summary_table"]

# Keys that measure the machine rather than the run: they differ between identical runs.
TIMING_PREFIXES = ("seconds/", "tokens_per_second/", "games_per_second/", "peak_memory")


def read_metrics(path: str | Path) -> list[dict]:
    """Records of a metrics.jsonl; a torn last line (a run killed mid-write) is ignored."""
    records = []
    path = Path(path)
    if not path.is_file():
        return records
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise ValueError(f"{path}:{number}: not valid JSON") from None
    return records


class MetricsLog:
    """Appends one record per step. resume_step: keep the records up to that step (a resumed run);
    None starts a fresh file."""

    def __init__(self, run_dir: str | Path, tensorboard: bool = True, resume_step: int | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        kept = [] if resume_step is None else [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (kept open for the run)
        self._writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            purge = resume_step + 1 if resume_step is not None else None
            self._writer = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=purge)

    def log(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        if self._writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, int | float) and math.isfinite(value):
                    self._writer.add_scalar(key, value, record["step"])
            self._writer.flush()

    def close(self) -> None:
        self._file.close()
        if self._writer is not None:
            self._writer.close()


_DIAGNOSTIC_KEYS = (
    ("attack_success", "attack success"), ("collapse/refusal_benign_seeds", "refusal, benign seeds"),
    ("collapse/refusal_attacker_prompts", "refusal, attacker prompts"), ("diversity/cosine", "attack cosine sim."),
    ("diversity/self_bleu", "attack self-BLEU"),
)


def render_metrics_png(records: list[dict]) -> bytes:
    """PNG bytes: mean reward per role, the rate of each outcome, and the collapse and diversity
    diagnostics (with the attacker/defender KL on the right axis) over steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    series = lambda key: [(s, r[key]) for s, r in zip(steps, records, strict=True)
                          if isinstance(r.get(key), int | float) and math.isfinite(r[key])]
    fig, (top, middle, bottom) = plt.subplots(3, 1, figsize=(9, 10), sharex=True)
    for role in ("attacker", "defender"):
        points = series(f"reward/{role}")
        if points:
            top.plot(*zip(*points, strict=True), marker="o", label=role)
    top.set_ylabel("mean reward")
    top.axhline(0.0, color="grey", linewidth=0.5)
    top.legend()
    top.set_title("ABS self-play: reward per role")
    outcome_keys = sorted({k for r in records for k in r if k.startswith("outcome/")})
    for key in outcome_keys:
        points = series(key)
        if any(v for _, v in points):
            middle.plot(*zip(*points, strict=True), label=key.split("/", 1)[1])
    middle.set_ylabel("rate")
    middle.set_ylim(-0.02, 1.02)
    middle.legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    middle.set_title("outcome rates")
    for key, label in _DIAGNOSTIC_KEYS:
        points = series(key)
        if points:
            bottom.plot(*zip(*points, strict=True), marker="." if len(points) < len(steps) else None, label=label)
    kl = series("collapse/role_kl")
    if kl:
        right = bottom.twinx()
        right.plot(*zip(*kl, strict=True), color="black", linestyle="--", marker="x", label="KL(defender||attacker)")
        right.set_ylabel("KL per token")
        right.legend(fontsize=7, loc="lower left", bbox_to_anchor=(1.08, 0.0))
    bottom.set_ylabel("rate / similarity")
    bottom.set_xlabel("step")
    bottom.set_ylim(-0.02, 1.02)
    bottom.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.08, 1.0))
    bottom.set_title("collapse and diversity diagnostics")
    fig.tight_layout()
    return figure_png(fig)


def plot_metrics(records: list[dict], path: str | Path) -> Path:
    """render_metrics_png written (atomically) to `path`."""
    path = Path(path)
    atomic_write_bytes(path, render_metrics_png(records))
    return path


_SUMMARY_KEYS = (
    ("reward/attacker", "attacker reward"), ("reward/defender", "defender reward"),
    ("attack_success", "attack success (judge-harmful answers)"),
    ("refusal_rate/harmful_prompt", "refusal on harmful prompts"),
    ("refusal_rate/benign_prompt", "refusal on benign prompts"),
    ("format_violation/attacker", "attacker format violations"),
    ("format_violation/defender", "defender format violations"),
    ("kl/attacker", "KL attacker || base"), ("kl/defender", "KL defender || base"),
    ("collapse/refusal_benign_seeds", "refusal on benign seeds (vanilla games)"),
    ("collapse/refusal_attacker_prompts", "refusal on the attacker's prompts"),
)


def _finite(records: list[dict], key: str) -> list[float]:
    return [float(r[key]) for r in records if isinstance(r.get(key), int | float) and math.isfinite(r[key])]


def quarter_change(records: list[dict], key: str) -> tuple[float | None, float | None, float | None, float | None]:
    """(mean over the first quarter of the steps, mean over the last quarter, their difference, the
    step-to-step noise: the standard deviation of consecutive differences over sqrt 2); None where a
    quarter has nothing to count."""
    quarter = max(1, len(records) // 4)
    a, b, every = _finite(records[:quarter], key), _finite(records[-quarter:], key), _finite(records, key)
    mean_a = sum(a) / len(a) if a else None
    mean_b = sum(b) / len(b) if b else None
    diffs = [y - x for x, y in itertools.pairwise(every)]
    noise = (sum(d * d for d in diffs) / len(diffs) / 2) ** 0.5 if diffs else None
    change = mean_b - mean_a if mean_a is not None and mean_b is not None else None
    return mean_a, mean_b, change, noise


def summary_table(records: list[dict]) -> str:
    """The headline metrics over the first and the last quarter of the steps (means), the change, and
    the step-to-step noise (the standard deviation of consecutive differences over sqrt 2): a change
    larger than the noise is marked *. A metric with nothing to count in those steps shows n/a."""
    if not records:
        return "(no steps recorded)"
    quarter = max(1, len(records) // 4)
    first, last = records[:quarter], records[-quarter:]
    span = lambda rs: f"steps {rs[0]['step']}-{rs[-1]['step']}" if len(rs) > 1 else f"step {rs[0]['step']}"
    rows = [("metric", f"first quarter ({span(first)})", f"last quarter ({span(last)})", "change", "noise")]
    missing = False
    for key, label in _SUMMARY_KEYS:
        if not any(key in r for r in records):
            continue
        mean_a, mean_b, change, noise = quarter_change(records, key)
        cell = lambda v: "n/a" if v is None else f"{v:.3f}"
        marked = change is not None and noise is not None and abs(change) > noise
        missing |= mean_a is None or mean_b is None
        rows.append((label, cell(mean_a), cell(mean_b), (f"{change:+.3f}" + ("*" if marked else " ")) if change
                     is not None else "n/a", cell(noise)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths,
             strict=True))) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("* the change is larger than the step-to-step noise.")
    if missing:
        lines.append("n/a: those steps had no game or token that the metric counts (e.g. no harmful seed dealt).")
    return "\n".join(lines)
