"""Helpers the engine's subcommands share: load a recipe and a store, make an engine."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from dataclasses import replace

from reprobuild.build import hints
from reprobuild.build.engine import BuildReport, Engine, Executor, Options
from reprobuild.build.plan import Plan, plan
from reprobuild.build.progress import Progress
from reprobuild.build.recipe import Recipe, load_recipe
from reprobuild.build.sandboxing import start_runner
from reprobuild.cache.settings import executor_settings, resolve

__all__ = ["add_build_options", "add_recipe", "build_plan", "load", "make_engine",
           "positive_int", "print_failures", "run_plan", "start_runner", "suggested"]
from reprobuild.errors import DiskFullError
from reprobuild.store.store import Store


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1 (``-j 0`` and ``-j -1`` are refused)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {value}")
    return value


def jobs_or_zero(text: str) -> int:
    """argparse type for ``build -j``: at least 0 (0 builds nothing, only substitutes)."""
    return 0 if text.strip() == "0" else positive_int(text)


def add_recipe(parser: argparse.ArgumentParser, *, targets: str = "*") -> None:
    parser.add_argument("recipe", metavar="RECIPE", help="recipe file (TOML)")
    if targets == "*":
        # default=[]: without a default argparse counts a "*" positional as required and
        # says "RECIPE, TARGET are required" when only RECIPE is missing.
        parser.add_argument("targets", metavar="TARGET", nargs="*", default=[],
                            help="sources, steps or images (default: all images, else all "
                                 "steps)")
    elif targets == "1":
        parser.add_argument("target", metavar="TARGET", help="a source, step or image")
    elif targets == "step":
        parser.add_argument("target", metavar="STEP",
                            help="a step of the recipe ([steps.NAME])")


def add_build_options(parser: argparse.ArgumentParser, *, substitute_only: bool = False
                      ) -> None:
    """``substitute_only`` lets ``-j 0`` mean: build nothing, take everything from caches."""
    parser.add_argument("-j", "--jobs", type=jobs_or_zero if substitute_only else positive_int,
                        default=os.cpu_count() or 1, metavar="N",
                        help="steps to run at once, at least 1 (default: number of cores)"
                             + ("; 0: build nothing, only substitute from caches"
                                if substitute_only else ""))
    parser.add_argument("--offline", action="store_true",
                        help="never touch the network; name each missing input")
    parser.add_argument("-k", "--keep-going", action="store_true",
                        help="after a failure, let independent steps finish")
    parser.add_argument("-K", "--keep-failed", action="store_true",
                        help="keep a failed step's /build and $out, and say where")


def suggested(args: argparse.Namespace, subcommand: str, *words: str) -> str:
    """A ``reprobuild`` command line for a hint, with the ``--store`` the user gave."""
    return hints.command(subcommand, *words, store=getattr(args, "store_option", None))


def load(args: argparse.Namespace, targets: list[str] | None = None
         ) -> tuple[Recipe, Store, Plan]:
    recipe = load_recipe(args.recipe)
    store = Store(args.store)
    return recipe, store, plan(recipe, targets, store=store.root)


def make_engine(args: argparse.Namespace, store: Store, *, quiet: bool = False) -> Engine:
    options = Options(jobs=max(1, getattr(args, "jobs", 1) or 1),
                      keep_going=getattr(args, "keep_going", False),
                      keep_failed=getattr(args, "keep_failed", False),
                      offline=getattr(args, "offline", False),
                      cores=max(1, getattr(args, "jobs", 1) or 1),
                      debug=getattr(args, "debug", False),
                      store_option=getattr(args, "store_option", None))
    progress = Progress(enabled=not quiet)
    return Engine(store, lambda: start_runner(debug=options.debug), options, progress,
                  executor=remote_executor(args, store, options, progress))


# Executors other than the local thread pool, loaded only when asked for (Dask is big).
EXECUTORS = {"dask": "reprobuild.distributed.executor"}


def remote_executor(args: argparse.Namespace, store: Store, options: Options,
                    progress: Progress) -> Executor | None:
    """The executor ``--executor`` names (None: the local thread pool)."""
    if not hasattr(args, "executor"):
        return None
    chosen = executor_settings(args.executor, args.cache, args.certs)
    if chosen.executor in (None, "local"):
        return None
    module = importlib.import_module(EXECUTORS["dask"])
    trusted = resolve(getattr(args, "substituters", None),
                      getattr(args, "trusted_keys", None)).trusted_keys
    executor: Executor = module.open_executor(
        chosen.executor, certs=chosen.certs, insecure=args.insecure, cache_url=chosen.cache,
        trusted_keys=trusted, store=store, options=options, progress=progress, warn=_warn)
    return executor


def _warn(message: str) -> None:
    print(f"reprobuild: warning: {message}", file=sys.stderr)


LISTED = 20
"""How many names a line about steps not built lists (a recipe may have thousands)."""


def _names(keys: list[str]) -> str:
    more = f", … ({len(keys) - LISTED} more)" if len(keys) > LISTED else ""
    return ", ".join(keys[:LISTED]) + more


def print_failures(report: BuildReport) -> None:
    """Say what failed, what was not built because of it, and what never started."""
    for failure in report.failures:
        print(f"reprobuild: error: {failure.message}", file=sys.stderr)
    if report.skipped:
        print(f"reprobuild: not built because a dependency failed: "
              f"{_names(report.skipped)}", file=sys.stderr)
    if report.cancelled:
        print(f"reprobuild: not started because the build stopped at the first failure "
              f"(-k/--keep-going builds them): {_names(report.cancelled)}",
              file=sys.stderr)


def run_plan(args: argparse.Namespace, store: Store, plan: Plan) -> BuildReport:
    """Build ``plan`` with an engine made from ``args``, then close it; the failures of
    a build that did not succeed are printed."""
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
    return report


def build_plan(args: argparse.Namespace, store: Store, plan: Plan) -> BuildReport | None:
    """:func:`run_plan`, or None when the build failed."""
    report = run_plan(args, store, plan)
    return report if report.ok else None
