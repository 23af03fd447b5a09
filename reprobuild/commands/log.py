"""reprobuild log: print the build log of a target (from the store, else from a cache)."""

from __future__ import annotations

import argparse
import sys

from reprobuild.cache.backend import open_cache
from reprobuild.cache.layout import log_name
from reprobuild.cache.substitute import LOG_LIMIT
from reprobuild.commands.common import add_recipe, load, suggested
from reprobuild.errors import StoreError

HELP = "print the build log of a target"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_recipe(parser, targets="1")
    parser.add_argument("--cache", metavar="URL", default=None,
                        help="when the store has no log: read it from this cache (a step "
                             "built by `build --executor dask://…` on a worker)")


def run(args: argparse.Namespace) -> int:
    _recipe, store, plan = load(args, [args.target])
    node = plan.nodes[args.target]
    path = store.log_path(node.id)
    try:
        with open(path, "rb") as f:
            sys.stdout.buffer.write(f.read())
        return 0
    except FileNotFoundError:
        pass
    kind = node.derivation.kind
    if kind not in ("step", "image"):
        raise StoreError(f"{args.target} is a source ({kind}); sources have no build log")
    if args.cache:
        cache = open_cache(args.cache)
        try:
            log = cache.read_bytes(log_name(node.id), limit=LOG_LIMIT)
        finally:
            cache.close()
        if log is not None:
            sys.stdout.buffer.write(log)
            return 0
    where = f"{store.root}" + (f" or the cache {args.cache}" if args.cache else "")
    raise StoreError(f"no build log for {args.target} ({node.id}) in {where}",
                     hint="build it first: "
                          + suggested(args, "build", args.recipe, args.target))
