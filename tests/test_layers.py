"""The package's layers import downwards only: the graph (IR, op definitions, step state) and the
models built on it know nothing of code generation, the runtime or the vLLM integration."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.helpers import REPO

PACKAGE = REPO / "vllm_mpk"
ABOVE_THE_GRAPH = ("vllm_mpk.codegen", "vllm_mpk.runtime", "vllm_mpk.integration")


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


@pytest.mark.parametrize("layer", ["graph", "models"])
def test_lower_layers_import_nothing_above_them(layer: str) -> None:
    files = sorted((PACKAGE / layer).rglob("*.py"))
    assert files
    upward = {f"{path.relative_to(PACKAGE)} imports {module}" for path in files for module in imported_modules(path)
              if module.startswith(ABOVE_THE_GRAPH)}
    assert not upward, sorted(upward)


def test_import_scan_sees_imports_inside_functions(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from vllm_mpk.runtime import meta\n")
    assert imported_modules(source) == {"vllm_mpk.runtime"}
