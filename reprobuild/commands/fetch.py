"""reprobuild fetch: download a recipe's fixed-output sources into the store."""

from __future__ import annotations

import argparse
import sys

from reprobuild.build.plan import Plan
from reprobuild.commands.common import add_recipe, build_plan, load

HELP = "fetch the Debian packages a recipe's targets need, so later builds work offline"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_recipe(parser)


def run(args: argparse.Namespace) -> int:
    recipe, store, full = load(args, args.targets)
    fetches = [key for key in full.nodes if key.endswith("#fetch")]
    if not fetches:
        print("nothing to fetch", file=sys.stderr)
        return 0
    plan = Plan(recipe, fetches, {k: full.nodes[k] for k in fetches})
    report = build_plan(args, store, plan)
    if report is None:
        return 1
    for key in fetches:
        print(f"{key.removesuffix('#fetch')} {report.entries[key].path}")
    return 0
