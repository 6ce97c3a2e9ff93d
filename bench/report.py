"""Turn a pytest-benchmark JSON file into the markdown tables kept in bench/RESULTS.md.

Each group (one shape or batch) is compared against a baseline measured in the same run: the first
of --baselines that the group has (default: fused, native, copy). A ratio above 1 means that variant
is slower than the baseline. Groups with the same set of variants share a table. Absolute times (and
GB/s where a benchmark records the bytes it reads) are printed only for GPU runs.

    python bench/report.py bench.json [--baselines fused,native,copy]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict


def report(path: str, baselines: list[str]) -> str:
    with open(path) as f:
        data = json.load(f)
    device = data["machine_info"].get("abs_fast_device", "unknown")
    on_gpu = device != "cpu"
    medians: dict[str, dict[str, float]] = defaultdict(dict)
    nbytes: dict[str, dict[str, int]] = defaultdict(dict)
    for bench in data["benchmarks"]:
        variant = bench["extra_info"]["variant"]
        medians[bench["group"]][variant] = bench["stats"]["median"]
        if "bytes" in bench["extra_info"]:
            nbytes[bench["group"]][variant] = bench["extra_info"]["bytes"]
    tables: dict[tuple[str, tuple[str, ...]], list[str]] = defaultdict(list)
    for group, by_variant in medians.items():
        baseline = next((b for b in baselines if b in by_variant), None)
        if baseline is None:
            print(f"skipping {group}: none of the baselines {baselines} was measured", file=sys.stderr)
            continue
        others = tuple(sorted(v for v in by_variant if v != baseline))
        base = by_variant[baseline]
        cells = [f"{by_variant[v] / base:.2f}x" for v in others]
        if on_gpu:
            cells.append(f"{base * 1e3:.3f}")
            if baseline in nbytes[group]:
                cells.append(f"{nbytes[group][baseline] / base / 1e9:.0f}")
        tables[(baseline, others)].append(f"| {group} | " + " | ".join(cells) + " |")
    lines = [f"device: {device}; commit: {data.get('commit_info', {}).get('id', '?')[:10]}; "
             f"date: {data.get('datetime', '?')[:10]}"]
    for (baseline, others), rows in tables.items():
        header = ["group", *(f"{v} / {baseline}" for v in others)]
        if on_gpu:
            header.append(f"{baseline} median (ms)")
            if any(r.count("|") > len(header) + 1 for r in rows):
                header.append(f"{baseline} GB/s")
        lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header), *rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json_file")
    parser.add_argument("--baselines", default="fused,native,copy")
    args = parser.parse_args()
    print(report(args.json_file, args.baselines.split(",")))


if __name__ == "__main__":
    main()
