"""`reprobuild fsverity digest FILE…`: fs-verity digests, printed as ``fsverity digest``."""

from __future__ import annotations

import argparse

from reprobuild.integrity import fsverity

HELP = "print the fs-verity digest of files (as `fsverity digest` does)"


def _salt(text: str) -> bytes:
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"salt must be hex digits, not {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION")
    sub.required = True
    digest = sub.add_parser("digest", help="print ALG:HEX FILE for each file")
    digest.add_argument("files", metavar="FILE", nargs="+")
    digest.add_argument("--hash-alg", default="sha256",
                        choices=sorted(fsverity.FSVERITY_ALGORITHMS))
    digest.add_argument("--block-size", type=int, default=4096)
    digest.add_argument("--salt", type=_salt, default=b"", help="salt in hex")


def run(args: argparse.Namespace) -> int:
    for path in args.files:
        value = fsverity.digest_file(path, algorithm=args.hash_alg,
                                     block_size=args.block_size, salt=args.salt)
        print(f"{fsverity.format_digest(value, args.hash_alg)} {path}")
    return 0
