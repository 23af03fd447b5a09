"""`reprobuild verity format|verify`: dm-verity hash trees compatible with veritysetup."""

from __future__ import annotations

import argparse
import json
import sys

from reprobuild.errors import ReprobuildError
from reprobuild.integrity import verity

HELP = "make or check a dm-verity hash tree (veritysetup format 1)"


def _salt(text: str) -> bytes:
    if text == "-":
        return b""
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"salt must be hex digits or '-', not {text!r}"
                                         ) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION")
    sub.required = True
    fmt = sub.add_parser("format", help="write the hash tree of DATA into HASH, print the "
                         "root hash")
    fmt.add_argument("data", metavar="DATA", help="the data image")
    fmt.add_argument("hash", metavar="HASH", help="the hash file (may be DATA itself with "
                     "--hash-offset)")
    fmt.add_argument("--salt", type=_salt, default=None,
                     help="salt in hex, '-' for none (default: derived from the data)")
    fmt.add_argument("--uuid", default=None, help="UUID (default: derived from the data)")
    fmt.add_argument("--hash-algorithm", "--hash", dest="algorithm", default="sha256",
                     choices=["sha1", "sha256", "sha512"])
    fmt.add_argument("--data-block-size", type=int, default=4096)
    fmt.add_argument("--hash-block-size", type=int, default=4096)
    fmt.add_argument("--hash-offset", type=int, default=0,
                     help="byte offset of the superblock in HASH (a multiple of 512)")
    fmt.add_argument("--data-blocks", type=int, default=None,
                     help="number of data blocks (default: the whole data file)")
    fmt.add_argument("--json", action="store_true",
                     help="print root hash, salt, UUID and sizes as JSON")
    ver = sub.add_parser("verify", help="check DATA and HASH against ROOTHASH; exit 1 "
                         "naming the first bad block")
    ver.add_argument("data", metavar="DATA")
    ver.add_argument("hash", metavar="HASH")
    ver.add_argument("root_hash", metavar="ROOTHASH", help="root hash in hex")
    ver.add_argument("--hash-offset", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    if args.action == "format":
        result = verity.format(
            args.data, args.hash, algorithm=args.algorithm,
            data_block_size=args.data_block_size, hash_block_size=args.hash_block_size,
            salt=args.salt, uuid=args.uuid, hash_offset=args.hash_offset,
            data_blocks=args.data_blocks)
        if args.json:
            sys.stdout.write(json.dumps(result.as_json(), indent=2, sort_keys=True) + "\n")
        else:
            print(result.root_hash_hex)
        return 0
    try:
        root = bytes.fromhex(args.root_hash)
    except ValueError:
        raise ReprobuildError(f"root hash {args.root_hash!r} is not hex",
                              hint="pass the root hash veritysetup or reprobuild printed"
                              ) from None
    verity.verify(args.data, args.hash, root, hash_offset=args.hash_offset)
    print(f"{args.data}: verified against {args.root_hash}")
    return 0
