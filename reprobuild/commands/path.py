"""reprobuild path: print the store paths of built targets."""

from __future__ import annotations

import argparse
import sys

from reprobuild.commands.common import add_recipe, load, suggested

HELP = "print the store path of each target (exit 1 when one is not built)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_recipe(parser)


def _warn(message: str) -> None:
    print(f"reprobuild: warning: {message}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    _recipe, store, plan = load(args, args.targets)
    status = 0
    for target in plan.targets:
        entry = store.trusted(plan.nodes[target].id, warn=_warn)  # never a damaged path
        if entry is None:
            build = suggested(args, "build", args.recipe, target)
            print(f"reprobuild: {target} is not built ({build})", file=sys.stderr)
            status = 1
        else:
            print(entry.path)
    return status
