"""The shape of the code, enforced: which package may import which, no imports hidden in
functions, no module over 500 lines and no function over 80.

The rules, with the direction of every arrow (ARCHITECTURE.md explains them):

* ``sandbox`` never imports ``reprobuild`` (it is a stand-alone program);
* ``images`` never imports ``build`` (writers know trees and the store, not recipes);
* ``trees`` never imports ``images`` or ``build``;
* ``store`` never imports ``proof`` (records are written by whoever builds);
* ``integrity`` imports nothing of ours but ``reprobuild.errors``;
* Dask (``distributed``, ``dask``) is imported only in ``reprobuild/distributed/``, and that
  package only by ``reprobuild/commands/`` (the engine loads it lazily, by name);
* an ``import`` statement sits at module level; lazy loading of format and command
  modules goes through ``importlib.import_module`` in the registry and the CLI.
"""

from __future__ import annotations

import ast
import configparser
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80

FORBIDDEN: dict[str, tuple[str, ...]] = {
    "sandbox/": ("reprobuild",),
    "reprobuild/images/": ("reprobuild.build",),
    "reprobuild/trees/": ("reprobuild.images", "reprobuild.build"),
    "reprobuild/store/": ("reprobuild.proof",),
    "reprobuild/distributed/": ("reprobuild.commands", "reprobuild.cli"),
}
# Distributions whose import name is not their name.
IMPORT_NAMES = {"pyelftools": "elftools"}
INTEGRITY_MAY_IMPORT = ("reprobuild.errors", "reprobuild.integrity")


def modules() -> list[Path]:
    return sorted(p for top in ("reprobuild", "sandbox") for p in (ROOT / top).rglob("*.py"))


def relative(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> Iterator[tuple[int, str]]:
    """Every module an import statement of ``path`` names (relative imports resolved)."""
    package = module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" \
        else module_name(path)
    for node in ast.walk(ast.parse(path.read_bytes())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            yield node.lineno, base
            for alias in node.names:
                yield node.lineno, f"{base}.{alias.name}"


def names_module(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def functions(tree: ast.AST) -> Iterator[ast.FunctionDef | ast.AsyncFunctionDef]:
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node


def test_import_arrows_point_one_way() -> None:
    found = {relative(p) for p in modules()}
    assert "reprobuild/images/ext4/layout.py" in found and "sandbox/server.py" in found
    assert all((ROOT / folder).is_dir() for folder in FORBIDDEN)
    wrong = []
    for path in modules():
        rel = relative(path)
        for folder, banned in FORBIDDEN.items():
            if rel.startswith(folder):
                wrong += [f"{rel}:{line} imports {name}" for line, name in imported(path)
                          if any(names_module(name, b) for b in banned)]
        if rel.startswith("reprobuild/integrity/"):
            wrong += [f"{rel}:{line} imports {name}" for line, name in imported(path)
                      if names_module(name, "reprobuild")
                      and not any(names_module(name, ok) for ok in INTEGRITY_MAY_IMPORT)
                      and name != "reprobuild"]
    assert wrong == []


def test_no_import_inside_a_function() -> None:
    hidden = []
    for path in modules():
        for function in functions(ast.parse(path.read_bytes())):
            hidden += [f"{relative(path)}:{node.lineno} in {function.name}()"
                       for node in ast.walk(function)
                       if isinstance(node, ast.Import | ast.ImportFrom)]
    assert hidden == [], "import at module level; load formats and commands via importlib"


def test_no_module_over_500_lines() -> None:
    long = [f"{relative(p)}: {n} lines" for p in modules()
            if (n := len(p.read_bytes().splitlines())) > MAX_MODULE_LINES]
    assert long == []


def test_no_function_over_80_lines() -> None:
    long = []
    for path in modules():
        for function in functions(ast.parse(path.read_bytes())):
            first = min([function.lineno, *(d.lineno for d in function.decorator_list)])
            lines = (function.end_lineno or function.lineno) - first + 1
            if lines > MAX_FUNCTION_LINES:
                long.append(f"{relative(path)}:{function.lineno} {function.name}: {lines} lines")
    assert long == []


def test_tree_is_changed_only_by_its_own_methods() -> None:
    """Nothing reaches into a Tree's private state: changes go through Tree's methods,
    and hardlink groups are made canonical in one place, TreeBuilder."""
    private = {"_entries", "_children", "_sorted"}
    reached = []
    for path in modules():
        for node in ast.walk(ast.parse(path.read_bytes())):
            if (isinstance(node, ast.Attribute) and node.attr in private
                    and not (isinstance(node.value, ast.Name) and node.value.id == "self")):
                reached.append(f"{relative(path)}:{node.lineno} .{node.attr}")
    assert reached == []


def test_every_pinned_dependency_is_imported() -> None:
    """A dependency list names what the code uses (setup.cfg install_requires)."""
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    pinned = {IMPORT_NAMES.get(name, name.replace("-", "_")) for name in (
        line.split("==")[0].strip()
        for line in config["options"]["install_requires"].splitlines() if line.strip())}
    used = {name.split(".")[0] for path in modules() for _, name in imported(path)}
    assert sorted(pinned - used) == []


def test_dask_stays_in_the_distributed_package() -> None:
    """Dask is big and runs pickles: only reprobuild.distributed imports it, and only the
    commands import that package (build loads its executor by name, when asked)."""
    wrong = []
    for path in modules():
        rel = relative(path)
        for line, name in imported(path):
            if (names_module(name, "distributed") or names_module(name, "dask")) \
                    and not rel.startswith("reprobuild/distributed/"):
                wrong.append(f"{rel}:{line} imports {name}")
            if names_module(name, "reprobuild.distributed") and not rel.startswith(
                    ("reprobuild/distributed/", "reprobuild/commands/")):
                wrong.append(f"{rel}:{line} imports {name}")
    assert wrong == []
