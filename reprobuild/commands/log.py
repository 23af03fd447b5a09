"""reprobuild log: print the build log of a target."""

from __future__ import annotations

import argparse
import sys

from reprobuild.commands.common import add_recipe, load, suggested
from reprobuild.errors import StoreError

HELP = "print the build log of a target"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_recipe(parser, targets="1")


def run(args: argparse.Namespace) -> int:
    _recipe, store, plan = load(args, [args.target])
    node = plan.nodes[args.target]
    path = store.log_path(node.id)
    try:
        with open(path, "rb") as f:
            sys.stdout.buffer.write(f.read())
    except FileNotFoundError:
        kind = node.derivation.kind
        if kind not in ("step", "image"):
            raise StoreError(f"{args.target} is a source ({kind}); sources have no build log",
                             ) from None
        raise StoreError(f"no build log for {args.target} ({node.id}) in {store.root}",
                         hint="build it first: "
                              + suggested(args, "build", args.recipe, args.target)) from None
    return 0
