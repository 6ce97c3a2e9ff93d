#!/usr/bin/env bash
# The compile tests (tests/test_kernels_compile.py: every kernel compiled on this CPU for sm_80 and
# sm_90, registers, spills, shared memory, the NF4 decode K loop's machine code) and the compile census
# (tests/test_compile_census.py: variants a 7B step and decode waves build, by Triton's own
# specialisation rules) against another Triton release than the installed one, e.g. the GPU image's:
#     bash scripts/compile-check.sh 3.6.0 [pytest args]
# Triton's wheel needs no torch: it is downloaded once, unpacked into abs-fast's cache folder and put
# ahead of the installed Triton for this run only. Needs the package index; takes 5-10 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
version=${1:?usage: bash scripts/compile-check.sh TRITON_VERSION [pytest args]}
shift

# shellcheck source=scripts/setup.sh
. scripts/setup.sh

tag=$(python -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
unpacked="${ABS_FAST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/abs-fast}/triton-$version-$tag"
if [ ! -f "$unpacked/triton/__init__.py" ]; then
  echo "== downloading triton $version into $unpacked"
  download=$(mktemp -d)
  trap 'rm -rf "$download"' EXIT
  python -m pip download --quiet --no-deps --only-binary=:all: -d "$download" "triton==$version"
  rm -rf "$unpacked.partial"
  mkdir -p "$unpacked.partial"
  python -m zipfile -e "$download"/triton-*.whl "$unpacked.partial"
  chmod +x "$unpacked.partial"/triton/backends/nvidia/bin/*
  mv "$unpacked.partial" "$unpacked"
fi
export PYTHONPATH="$unpacked${PYTHONPATH:+:$PYTHONPATH}"
found=$(python -c 'import triton; print(triton.__version__)')
if [ "$found" != "$version" ]; then
  echo "error: $unpacked gave triton $found, not $version" >&2
  exit 1
fi
echo "== compile tests with triton $found (torch $(python -c 'import torch; print(torch.__version__)'))"
python -m pytest -p no:cacheprovider tests/test_kernels_compile.py tests/test_compile_census.py -s "$@"
