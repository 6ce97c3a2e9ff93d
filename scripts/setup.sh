#!/usr/bin/env bash
# Sourced by scripts/test.sh and scripts/demo.sh: a virtual environment in .venv (ABS_FAST_VENV), torch
# (the CPU build, torch==2.13.0, when there is no NVIDIA GPU), and abs-fast with its dev extras,
# reinstalled only when the build description or the native sources changed.
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

