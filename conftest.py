"""Set-up for tests/ and bench/ alike: a private home directory, and bitsandbytes' CPU fast path on or
off by request.

The suite never touches the user's home: before anything else is imported, HOME, the XDG folders,
abs-fast's cache (ABS_FAST_CACHE) and the caches of Hugging Face, Triton, torch and matplotlib
point into one temporary folder, removed at the end. The user's abs-fast cache is fingerprinted
before and after; a run that changed it fails.

On CPUs with AVX512-BF16, bitsandbytes repacks 4-bit weights for its CPU forward (and asserts
out_features % 32 == 0); elsewhere it does not. The suite must pass either way, so
ABS_FAST_TEST_BNB_CPU_FASTPATH=on|off replaces bitsandbytes' CPU-feature probe for the session
(unset: the machine decides). scripts/test.sh runs the bitsandbytes tests both ways.
"""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest


def _user_abs_fast_caches() -> list[Path]:
    """The abs-fast cache folders of the user running the suite (before the environment is redirected)."""
    home_cache = Path(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")) / "abs-fast"
    explicit = os.environ.get("ABS_FAST_CACHE")
    return list(dict.fromkeys([home_cache, *([Path(explicit)] if explicit else [])]))


def _fingerprint(folders: list[Path]) -> dict[str, tuple[int, int]]:
    """path -> (size, mtime in ns) of every file under `folders` (a missing folder has none)."""
    out = {}
    for folder in folders:
        for path in sorted(folder.rglob("*")) if folder.is_dir() else []:
            with_stat = path.lstat()
            out[str(path)] = (with_stat.st_size, with_stat.st_mtime_ns)
    return out


USER_HOME = os.path.expanduser("~")
USER_CACHES = _user_abs_fast_caches()
_USER_CACHE_BEFORE = _fingerprint(USER_CACHES)
TEST_HOME = Path(tempfile.mkdtemp(prefix="abs-fast-test-home-"))
os.environ["ABS_FAST_TEST_USER_HOME"] = USER_HOME  # for the test that checks the redirection
atexit.register(shutil.rmtree, TEST_HOME, True)
for _var, _sub in (("HOME", ""), ("XDG_CACHE_HOME", ".cache"), ("XDG_CONFIG_HOME", ".config"),
                   ("XDG_DATA_HOME", ".local/share"), ("ABS_FAST_CACHE", ".cache/abs-fast"),
                   ("HF_HOME", ".cache/huggingface"), ("TRITON_CACHE_DIR", ".triton/cache"),
                   ("TORCH_HOME", ".cache/torch"), ("MPLCONFIGDIR", ".config/matplotlib")):
    os.environ[_var] = str(TEST_HOME / _sub)
# No test reads the Hugging Face Hub. Since transformers 5.25 installs the `kernels` package, importing
# bitsandbytes on a CPU with AVX512-BF16 asks the Hub for a kernel: offline, that fails at once, the same
# on every machine, and bitsandbytes keeps its own CPU code.
os.environ["HF_HUB_OFFLINE"] = "1"


def pytest_sessionfinish(session, exitstatus):
    after = _fingerprint(USER_CACHES)
    if after != _USER_CACHE_BEFORE:
        changed = sorted(set(after.items()) ^ set(_USER_CACHE_BEFORE.items()))
        session.config.get_terminal_writer().line(
            f"FAILED: the suite changed the user's abs-fast cache ({', '.join(map(str, USER_CACHES))}): "
            f"{len(changed)} entries, e.g. {changed[:3]}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


BNB_SWITCH = "ABS_FAST_TEST_BNB_CPU_FASTPATH"


def _bnb_mode() -> str:
    mode = os.environ.get(BNB_SWITCH, "").strip().lower()
    if mode not in ("", "on", "off"):
        raise pytest.UsageError(f"{BNB_SWITCH}={mode!r}: expected on, off or unset")
    return mode


def pytest_report_header(config):
    mode = _bnb_mode()
    return [f"home and caches: {TEST_HOME} (the user's {USER_HOME} is not touched)",
            f"bitsandbytes CPU fast path: {'forced ' + mode if mode else 'as this CPU has it'} ({BNB_SWITCH})"]


@pytest.fixture(scope="session", autouse=True)
def bitsandbytes_cpu_fast_path():
    """Patch bitsandbytes' has_avx512bf16 probe (read by every Linear4bit built afterwards) when the
    switch is set. Imported here, after tests/conftest.py has set TRITON_INTERPRET."""
    mode = _bnb_mode()
    if not mode:
        yield None
        return
    try:
        import bitsandbytes.functional as functional
        import bitsandbytes.nn.modules as modules
    except ImportError:
        yield None
        return
    saved = functional.has_avx512bf16, modules.has_avx512bf16
    functional.has_avx512bf16 = modules.has_avx512bf16 = (lambda: True) if mode == "on" else (lambda: False)
    try:
        yield mode == "on"
    finally:
        functional.has_avx512bf16, modules.has_avx512bf16 = saved
