"""The layers of docs/architecture.md, held by the code: every module's imports (read from its
source, function-local and type-checking ones included) go to its own layer or below, never up;
no import cycles; no module imports another package's private module or another module's private
name (the examples included); and every module imports."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {  # folder → import name (pyproject.toml's package-dir)
    "lvmkit": "lvmkit",
    "models": "lvmkit.models",
    "guides": "lvmkit.guides",
    "inference": "lvmkit.inference",
    "benchmarks": "lvmkit.benchmarks",
}
LAYERS = [  # bottom to top; a module may import its own layer and the layers below
    ("base", ("lvmkit.base",)),
    ("models", ("lvmkit.models",)),
    ("guides", ("lvmkit.guides",)),
    ("inference", ("lvmkit.inference",)),
    ("pairs and estimators", ("lvmkit.pairs", "lvmkit.estimators")),
    (
        "data sets, runs, figures",
        (
            "lvmkit.data",
            "lvmkit.datasets",
            "lvmkit.music",
            "lvmkit.plots",
            "lvmkit.spec",
            "lvmkit.runs",
        ),
    ),
    ("benchmarks", ("lvmkit.benchmarks",)),
    ("entry points", ("lvmkit", "lvmkit.cli", "lvmkit.__main__")),
]


def _modules() -> dict[str, Path]:
    out = {}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).glob("*.py")):
            out[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return out


MODULES = _modules()


def _layer(module: str) -> int:
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or (prefix != "lvmkit" and module.startswith(prefix + ".")):
                return index
    raise AssertionError(f"{module} is in no layer of LAYERS: add it (and to docs/architecture.md)")


def _imports(module: str, path: Path) -> list[tuple[str, str | None]]:
    """(imported module, imported name or None) for each lvmkit import in ``path``."""
    is_package = path.stem == "__init__"
    out: list[tuple[str, str | None]] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, None) for a in node.names if a.name.split(".")[0] == "lvmkit"]
        elif isinstance(node, ast.ImportFrom):
            target = node.module or ""
            if node.level:
                parts = module.split(".") if is_package else module.split(".")[:-1]
                parts = parts[: len(parts) - node.level + 1]
                target = ".".join([*parts, *([node.module] if node.module else [])])
            if target.split(".")[0] != "lvmkit":
                continue
            for alias in node.names:
                full = f"{target}.{alias.name}"
                out.append((full, None) if full in MODULES else (target, alias.name))
    return out


def _edges() -> dict[str, set[str]]:
    return {m: {t for t, _ in _imports(m, p) if t != m} for m, p in MODULES.items()}


def _private(module: str, imported: str, name: str | None) -> str | None:
    """Why importing ``imported`` (its ``name``) from ``module`` reaches into another's private
    parts, or None."""
    parent = imported.rsplit(".", 1)[0]
    if imported.rsplit(".", 1)[-1].startswith("_") and not imported.endswith("__main__"):
        own_package = module.rsplit(".", 1)[0] if module != parent else module
        if own_package != parent and module != parent:
            return f"{module} imports the private module {imported}"
    if name is not None and name.startswith("_") and not name.startswith("__"):
        return f"{module} imports the private name {name} of {imported}"
    return None


def test_every_module_is_in_a_layer_and_imports():
    for module in MODULES:
        _layer(module)
        if module in ("lvmkit.benchmarks._numpyro_vae", "lvmkit.__main__"):
            continue  # needs JAX (an optional extra) / runs the CLI
        importlib.import_module(module)


def test_no_import_goes_up_a_layer():
    upward = [
        f"{m} ({LAYERS[_layer(m)][0]}) imports {t} ({LAYERS[_layer(t)][0]})"
        for m, targets in _edges().items()
        for t in sorted(targets)
        if t in MODULES and _layer(t) > _layer(m)
    ]
    assert upward == []


def test_no_import_cycles():
    edges = _edges()
    cycles, state = [], dict.fromkeys(MODULES, 0)  # 0 unseen, 1 on the path, 2 done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(edges[module]):
            if target not in MODULES:
                continue
            if state[target] == 1:
                cycles.append(" → ".join([*path[path.index(target) :], target]))
            elif state[target] == 0:
                visit(target, [*path, target])
        state[module] = 2

    for module in MODULES:
        if state[module] == 0:
            visit(module, [module])
    assert cycles == []


@pytest.mark.parametrize("where", ["library", "examples"])
def test_no_module_imports_private_parts_of_another(where):
    if where == "library":
        found = [
            why
            for m, p in MODULES.items()
            for t, name in _imports(m, p)
            if (why := _private(m, t, name))
        ]
    else:
        found = []
        for path in sorted((ROOT / "examples").glob("*.py")):
            module = f"examples.{path.stem}"
            tree = ast.parse(path.read_text())
            found += [
                why for t, name in _imports(module, path) if (why := _private(module, t, name))
            ]
            found += [  # vae._builtin_m2 and the like
                f"{path.name} uses {node.value.id}.{node.attr}"
                for node in ast.walk(tree)
                if isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ]
    assert found == []


def test_the_layer_table_is_the_documented_one():
    text = (ROOT / "docs" / "architecture.md").read_text()
    for name, prefixes in LAYERS:
        assert name in text, f"layer {name!r} is not in docs/architecture.md"
        for prefix in prefixes:
            assert f"`{prefix}`" in text, f"{prefix} is not in docs/architecture.md's layer table"
