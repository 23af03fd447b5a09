"""reprobuild build: build a recipe's targets and link the results."""

from __future__ import annotations

import argparse
import json
import sys

from reprobuild.build.engine import BuildReport
from reprobuild.commands.common import add_build_options, add_recipe, build_plan, load
from reprobuild.commands.substituters import add_substituter_options, substitute_first

HELP = "build targets of a recipe (default: all images, else all steps)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_recipe(parser)
    add_build_options(parser)
    add_substituter_options(parser)
    parser.add_argument("--json", action="store_true",
                        help='print [{"target", "derivation", "path", "hash", "fsverity"}]')
    parser.add_argument("--out-link", "-o", metavar="PATH", default=None,
                        help="result link (several targets: PATH-TARGET; default "
                             "result-TARGET)")
    parser.add_argument("--no-out-link", action="store_true",
                        help="create no result links (the outputs may then be collected)")


def warn_unreproducible(report: BuildReport) -> None:
    """Say which outputs `reprobuild check` found not reproducible."""
    for key, entry in sorted(report.entries.items()):
        marked = entry.unreproducible
        if not marked:
            continue
        paths = ", ".join(f"{d.get('path') or '/'} ({d.get('kind')})"
                          for d in marked.get("differences", [])[:3])
        print(f"reprobuild: warning: {key} is not reproducible: a rebuild under "
              f"{', '.join(marked.get('variations', [])) or 'no variation'} differed"
              + (f" at {paths}" if paths else ""), file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    _recipe, store, plan = load(args, args.targets)
    done = substitute_first(args, store, plan)
    if done is not None:
        return done
    report = build_plan(args, store, plan)
    if report is None:
        return 1
    warn_unreproducible(report)
    rows = []
    for target in plan.targets:
        entry = report.entries[target]
        if not args.no_out_link:
            if args.out_link is None:
                link = f"result-{target}"
            else:
                link = args.out_link if len(plan.targets) == 1 else f"{args.out_link}-{target}"
            store.make_result_link(link, entry.derivation_id)
        rows.append({"target": target, "derivation": entry.derivation_id, "path": entry.path,
                     "hash": entry.hash, "fsverity": entry.fsverity,
                     "record": store.record_path(entry.derivation_id)})
    store.release()  # the result links hold the outputs against gc from here on
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for row in rows:
            print(f"{row['target']} {row['path']}")
    return 0
