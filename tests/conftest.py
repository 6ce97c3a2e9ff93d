"""Shared test set-up: Triton under its CPU interpreter when there is no GPU, markers, data paths."""

import importlib.util
import os
from pathlib import Path

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # must be set before triton is first imported
    os.environ.setdefault("TRITON_INTERPRET", "1")
    if importlib.util.find_spec("triton") is not None:
        from triton_interpreter import patch_triton_interpreter

        patch_triton_interpreter()

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


def pytest_collection_modifyitems(config, items):
    has_sglang = importlib.util.find_spec("sglang") is not None
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        if "sglang" in item.keywords and not (HAS_CUDA and has_sglang):
            item.add_marker(pytest.mark.skip(reason="needs sglang and a CUDA GPU"))


@pytest.fixture
def shared_data() -> Path:
    """../shared/data beside the checkout (seed prompts, eval sets); the test skips without it."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture
def rng_seed(request) -> int:
    """A fresh seed per run, printed on failure so a failing draw can be replayed (ABS_FAST_TEST_SEED)."""
    seed = int(os.environ.get("ABS_FAST_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
    request.node.user_properties.append(("seed", seed))
    print(f"seed={seed}")
    return seed


@pytest.fixture(scope="session")
def qwen_tokenizer():
    """The offline Qwen2.5 tokenizer (built once and cached on disk)."""
    from abs_fast.model import load_qwen25_tokenizer

    return load_qwen25_tokenizer()
