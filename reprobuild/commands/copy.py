"""reprobuild copy: copy outputs (with their build-time closure) to or from a cache."""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time

from reprobuild.build.plan import plan
from reprobuild.build.recipe import load_recipe
from reprobuild.cache.backend import Cache, CacheError, open_cache
from reprobuild.cache.download import download
from reprobuild.cache.layout import is_hex64
from reprobuild.cache.settings import load_keys, resolve
from reprobuild.cache.substitute import open_substituters
from reprobuild.cache.upload import upload
from reprobuild.errors import ReprobuildError, StoreError
from reprobuild.proof import signing
from reprobuild.store.store import Store

HELP = "copy built outputs, their inputs, logs and records to a cache (--to) or from one"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    direction = parser.add_mutually_exclusive_group(required=True)
    direction.add_argument("--to", metavar="URL",
                           help="upload to this cache (file:///DIR, http(s)://…, s3://…)")
    direction.add_argument("--from", dest="source", metavar="URL",
                           help="download from this cache into the store")
    parser.add_argument("--key", metavar="FILE",
                        help="private key signing what --to uploads (reprobuild sign "
                             "--generate-key FILE makes one)")
    parser.add_argument("--trusted-keys", nargs="+", metavar="FILE",
                        help="public keys (or directories of *.pub) trusted by --from "
                             "(default: $REPROBUILD_TRUSTED_KEYS, then config.toml)")
    parser.add_argument("--no-inputs", action="store_true",
                        help="copy only the named outputs, not their build-time closure")
    parser.add_argument("-j", "--jobs", type=int, default=4, metavar="N",
                        help="transfers at once (default 4)")
    parser.add_argument("--priority", type=int, metavar="N",
                        help="with --to: the cache's priority (lower is asked first)")
    parser.add_argument("what", nargs="+", metavar="RECIPE|ID",
                        help="a recipe and its targets (default: its images, else steps), "
                             "or derivation ids / result links")


def derivation_ids(store: Store, what: list[str], *, closure: bool) -> list[str]:
    """The ids named on the command line (a recipe's targets, ids or result links)."""
    first = what[0]
    if os.path.isfile(first) and not os.path.islink(first):
        the_plan = plan(load_recipe(first), what[1:] or None)
        if closure:
            return sorted({node.id for node in the_plan.nodes.values()})
        return sorted({the_plan.nodes[t].id for t in the_plan.targets})
    ids = []
    for item in what:
        if os.path.islink(item):
            item = os.path.basename(os.readlink(item))
        if not is_hex64(item):
            raise ReprobuildError(f"{item!r} is neither a recipe file, a derivation id nor "
                                  "a result link", hint="give RECIPE [TARGET…] or ID…")
        ids.append(item)
    return sorted(set(ids))


class _Meter:
    """Counts transferred bytes from several threads."""

    def __init__(self) -> None:
        self.bytes = 0
        self.lock = threading.Lock()
        self.start = time.monotonic()

    def add(self, count: int) -> None:
        with self.lock:
            self.bytes += count

    def summary(self) -> str:
        seconds = max(time.monotonic() - self.start, 1e-6)
        mib = self.bytes / (1 << 20)
        return f"{mib:.1f} MiB in {seconds:.1f} s ({mib / seconds:.1f} MiB/s)"


def copy_to(store: Store, cache: Cache, args: argparse.Namespace) -> int:
    if not args.key:
        raise ReprobuildError("copy --to needs --key FILE to sign what it uploads",
                              hint="make one with: reprobuild sign --generate-key FILE")
    key = signing.load_private_key(args.key)
    wanted = derivation_ids(store, args.what, closure=False)
    missing = [i for i in wanted if store.lookup(i) is None]
    if missing:
        raise StoreError(f"not in the store: {', '.join(missing)}",
                         hint="build them first (reprobuild build RECIPE)")
    ids = wanted if args.no_inputs else sorted(
        i for i in store.closure(wanted) if store.lookup(i) is not None)
    meter = _Meter()

    def event(derivation_id: str, state: str, sent: int) -> None:
        meter.add(sent)
        print(f"{state} {derivation_id}", file=sys.stderr)

    report = upload(store, cache, ids, key, jobs=args.jobs, priority=args.priority,
                    on_event=event)
    for failure in report.failures:
        print(f"reprobuild: error: {failure}", file=sys.stderr)
    print(f"copied {len(report.uploaded)} to {cache.url}, {len(report.skipped)} already "
          f"there; {meter.summary()}", file=sys.stderr)
    if report.failures:
        raise CacheError(f"{len(report.failures)} of {len(ids)} uploads to {cache.url} failed")
    return 0


def copy_from(store: Store, cache: Cache, args: argparse.Namespace) -> int:
    settings = resolve(None, args.trusted_keys)
    if not settings.trusted_keys:
        raise ReprobuildError("copy --from needs trusted keys",
                              hint="give --trusted-keys FILE (the cache's public key)")
    keys = load_keys(settings.trusted_keys)
    wanted = derivation_ids(store, args.what, closure=not args.no_inputs)
    substituters, failed = open_substituters([cache])
    if failed:
        raise failed[0]
    meter = _Meter()
    report = download(store, substituters, wanted, keys, inputs=not args.no_inputs,
                      jobs=args.jobs, on_bytes=meter.add)
    for warning in report.warnings:
        print(f"reprobuild: warning: {warning.message}", file=sys.stderr)
    for derivation_id in sorted(report.fetched):
        print(f"fetched {derivation_id}", file=sys.stderr)
    print(f"copied {len(report.fetched)} from {cache.url}, {len(report.present)} already "
          f"in the store; {meter.summary()}", file=sys.stderr)
    if report.missing:
        raise CacheError(f"{cache.url} could not provide: {', '.join(report.missing)}",
                         hint="see the warnings above; build them with reprobuild build")
    return 0


def run(args: argparse.Namespace) -> int:
    store = Store(args.store)
    cache = open_cache(args.to or args.source)
    try:
        return copy_to(store, cache, args) if args.to else copy_from(store, cache, args)
    finally:
        cache.close()
