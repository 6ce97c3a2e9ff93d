"""The GPU image runs torch 2.11 and triton 3.6, older than the CI's. No CPU build of torch 2.11 can be
installed here (PyPI has only its CUDA build), so this test reads the project's code instead: every
torch / triton name it uses at module level (torch.x.y, tl.z, `from torch.a import b`, `import
triton.c`) must exist in those versions' API (tests/data/api_baseline.json.gz, read from their wheels
by scripts/api_baseline.py), unless the use is guarded: inside a try whose handler catches
AttributeError / ImportError / Exception, or under an `if` that tests hasattr/getattr or a version.

Not covered (so not claimed): methods of tensors and classes (x.foo(), torch.Tensor.foo) and keyword
arguments; those surface in the GPU run's own tests (scripts/gpu-check.sh, stage gpu_tests).
"""

from __future__ import annotations

import ast
import functools
import gzip
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BASELINE = REPO / "tests" / "data" / "api_baseline.json.gz"
SCANNED = ("abs_fast", "kernels", "bench", "tests", "scripts")
GUARD_EXCEPTIONS = {"AttributeError", "ImportError", "ModuleNotFoundError", "Exception", "BaseException"}
DYNAMIC = ("torch.ops", "torch.classes", "torch._C._ops")  # filled at run time by the dispatcher


@functools.cache
def baseline() -> dict:
    with gzip.open(BASELINE, "rt") as f:
        return json.load(f)


def has_module(module: str) -> bool:
    return module in baseline()["modules"]


def has_name(module: str, name: str, seen: frozenset = frozenset()) -> bool:
    modules = baseline()["modules"]
    if module in seen or module not in modules:
        return False
    if f"{module}.{name}" in modules:
        return True
    entry = modules[module]
    if name in entry["names"]:
        return True
    sources = list(entry["stars"])
    if module == "torch":  # torch/__init__.py copies every torch._C._VariableFunctions into its globals
        sources.append("torch._C._VariableFunctions")
    return any(has_name(s, name, seen | {module}) for s in sources)


def chain_exists(chain: list[str]) -> bool:
    """torch.nn.functional.silu: walk the modules, then the first name after them must exist."""
    if ".".join(chain).startswith(DYNAMIC):
        return True
    module = chain[0]
    if not has_module(module):
        return False
    for part in chain[1:]:
        if has_module(f"{module}.{part}"):
            module = f"{module}.{part}"
            continue
        return has_name(module, part)
    return True


def _guarded(node: ast.AST, parents: dict) -> bool:
    child = node
    while child in parents:
        parent = parents[child]
        if isinstance(parent, ast.Try) and child in parent.body:
            for handler in parent.handlers:
                caught = handler.type
                names = {n.id for n in ast.walk(caught) if isinstance(n, ast.Name)} if caught else {"BaseException"}
                if names & GUARD_EXCEPTIONS:
                    return True
        if isinstance(parent, (ast.If, ast.IfExp)) and child is not parent.test:
            text = ast.unparse(parent.test)
            if any(word in text for word in ("hasattr", "getattr", "version", "VERSION")):
                return True
        child = parent
    return False


def uses(path: Path):
    """(line, dotted name, guarded) for every torch/triton module-level name the file uses."""
    tree = ast.parse(path.read_text(), str(path))
    parents = {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}
    aliases: dict[str, str] = {}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in ("torch", "triton"):
                    aliases[alias.asname or alias.name.split(".")[0]] = alias.name if alias.asname else \
                        alias.name.split(".")[0]
                    found.append((node.lineno, alias.name, _guarded(node, parents), "module"))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                and node.module.split(".")[0] in ("torch", "triton"):
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                if alias.name != "*":
                    aliases[alias.asname or alias.name] = full
                found.append((node.lineno, full, _guarded(node, parents), "from"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and not isinstance(parents.get(node), ast.Attribute):
            parts, base = [], node
            while isinstance(base, ast.Attribute):
                parts.append(base.attr)
                base = base.value
            if isinstance(base, ast.Name) and base.id in aliases:
                chain = aliases[base.id].split(".") + parts[::-1]
                found.append((node.lineno, ".".join(chain), _guarded(node, parents), "attr"))
    return found


def _missing(path: Path) -> list[str]:
    out = []
    for line, name, guarded, kind in uses(path):
        if guarded:
            continue
        chain = name.split(".")
        ok = has_module(name) if kind == "module" else (chain_exists(chain) or has_module(name))
        if not ok:
            out.append(f"{path.relative_to(REPO)}:{line}: {name}")
    return sorted(set(out))


def test_baseline_is_the_gpu_images_versions():
    assert baseline()["versions"] == {"torch": "2.11.0", "triton": "3.6.0"}


def test_the_checker_finds_names_that_are_missing_and_accepts_guarded_ones(tmp_path):
    source = tmp_path / "probe.py"
    source.write_text(
        "import torch\nimport torch.nn.functional as F\nimport triton.language as tl\n"
        "from torch.utils._python_dispatch import TorchDispatchMode\n"
        "a = F.scaled_dot_product_attention\nb = tl.dot\nc = torch.randn\nd = torch.float8_e4m3fn\n"
        "e = torch.nn.functional.does_not_exist_2_11\nf = tl.no_such_triton_op\n"
        "from torch.nn.attention import no_such_thing\n"
        "try:\n    g = torch.future_api_xyz\nexcept AttributeError:\n    g = None\n"
        "if hasattr(torch, 'other_future_api'):\n    h = torch.other_future_api\n"
        "i = torch.ops.aten.mm.default\n")
    assert [m.split(": ")[1] for m in _missing_anywhere(source)] == [
        "torch.nn.attention.no_such_thing", "torch.nn.functional.does_not_exist_2_11",
        "triton.language.no_such_triton_op"]


def _missing_anywhere(path: Path) -> list[str]:
    out = []
    for line, name, guarded, kind in uses(path):
        chain = name.split(".")
        if not guarded and not (has_module(name) if kind == "module" else chain_exists(chain) or has_module(name)):
            out.append(f"{line}: {name}")
    return sorted(set(out), key=lambda s: s.split(": ")[1])


@pytest.mark.parametrize("folder", SCANNED)
def test_no_unguarded_api_newer_than_torch_2_11_and_triton_3_6(folder):
    files = sorted((REPO / folder).rglob("*.py"))
    assert files, folder
    missing = [m for path in files for m in _missing(path)]
    assert not missing, "uses of torch/triton names that torch 2.11 / triton 3.6 lack (guard them with a " \
                        "try/hasattr, or avoid them):\n  " + "\n  ".join(missing)
