#!/usr/bin/env bash
# The abs-fast test suite on a fresh machine. It does its own set-up: a virtual environment in .venv,
# torch (the CPU build, torch==2.13.0, when there is no NVIDIA GPU), abs-fast with its dev extras, and
# the pinned SGLang for the contract tests (scripts/sglang-contract-env.sh); then the tests (the ones
# that use bitsandbytes twice more, with its CPU fast path forced on and off), then one round of every
# benchmark (to keep them runnable; timings are not read). Caches and configs go to a temporary home
# (conftest.py): the user's ~/.cache/abs-fast is never touched.
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
# bitsandbytes behaves differently on CPUs with AVX512-BF16 (it repacks 4-bit weights for its CPU
# forward): the tests that use it run again with its CPU fast path forced on and forced off (conftest.py)
for mode in on off; do
  echo "== bitsandbytes tests with its CPU fast path forced $mode"
  ABS_FAST_TEST_BNB_CPU_FASTPATH=$mode python -m pytest -q -p no:cacheprovider tests/test_nf4.py \
    tests/test_policy.py::test_prequantised_bitsandbytes_checkpoint_loads_its_codes
done
echo "== benchmark smoke (one round each, not timed)"
python -m pytest bench --benchmark-disable -q -p no:cacheprovider
