"""`reprobuild check`: rebuild under varied host conditions and compare bit for bit."""

from __future__ import annotations

import argparse
import json
import sys

from reprobuild.commands.common import add_recipe, positive_int
from reprobuild.proof import check, variations

HELP = ("rebuild targets under other host conditions and compare with the stored outputs; "
        "exit 0 identical, 1 not reproducible, 2 error")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_recipe(parser)
    parser.add_argument("--deep", action="store_true",
                        help="rebuild the whole chain of steps, not only the targets")
    parser.add_argument("--rounds", type=positive_int, default=1, metavar="N",
                        help="rebuild N times (default 1)")
    parser.add_argument("--variations", metavar="LIST", default=None,
                        help="comma-separated variations to apply (default all: "
                             + ", ".join(variations.VARIATION_NAMES) + "; or none)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the rebuilt outputs and say where")
    parser.add_argument("--diffoscope", action="store_true",
                        help="also hand differing outputs to diffoscope")
    parser.add_argument("--explain", action="store_true",
                        help="when an output differs, rebuild with no variation and with "
                             "each variation alone to say which one causes it")
    parser.add_argument("--no-mark", action="store_true",
                        help="do not mark differing steps in the store")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args: argparse.Namespace) -> int:
    result = check.run_check(
        args.recipe, args.targets, args.store, deep=args.deep, rounds=args.rounds,
        chosen=variations.parse_variations(args.variations), keep=args.keep,
        diffoscope=args.diffoscope, mark=not args.no_mark, explain=args.explain,
        progress=lambda line: print(f"reprobuild: check {line}", file=sys.stderr))
    if args.json:
        sys.stdout.write(json.dumps(result.to_json(), indent=2, sort_keys=True) + "\n")
    else:
        sys.stdout.write(result.render())
    return 0 if result.identical else 1
