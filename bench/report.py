"""Turn a pytest-benchmark JSON file into the markdown table kept in bench/RESULTS.md.

Ratios are against a baseline measured in the same run (the `fused` variant of each group):
a ratio above 1 means that variant is slower than fused. Absolute times are printed only for GPU runs.

    python bench/report.py bench.json [--baseline fused]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict


def report(path: str, baseline: str) -> str:
    with open(path) as f:
        data = json.load(f)
    device = data["machine_info"].get("abs_fast_device", "unknown")
    on_gpu = device != "cpu"
    groups: dict[str, dict[str, float]] = defaultdict(dict)
    for bench in data["benchmarks"]:
        groups[bench["group"]][bench["extra_info"]["variant"]] = bench["stats"]["median"]
    variants = sorted({v for g in groups.values() for v in g}, key=lambda v: (v != baseline, v))
    header = "| shape | " + " | ".join(f"{v} / {baseline}" for v in variants if v != baseline)
    header += (f" | {baseline} median (ms) |" if on_gpu else " |")
    lines = [f"device: {device}; commit: {data.get('commit_info', {}).get('id', '?')[:10]}; "
             f"date: {data.get('datetime', '?')[:10]}", "", header,
             "|" + "---|" * (header.count("|") - 1)]
    for group, medians in groups.items():
        if baseline not in medians:
            print(f"skipping {group}: no {baseline} result", file=sys.stderr)
            continue
        base = medians[baseline]
        cells = [f"{medians[v] / base:.2f}x" if v in medians else "-" for v in variants if v != baseline]
        row = f"| {group} | " + " | ".join(cells)
        lines.append(row + (f" | {base * 1e3:.3f} |" if on_gpu else " |"))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json_file")
    parser.add_argument("--baseline", default="fused")
    args = parser.parse_args()
    print(report(args.json_file, args.baseline))


if __name__ == "__main__":
    main()
