"""reprobuild build: build a recipe's targets and link the results."""

from __future__ import annotations

import argparse
import json
import sys

from reprobuild.build.engine import BuildReport
from reprobuild.build.plan import Plan
from reprobuild.commands.common import add_build_options, add_recipe, load, run_plan
from reprobuild.commands.substituters import add_substituter_options, substitute_first
from reprobuild.errors import StoreError
from reprobuild.store.store import Store

HELP = "build targets of a recipe (default: all images, else all steps)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_recipe(parser)
    add_build_options(parser, substitute_only=True)
    add_substituter_options(parser)
    parser.add_argument("--json", action="store_true",
                        help='print [{"target", "derivation", "path", "hash", "fsverity", '
                             '"record", "error"}], also when a target fails (then its '
                             '"path" is null and "error" says why)')
    parser.add_argument("--out-link", "-o", metavar="PATH", default=None,
                        help="result link (several targets: PATH-TARGET; default "
                             "result-TARGET)")
    parser.add_argument("--no-out-link", action="store_true",
                        help="create no result links (the outputs may then be collected)")
    add_executor_options(parser)


def add_executor_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--executor", default=None, metavar="local|dask://HOST:PORT",
                        help="where steps run: here (default) or on a Dask cluster of "
                             "`reprobuild worker`s, through --cache")
    parser.add_argument("--cache", default=None, metavar="URL",
                        help="with --executor dask://…: the cache the workers use")
    parser.add_argument("--certs", default=None, metavar="DIR",
                        help="with --executor dask://…: the `reprobuild cluster-certs` "
                             "directory (ca.pem, client.pem, client.key): TLS")
    parser.add_argument("--insecure", action="store_true",
                        help="allow plain TCP to a non-loopback scheduler")


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
    report = run_plan(args, store, plan)
    warn_unreproducible(report)
    try:
        rows = [_row(args, store, plan, report, target) for target in plan.targets]
    finally:
        store.release()  # the result links hold the outputs against gc from here on
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for row in rows:
            if row["path"] is not None:
                print(f"{row['target']} {row['path']}")
    return 0 if report.ok else 1


def _row(args: argparse.Namespace, store: Store, plan: Plan, report: BuildReport,
         target: str) -> dict[str, str | None]:
    """The JSON row of ``target``, after making its result link when it was built."""
    entry = report.entries.get(target)
    if entry is None:
        return {"target": target, "derivation": plan.nodes[target].id, "path": None,
                "hash": None, "fsverity": None, "record": None,
                "error": _why_not_built(plan, report, target)}
    if not args.no_out_link:
        link = result_link(args.out_link, target, several=len(plan.targets) > 1)
        try:
            store.make_result_link(link, entry.derivation_id)
        except OSError as exc:
            raise StoreError(f"cannot create the result link {link}: {exc.strerror}",
                             hint="run in a directory you can write, or give "
                                  "--out-link PATH or --no-out-link") from None
    return {"target": target, "derivation": entry.derivation_id, "path": entry.path,
            "hash": entry.hash, "fsverity": entry.fsverity,
            "record": store.record_path(entry.derivation_id), "error": None}


def result_link(out_link: str | None, target: str, *, several: bool) -> str:
    """Where the result link of ``target`` goes (``--out-link``, or ``result-TARGET``)."""
    if out_link is None:
        return f"result-{target}"
    return f"{out_link}-{target}" if several else out_link


def _why_not_built(plan: Plan, report: BuildReport, target: str) -> str:
    """The JSON ``error`` of a target the build did not produce."""
    failed = {f.key: f for f in report.failures}
    if target in failed:
        return failed[target].message
    needed: set[str] = set()
    stack = [target]
    while stack:
        key = stack.pop()
        if key not in needed:
            needed.add(key)
            stack.extend(plan.nodes[key].deps)
    causes = sorted(needed & failed.keys())
    if causes:
        return f"not built because a dependency failed: {', '.join(causes)}"
    return "not started: the build stopped at the first failure (-k/--keep-going builds it)"
