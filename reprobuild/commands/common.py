"""Helpers the engine's subcommands share: load a recipe and a store, make an engine."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace

from reprobuild.build.engine import BuildReport, Engine, Options
from reprobuild.build.plan import Plan, plan
from reprobuild.build.progress import Progress
from reprobuild.build.recipe import Recipe, load_recipe
from reprobuild.build.sandboxing import start_runner

__all__ = ["add_build_options", "add_recipe", "build_plan", "load", "make_engine",
           "print_failures", "start_runner"]
from reprobuild.errors import DiskFullError
from reprobuild.store.store import Store


def add_recipe(parser: argparse.ArgumentParser, *, targets: str = "*") -> None:
    parser.add_argument("recipe", metavar="RECIPE", help="recipe file (TOML)")
    if targets == "*":
        parser.add_argument("targets", metavar="TARGET", nargs="*",
                            help="sources, steps or images (default: all images, else all "
                                 "steps)")
    elif targets == "1":
        parser.add_argument("target", metavar="TARGET", help="a source, step or image")


def add_build_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 1, metavar="N",
                        help="steps to run at once (default: number of cores)")
    parser.add_argument("--offline", action="store_true",
                        help="never touch the network; name each missing input")
    parser.add_argument("--keep-going", action="store_true",
                        help="after a failure, let independent steps finish")
    parser.add_argument("--keep-failed", action="store_true",
                        help="keep a failed step's /build and $out, and say where")


def load(args: argparse.Namespace, targets: list[str] | None = None
         ) -> tuple[Recipe, Store, Plan]:
    recipe = load_recipe(args.recipe)
    store = Store(args.store)
    return recipe, store, plan(recipe, targets)


def make_engine(args: argparse.Namespace, store: Store, *, quiet: bool = False) -> Engine:
    options = Options(jobs=max(1, getattr(args, "jobs", 1) or 1),
                      keep_going=getattr(args, "keep_going", False),
                      keep_failed=getattr(args, "keep_failed", False),
                      offline=getattr(args, "offline", False),
                      cores=max(1, getattr(args, "jobs", 1) or 1),
                      debug=getattr(args, "debug", False))
    return Engine(store, lambda: start_runner(debug=options.debug), options,
                  Progress(enabled=not quiet))


def print_failures(report: BuildReport) -> None:
    for failure in report.failures:
        print(f"reprobuild: error: {failure.message}", file=sys.stderr)
    if report.skipped:
        print(f"reprobuild: not built because a dependency failed: "
              f"{', '.join(report.skipped)}", file=sys.stderr)


def build_plan(args: argparse.Namespace, store: Store, plan: Plan) -> BuildReport | None:
    """Build ``plan`` with an engine made from ``args``, then close it; None (the
    failures printed) when the build failed."""
    engine = make_engine(args, store)
    try:
        report = engine.build(plan)
    finally:
        engine.close()
    if not report.ok:
        # A full disk is the environment's fault, not the recipe's: exit 2, said last.
        full = [f for f in report.failures if isinstance(f.error, DiskFullError)]
        print_failures(replace(report, failures=[f for f in report.failures
                                                 if f not in full]))
        if full and full[0].error is not None:
            raise full[0].error
        return None
    return report
