"""reprobuild gc: delete store outputs that no root reaches."""

from __future__ import annotations

import argparse

from reprobuild.commands.store import store_id
from reprobuild.errors import StoreError
from reprobuild.store.store import Store

HELP = "delete what no root (result link, running build or --keep) reaches"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--keep", action="append", default=[], metavar="ID_OR_PATH",
                        help="also keep this derivation id or store path (repeatable)")
    parser.add_argument("--dry-run", action="store_true",
                        help="only print the paths that would be deleted")


def run(args: argparse.Namespace) -> int:
    store = Store(args.store)
    keep = [store_id(item) for item in args.keep]
    unknown = [item for item, did in zip(args.keep, keep, strict=True)
               if store.lookup(did) is None]
    if unknown:
        raise StoreError(f"--keep: not a valid entry of the store {store.root}: "
                         f"{', '.join(unknown)}",
                         hint="give a derivation id from `reprobuild store ls`, a store "
                              "path or a result link")
    result = store.gc(keep=keep, dry_run=args.dry_run)
    if args.dry_run:
        for path in result.paths:
            print(path)
    verb = "would delete" if args.dry_run else "deleted"
    print(f"{verb} {len(result.deleted)} outputs ({result.freed_bytes / 1e6:.1f} MB), "
          f"kept {len(result.kept)}")
    return 0
