"""Test set-up: Triton under its CPU interpreter when there is no GPU, markers, data files."""

import importlib.util
import os
from pathlib import Path

import pytest
import torch
from helpers import SEED_ROWS

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # must be set before triton is first imported
    os.environ.setdefault("TRITON_INTERPRET", "1")
    if importlib.util.find_spec("triton") is not None:
        from triton_interpreter import patch_triton_interpreter

        patch_triton_interpreter()

REPO_ROOT = Path(__file__).resolve().parent.parent
TEST_DATA = Path(__file__).resolve().parent / "data"


def pytest_collection_modifyitems(config, items):
    has_sglang = importlib.util.find_spec("sglang") is not None
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        if "sglang" in item.keywords and not (HAS_CUDA and has_sglang):
            item.add_marker(pytest.mark.skip(reason="needs sglang and a CUDA GPU"))


@pytest.fixture
def test_data() -> Path:
    """tests/data: XSTest and a GSM8K subset, committed with their licences (tests/data/README.md)."""
    return TEST_DATA


@pytest.fixture
def seed_files(tmp_path) -> dict[str, Path]:
    """kind -> a JSONL seed file of SEED_ROWS[kind] in the WildJailbreak seed format."""
    import json

    files = {}
    for kind, prompts in SEED_ROWS.items():
        path = tmp_path / f"seeds_{kind}.jsonl"
        path.write_text("".join(json.dumps({"prompt": p, "category": kind}) + "\n" for p in prompts))
        files[kind] = path
    return files


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
