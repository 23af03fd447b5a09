"""reprobuild cache: operations on a binary cache (verify)."""

from __future__ import annotations

import argparse
import sys

from reprobuild.cache.backend import open_cache
from reprobuild.cache.settings import load_keys
from reprobuild.cache.verify import verify_cache

HELP = "cache verify URL: re-hash every object of a cache and check every entry"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("verify",), help="what to do")
    parser.add_argument("url", metavar="URL", help="the cache (file://, http(s)://, s3://)")
    parser.add_argument("--trusted-keys", nargs="+", metavar="FILE",
                        help="also require each entry to be signed by one of these keys")
    parser.add_argument("-j", "--jobs", type=int, default=4, metavar="N",
                        help="objects hashed at once (default 4)")


def run(args: argparse.Namespace) -> int:
    keys = load_keys(args.trusted_keys) if args.trusted_keys else None
    cache = open_cache(args.url)
    try:
        report = verify_cache(cache, keys, jobs=args.jobs)
    finally:
        cache.close()
    for problem in report.problems:
        print(f"reprobuild: {cache.where(problem.name)}: {problem.message}", file=sys.stderr)
    print(f"{report.objects} objects, {report.entries} entries checked; "
          f"{len(report.problems)} problems", file=sys.stderr)
    return 1 if report.problems else 0
