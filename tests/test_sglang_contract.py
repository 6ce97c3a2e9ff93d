"""Contract tests: what the SGLang client sends, judged by SGLang's own code (request classes and
their normalisation, the /generate contract gate, the server-args parser, the allow-listed tensor
deserializer, the LoRA loader, finish reasons). SGLang needs GPU packages to run, but these parts
import on CPU: scripts/sglang-contract-env.sh installs the pinned wheel and the few pure-Python
packages they import, with --no-deps, into .sglang-contract/VERSION (scripts/test.sh does it).
The checks run in one subprocess with that directory on its path (tests/sglang_contract/probe.py),
so SGLang never enters this test process. Without the directory, or where SGLang does not import
from it, the tests skip and say why (on CI, CI=true, they fail instead).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
VERSION = "0.5.23"
CHECKS = ["version", "generate_request", "adapter_routes", "adapter_files_with_patterns",
          "adapter_files_from_a_policy", "tensor_route", "server_arguments", "guarded_options_as_sglang_reads_them",
          "server_routes_and_environment", "finish_reasons"]


def _environment_dir() -> Path:
    return Path(os.environ.get("ABS_FAST_SGLANG_CONTRACT_DIR") or ROOT / ".sglang-contract" / VERSION)


def _skip_or_fail(reason: str) -> None:
    """Skip with the reason; on CI (CI=true), where scripts/test.sh installs the environment, fail."""
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def contract() -> dict:
    site = _environment_dir()
    if not (site / "sglang").is_dir():
        _skip_or_fail(f"no SGLang {VERSION} contract environment at {site}: run bash scripts/sglang-contract-env.sh "
                      "(scripts/test.sh does)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])}
    env.pop("SGLANG_RETURN_ORIGINAL_LOGPROB", None)
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "sglang_contract" / "probe.py"), VERSION],
                          capture_output=True, text=True, env=env, timeout=900, cwd=ROOT)
    if done.returncode != 0 or not done.stdout.strip():
        pytest.fail(f"the contract probe failed (exit {done.returncode}):\n{done.stderr[-6000:]}")
    results = json.loads(done.stdout.strip().splitlines()[-1])
    if "_import" in results:
        _skip_or_fail(f"SGLang {VERSION} does not import from {site}:\n{results['_import']['detail']}")
    return results


@pytest.mark.parametrize("name", CHECKS)
def test_sglang_contract(contract, name):
    assert name in contract, f"the probe ran no check {name!r} (ran {sorted(contract)})"
    assert contract[name]["ok"], contract[name]["detail"]


def test_probe_runs_every_listed_check(contract):
    assert sorted(contract) == sorted(CHECKS)
