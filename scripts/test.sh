#!/usr/bin/env bash
# The abs-fast test suite on a fresh machine. It does its own set-up: a virtual environment in .venv,
# torch (the CPU build, torch==2.13.0, when there is no NVIDIA GPU), abs-fast with its dev extras, and
# the pinned SGLang for the contract tests (scripts/sglang-contract-env.sh); then the tests, then one
# round of every benchmark (to keep them runnable; timings are not read).
# Extra arguments go to the test run, e.g.: bash scripts/test.sh -k lora -x
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=scripts/setup.sh
. scripts/setup.sh

# SGLang's own classes for the contract tests, in a private directory (never in .venv)
bash scripts/sglang-contract-env.sh || echo "== could not install the SGLang contract environment (no wheel for this
   platform or no package index?): tests/test_sglang_contract.py will skip and say why"

echo "== tests"
python -m pytest "$@"
echo "== benchmark smoke (one round each, not timed)"
python -m pytest bench --benchmark-disable -q -p no:cacheprovider
