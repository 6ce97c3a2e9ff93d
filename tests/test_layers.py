"""The package's layers depend downward only (docs/DESIGN.md): ops/quant -> model -> rollout/game/rl ->
train -> evaluate -> cli. Every import in every module, function-level ones included, is checked."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "abs_fast"

# a module's layer: the first dotted component under abs_fast (top-level modules by name)
LAYERS = {
    "io": 0, "native": 0, "kernels": 0, "ops": 0, "quant": 0, "__init__": 0,
    "model": 1,
    "rollout": 2, "game": 2, "rl": 2,
    "train": 3,
    "evaluate": 4,
    "info": 5, "cli": 5,
}


def _layer_of(dotted: str) -> str:
    parts = dotted.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return [(line, name) for line, name in found if name == "abs_fast" or name.startswith("abs_fast.")]


def test_every_module_has_a_layer():
    for path in PACKAGE.rglob("*.py"):
        name = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        assert name in LAYERS, f"{path}: no layer assigned to abs_fast.{name} (add it to LAYERS)"


def test_imports_point_downward_only():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        own = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        for line, imported in _imports(path):
            target = _layer_of(imported)
            if target in LAYERS and LAYERS[target] > LAYERS[own]:
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {own} (layer {LAYERS[own]}) imports "
                             f"{imported} (layer {LAYERS[target]})")
    assert not wrong, "upward imports:\n" + "\n".join(wrong)


def test_train_never_imports_evaluate():
    for path in (PACKAGE / "train").rglob("*.py"):
        for line, imported in _imports(path):
            assert not imported.startswith("abs_fast.evaluate"), f"{path}:{line} imports {imported}"
