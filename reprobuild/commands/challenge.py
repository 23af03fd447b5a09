"""`reprobuild challenge`: compare build records from independent builders."""

from __future__ import annotations

import argparse
import json
import sys

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from reprobuild.cache.settings import load_keys
from reprobuild.commands.common import load
from reprobuild.commands.substituters import challenge_with_caches
from reprobuild.errors import ReprobuildError
from reprobuild.proof import challenge, signing

HELP = ("compare build records of the same derivations from independent builders, or a "
        "recipe's outputs in the local store and in caches; exit 1 when any output differs")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("records", nargs="+", metavar="RECORD",
                        help="build records (plain or signed envelopes); with "
                             "--substituters: RECIPE [TARGET…]")
    parser.add_argument("--substituters", nargs="+", metavar="URL",
                        help="compare the recipe's outputs in the local store and in these "
                             "caches (default: $REPROBUILD_SUBSTITUTERS, config.toml)")
    parser.add_argument("--key", action="append", default=[], metavar="PUBKEY",
                        help="a trusted public key; every record must be signed by a "
                             "trusted key (repeatable)")
    parser.add_argument("--trusted-keys", action="append", metavar="DIR|FILE",
                        help="a directory of trusted *.pub keys, or one key (repeatable)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args: argparse.Namespace) -> int:
    if args.substituters:
        return _with_caches(args)
    keys: dict[str, Ed25519PublicKey] | None = None
    if args.key or args.trusted_keys:
        keys = load_keys(args.trusted_keys or [])
        for path in args.key:
            key = signing.load_public_key(path)
            keys[signing.key_id(key)] = key
    loaded = [signing.load_record(path, keys) for path in args.records]
    if not loaded:
        raise ReprobuildError("no records given")
    return _report(args, challenge.challenge(loaded))


def _with_caches(args: argparse.Namespace) -> int:
    args.recipe, args.targets = args.records[0], args.records[1:]
    _recipe, store, plan = load(args, args.targets or None)
    results, warnings = challenge_with_caches(args, store, plan)
    for warning in warnings:
        print(f"reprobuild: warning: {warning.message}", file=sys.stderr)
    return _report(args, results)


def _report(args: argparse.Namespace, results: list[challenge.Challenge]) -> int:
    if args.json:
        doc = [{"derivation": r.derivation_id, "target": r.target, "agree": r.agree,
                "outputs": [{"digest": dict(d), "builders": list(b)} for d, b in r.groups]}
               for r in results]
        sys.stdout.write(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    else:
        sys.stdout.write(challenge.format_challenge(results))
    return 0 if all(r.agree for r in results) else 1
