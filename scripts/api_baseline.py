"""Write the module-level API of an older torch and triton (the GPU image's: torch 2.11, triton 3.6) to
tests/data/, read statically from their wheels (nothing imported: the torch wheel is a CUDA build that
cannot load here). tests/test_api_compat.py checks every torch/triton name the project uses against it.

For every module of the wheel (each .py, and each .pyi stub of a compiled module): the names bound at
its top level (definitions, assignments, imports, __all__) and the modules it star-imports.

    pip download --no-deps --only-binary=:all: --python-version 3.11 -d /tmp/w torch==2.11.0 triton==3.6.0
    python scripts/api_baseline.py /tmp/w/torch-2.11.0-*.whl /tmp/w/triton-3.6.0-*.whl
"""

from __future__ import annotations

import ast
import gzip
import json
import sys
import zipfile
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "tests" / "data" / "api_baseline.json.gz"
PACKAGES = ("torch", "triton")


def _module_name(path: str) -> str | None:
    if not path.endswith((".py", ".pyi")) or not path.startswith(PACKAGES):
        return None
    parts = path.rsplit(".", 1)[0].split("/")
    if parts[-1] == "__init__":
        parts = parts[:-1]
    if not all(p.isidentifier() for p in parts):
        return None
    return ".".join(parts)


def _resolve(module: str, level: int, target: str | None, is_package: bool) -> str:
    if level == 0:
        return target or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def module_api(source: str, module: str, is_package: bool) -> tuple[set[str], list[str]]:
    tree = ast.parse(source)
    names: set[str] = set()
    stars: list[str] = []

    def bind(target):
        for node in ast.walk(target):
            if isinstance(node, ast.Name):
                names.add(node.id)

    def visit(body):
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Assign):
                for t in node.targets:
                    bind(t)
                if any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
                    with_strings(node.value)
            elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
                bind(node.target)
                if isinstance(node.target, ast.Name) and node.target.id == "__all__" and node.value is not None:
                    with_strings(node.value)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    names.add(alias.asname or alias.name.split(".")[0])
            elif isinstance(node, ast.ImportFrom):
                source_module = _resolve(module, node.level, node.module, is_package)
                for alias in node.names:
                    if alias.name == "*":
                        stars.append(source_module)
                    else:
                        names.add(alias.asname or alias.name)
            elif isinstance(node, (ast.If, ast.Try, ast.With, ast.For, ast.While)):
                for field in ("body", "orelse", "finalbody"):
                    visit(getattr(node, field, []) or [])
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)

    def with_strings(value):
        for node in ast.walk(value):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                names.add(node.value)

    visit(tree.body)
    return names, stars


def build(wheels: list[Path]) -> dict:
    modules: dict[str, dict] = {}
    versions = {}
    for wheel in wheels:
        versions[wheel.name.split("-")[0]] = wheel.name.split("-")[1]
        with zipfile.ZipFile(wheel) as z:
            for path in z.namelist():
                module = _module_name(path)
                if module is None:
                    continue
                try:
                    names, stars = module_api(z.read(path).decode("utf-8", "replace"), module,
                                              path.endswith(("__init__.py", "__init__.pyi")))
                except SyntaxError:
                    continue
                entry = modules.setdefault(module, {"names": set(), "stars": []})
                entry["names"] |= names
                entry["stars"] += [s for s in stars if s not in entry["stars"]]
    for module in list(modules):  # a package knows its submodules as attributes
        parent, _, child = module.rpartition(".")
        if parent in modules:
            modules[parent]["names"].add(child)
    return {"versions": versions,
            "modules": {m: {"names": sorted(e["names"]), "stars": e["stars"]} for m, e in sorted(modules.items())}}


def main() -> None:
    wheels = [Path(p) for p in sys.argv[1:]]
    if not wheels:
        sys.exit(__doc__)
    data = build(wheels)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(OUT, "wt", compresslevel=9) as f:
        json.dump(data, f, separators=(",", ":"))
    print(f"{OUT}: {len(data['modules'])} modules of {data['versions']}, {OUT.stat().st_size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
