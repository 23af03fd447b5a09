"""reprobuild store: inspect and verify the store."""

from __future__ import annotations

import argparse
import sys

from reprobuild.store.store import Store

HELP = "store operations: verify (re-hash every output), ls (list valid outputs)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("verify", "ls"), help="what to do")


def run(args: argparse.Namespace) -> int:
    store = Store(args.store)
    if args.action == "ls":
        for entry in store.paths():
            meta = store.metadata(entry.derivation_id) or {}
            name = meta.get("derivation", {}).get("name", "")
            print(f"{entry.derivation_id} {entry.type} {entry.hash} {name}")
        return 0
    problems = store.verify()
    count = len(store.paths())
    for problem in problems:
        print(f"reprobuild: {problem.name or problem.derivation_id} ({problem.path}): "
              f"{problem.message}", file=sys.stderr)
    if problems:
        print(f"{len(problems)} of {count} outputs changed", file=sys.stderr)
        return 1
    print(f"{count} outputs verified", file=sys.stderr)
    return 0
