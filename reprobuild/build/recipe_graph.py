"""A recipe's dependency graph checks: every input exists, and there is no cycle.

Both walks are iterative and linear in the size of the graph (recipes of any depth).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from reprobuild.errors import RecipeError, suggest

if TYPE_CHECKING:
    from reprobuild.build.recipe import Recipe


def check_inputs(recipe: Recipe) -> None:
    names = recipe.names()
    known = set(names)
    for section, items in (("steps", recipe.steps), ("images", recipe.images)):
        for name in items:
            for dep in recipe.inputs_of(name):
                if dep not in known:
                    key = "from" if section == "images" and dep == recipe.images[name].source \
                        else "inputs"
                    raise RecipeError(
                        f"{recipe.path}: [{section}.{name}] {key}: no source, step or image "
                        f"named {dep!r}", hint=suggest(dep, names, "names"))
                if dep == name:
                    raise RecipeError(f"{recipe.path}: [{section}.{name}]: depends on itself "
                                      f"(cycle {name} -> {name})")


def check_cycles(recipe: Recipe) -> None:
    """Refuse a dependency cycle, naming it; an iterative depth-first walk, linear in the
    size of the graph (recipes of any depth)."""
    done: set[str] = set()
    for root in recipe.names():
        if root in done:
            continue
        # The walk's path: (name, its inputs, index of the next input); on_path mirrors it.
        path: list[tuple[str, tuple[str, ...], int]] = [(root, recipe.inputs_of(root), 0)]
        on_path = {root: 0}
        while path:
            name, deps, index = path[-1]
            if index == len(deps):
                path.pop()
                del on_path[name]
                done.add(name)
                continue
            path[-1] = (name, deps, index + 1)
            dep = deps[index]
            if dep in on_path:
                cycle = [entry[0] for entry in path[on_path[dep]:]] + [dep]
                raise RecipeError(f"{recipe.path}: dependency cycle: {' -> '.join(cycle)}",
                                  hint="a step cannot depend, directly or not, on itself")
            if dep not in done:
                on_path[dep] = len(path)
                path.append((dep, recipe.inputs_of(dep), 0))
