"""The layer rule of docs/architecture.md: a module imports only from its own layer or the layers below it.

Every import counts, the lazy ones inside functions included: a lazy import hides a cycle, it does not
remove the dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import longattn

PACKAGE = Path(longattn.__file__).parent
# Bottom to top. The package root (longattn/__init__.py) is the public API that re-exports the layers below
# it; the CLI is a client of that API, and ``python -m longattn`` (__main__) runs the CLI.
LAYERS = ("core", "ops", "methods", "analysis", "hf", "bench", "__init__", "cli", "__main__")


def _layer(module: str) -> int:
    """Rank of ``longattn.x.y``: the index of its first component in LAYERS (``longattn`` is ``__init__``)."""
    parts = module.split(".")
    if parts[0] != "longattn":
        raise ValueError(module)
    return LAYERS.index(parts[1] if len(parts) > 1 else "__init__")


def _modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out.append((".".join(parts), path))
    return out


def _imports(module: str, path: Path) -> list[tuple[int, str]]:
    """``(line, imported module)`` for every longattn import in ``path``, relative ones resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]  # what `from . import` means
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.append((node.lineno, name))
    return [(line, name) for line, name in found if name == "longattn" or name.startswith("longattn.")]


def test_every_module_sits_in_a_known_layer():
    for module, _ in _modules():
        _layer(module)  # raises for a top-level name missing from LAYERS


@pytest.mark.parametrize("module, path", _modules(), ids=[m for m, _ in _modules()])
def test_no_module_imports_a_higher_layer(module, path):
    mine = _layer(module)
    upward = [f"{path.name}:{line} imports {name} (layer {LAYERS[_layer(name)]})"
              for line, name in _imports(module, path) if _layer(name) > mine]
    assert not upward, f"{module} is in layer {LAYERS[mine]}: " + "; ".join(upward)


def test_the_rule_catches_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from longattn.hf import apply\n")
    assert _imports("longattn.core.bad", bad) == [(2, "longattn.hf")]
    assert _layer("longattn.hf") > _layer("longattn.core.bad")


# The architecture issue's size targets: a file that grows past them is a file that mixes concerns.
MAX_SOURCE_LINES = 350
MAX_METHOD_LINES = 200
# Shared bases in methods/ are not one method each.
_METHOD_BASES = ("__init__", "base", "topk")


@pytest.mark.parametrize("module, path", _modules(), ids=[m for m, _ in _modules()])
def test_every_source_file_stays_small(module, path):
    lines = len(path.read_text().splitlines())
    limit = MAX_SOURCE_LINES
    if path.parent.name == "methods" and path.stem not in _METHOD_BASES:
        limit = MAX_METHOD_LINES
    assert lines <= limit, f"{path.relative_to(PACKAGE.parent)} has {lines} lines (at most {limit}): split it by concern"
