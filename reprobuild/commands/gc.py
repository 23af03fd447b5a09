"""reprobuild gc: delete store outputs that no root reaches."""

from __future__ import annotations

import argparse
import os

from reprobuild.store.store import Store

HELP = "delete what no root (result link or --keep) reaches"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--keep", action="append", default=[], metavar="ID_OR_PATH",
                        help="also keep this derivation id or store path (repeatable)")
    parser.add_argument("--dry-run", action="store_true", help="only say what would go")


def run(args: argparse.Namespace) -> int:
    store = Store(args.store)
    keep = []
    for item in args.keep:
        path = os.path.realpath(item) if os.path.lexists(item) else item
        keep.append(os.path.basename(path))
    result = store.gc(keep=keep, dry_run=args.dry_run)
    verb = "would delete" if args.dry_run else "deleted"
    print(f"{verb} {len(result.deleted)} outputs ({result.freed_bytes / 1e6:.1f} MB), "
          f"kept {len(result.kept)}")
    return 0
