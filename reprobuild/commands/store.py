"""reprobuild store: list, verify (and repair) the store, delete entries."""

from __future__ import annotations

import argparse
import os
import sys

from reprobuild.errors import ReprobuildError
from reprobuild.proof import records
from reprobuild.store.store import Store

ACTIONS = ("verify", "ls", "delete")
HELP = ("store operations: verify [--repair] (re-hash and check every entry), ls (list "
        "valid outputs), delete ID... (an output and what depends on it)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=ACTIONS, help="what to do")
    parser.add_argument("ids", nargs="*", metavar="ID",
                        help="delete: derivation ids, store paths or result links (before "
                             "any option)")
    parser.add_argument("--repair", action="store_true",
                        help="verify: rewrite wrong records; remove damaged entries and "
                             "what depends on them (the next build makes them again)")
    parser.add_argument("--force", action="store_true",
                        help="delete: even what a result link or a running build holds")
    parser.add_argument("--dry-run", action="store_true", help="delete: only say what would go")


def _ls(store: Store) -> int:
    for entry in store.paths():
        meta = store.metadata(entry.derivation_id) or {}
        drv = meta.get("derivation")
        name = drv.get("name", "") if isinstance(drv, dict) else ""
        print(f"{entry.derivation_id} {entry.type} {entry.hash} {name}")
    return 0


def _verify(store: Store, *, repair: bool) -> int:
    problems = store.verify(record_check=records.check_entry_record)
    count = len(store.paths())
    for problem in problems:
        print(f"reprobuild: {problem.name or problem.derivation_id} ({problem.path}): "
              f"{problem.message}", file=sys.stderr)
    if not problems:
        print(f"{count} outputs verified", file=sys.stderr)
        return 0
    damaged = len({p.derivation_id for p in problems})
    print(f"{damaged} damaged entries ({len(problems)} problems), {count} valid outputs",
          file=sys.stderr)
    if not repair:
        print("reprobuild: run `reprobuild store verify --repair` to remove or fix them",
              file=sys.stderr)
        return 1
    removed = store.repair(problems, record=records.entry_record)
    for did in removed:
        print(f"removed {store.output_path(did)}")
    print(f"repaired: {len(removed)} entries removed (the next build makes them again), "
          "records rewritten", file=sys.stderr)
    return 0


def run(args: argparse.Namespace) -> int:
    store = Store(args.store)
    if args.action != "delete" and (args.ids or args.force):
        raise ReprobuildError(f"store {args.action} takes no ids or --force",
                              hint="reprobuild store delete ID... [--force]")
    if args.action == "ls":
        return _ls(store)
    if args.action == "verify":
        return _verify(store, repair=args.repair)
    if not args.ids:
        raise ReprobuildError("store delete needs at least one derivation id",
                              hint="`reprobuild store ls` lists them")
    ids = [store_id(item) for item in args.ids]
    for did in store.delete(ids, force=args.force, dry_run=args.dry_run):
        verb = "would delete" if args.dry_run else "deleted"
        print(f"{verb} {store.output_path(did)}")
    return 0


def store_id(item: str) -> str:
    """A derivation id from an id, a store path or a result link."""
    path = os.path.realpath(item) if os.path.lexists(item) else item
    return os.path.basename(path.rstrip("/"))
