"""reprobuild show: print a target's derivation as JSON with its id."""

from __future__ import annotations

import argparse

from reprobuild.commands.common import add_recipe, load

HELP = "print the derivation of a target as JSON, with its id"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_recipe(parser, targets="1")


def run(args: argparse.Namespace) -> int:
    _recipe, _store, plan = load(args, [args.target])
    print(plan.nodes[args.target].derivation.dumps())
    return 0
