"""`reprobuild test RECIPE [NAME…]`: build what a recipe's boot tests need, boot each
under QEMU and check the serial console; exit 0 all passed, 1 one failed, 2 on error."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile

from reprobuild.build.plan import plan
from reprobuild.build.recipe import Recipe, load_recipe
from reprobuild.commands.common import add_build_options, run_plan
from reprobuild.errors import RecipeError, suggest
from reprobuild.proof import boottest
from reprobuild.store.store import Store

HELP = ("boot a recipe's [tests.NAME] under QEMU and check the console; exit 0 when "
        "every expected line appeared, 1 when not")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", metavar="RECIPE", help="recipe file (TOML)")
    parser.add_argument("names", metavar="NAME", nargs="*", default=[],
                        help="tests to run (default: all of the recipe's [tests])")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--accel", choices=boottest.ACCELERATORS, default="tcg",
                        help="QEMU accelerator (default tcg; kvm needs a usable /dev/kvm)")
    add_build_options(parser)


def selected(recipe: Recipe, names: list[str]) -> list[str]:
    if not recipe.tests:
        raise RecipeError(f"{recipe.path}: the recipe has no [tests.NAME] tables",
                          hint="add one, e.g. [tests.boot] disk = \"disk\" expect = [...]")
    for name in names:
        if name not in recipe.tests:
            raise RecipeError(f"{recipe.path}: no test named {name!r}",
                              hint=suggest(name, list(recipe.tests), "tests"))
    return list(dict.fromkeys(names)) or list(recipe.tests)


def run(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe)
    names = selected(recipe, args.names)
    targets = list(dict.fromkeys(t for n in names for t in recipe.tests[n].inputs()))
    store = Store(args.store)
    build_plan = plan(recipe, targets, store=store.root)
    try:
        report = run_plan(args, store, build_plan)
        if not report.ok:
            return 1
        inputs = {name: entry.path for name, entry in report.entries.items()}
        results = []
        for name in names:
            test = recipe.tests[name]
            with tempfile.TemporaryDirectory(prefix="reprobuild-test-") as workdir:
                argv = boottest.prepare(test, inputs, workdir, accel=args.accel)
                result = boottest.boot(test, argv)
            results.append(result)
            if not args.json:
                _say(result)
    finally:
        store.release()
    if args.json:
        print(json.dumps([{"test": r.name, "ok": r.ok, "seconds": round(r.seconds, 1),
                           "reason": r.reason, "missing": list(r.missing),
                           "tail": list(r.tail())} for r in results], indent=2))
    return 0 if all(r.ok for r in results) else 1


def _say(result: boottest.BootResult) -> None:
    if result.ok:
        print(f"test {result.name}: ok ({result.seconds:.1f} s)")
        return
    print(f"test {result.name}: FAILED ({result.reason}, {result.seconds:.1f} s); "
          f"not seen: {result.missing[0]!r}", file=sys.stderr)
    print(f"last {len(result.tail())} console lines:", file=sys.stderr)
    for line in result.tail():
        print(f"  | {line}", file=sys.stderr)
