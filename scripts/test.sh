#!/usr/bin/env bash
# The abs-fast test suite on a fresh machine. It does its own set-up: a virtual environment in .venv,
# torch (the CPU build, torch==2.13.0, when there is no NVIDIA GPU), abs-fast with its dev extras;
# then the tests, then one round of every benchmark (to keep them runnable; timings are not read).
# Extra arguments go to the test run, e.g.: bash scripts/test.sh -k lora -x
set -euo pipefail
cd "$(dirname "$0")/.."

venv=${ABS_FAST_VENV:-.venv}
if [ ! -x "$venv/bin/python" ]; then
  echo "== creating $venv"
  "${PYTHON:-python3}" -m venv "$venv"
fi
# shellcheck disable=SC1091
. "$venv/bin/activate"

# reinstall only when the build description or the native sources changed since the last install
stamp="$venv/.abs-fast-install-stamp"
wanted=$(cat pyproject.toml CMakeLists.txt csrc/* | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$wanted" ]; then
  echo "== installing abs-fast and its test dependencies into $venv"
  python -m pip install --quiet --upgrade pip
  if ! python -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
      python -m pip install --quiet torch
    else
      python -m pip install --quiet "torch==2.13.0"  # the CPU build: an unpinned torch pulls CUDA wheels
    fi
  fi
  python -m pip install --quiet scikit-build-core  # the wheel test builds without isolation
  python -m pip install --quiet -e ".[dev]"
  echo "$wanted" > "$stamp"
fi

echo "== tests"
python -m pytest "$@"
echo "== benchmark smoke (one round each, not timed)"
python -m pytest bench --benchmark-disable -q -p no:cacheprovider
