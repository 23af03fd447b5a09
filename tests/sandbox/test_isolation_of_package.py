"""sandbox/ never imports reprobuild: the engine reaches it through sandbox.spec only."""

from __future__ import annotations

import ast
from pathlib import Path

SANDBOX = Path(__file__).resolve().parents[2] / "sandbox"


def imported_modules(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module" and node.args
              and isinstance(node.args[0], ast.Constant)):
            names.append(str(node.args[0].value))
    return names


def test_sandbox_never_imports_reprobuild() -> None:
    sources = sorted(SANDBOX.rglob("*.py"))
    assert len(sources) >= 8
    offenders = [f"{path.name}: {name}" for path in sources
                 for name in imported_modules(path)
                 if name == "reprobuild" or name.startswith("reprobuild.")]
    assert offenders == []


def test_the_check_sees_imports() -> None:
    sample = SANDBOX.parent / "tests" / "sandbox" / "conftest.py"
    assert "tests.conftest" in imported_modules(sample)
