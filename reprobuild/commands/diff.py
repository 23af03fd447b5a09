"""`reprobuild diff A B`: how two trees or images differ, path by path."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile

from reprobuild.proof import diffreport

HELP = ("compare two directories or images (tar, cpio, ext4, squashfs, EROFS, GPT) and "
        "list what differs; exit 0 identical, 1 different")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("a", metavar="A", help="a directory or image")
    parser.add_argument("b", metavar="B", help="another directory or image")
    parser.add_argument("--diffoscope", action="store_true",
                        help="also hand the pair to diffoscope")
    parser.add_argument("--keep", action="store_true",
                        help="keep extracted partitions (GPT) and say where")
    parser.add_argument("--no-owner", action="store_true",
                        help="do not compare ownership")
    parser.add_argument("--exact", action="store_true",
                        help="compare a directory with an image as the directory is (owners, "
                        "mtimes); by default it is read as `reprobuild image` reads a source")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace) -> int:
    if args.keep:
        workdir = tempfile.mkdtemp(prefix="reprobuild-diff-")
        report = diffreport.diff_paths(args.a, args.b, compare_owner=not args.no_owner,
                                       follow_symlinks=True, workdir=workdir,
                                       exact=args.exact)
    else:
        report = diffreport.diff_paths(args.a, args.b, compare_owner=not args.no_owner,
                                       follow_symlinks=True, exact=args.exact)
    if args.json:
        sys.stdout.write(json.dumps(report.to_json(), indent=2, sort_keys=True) + "\n")
    else:
        sys.stdout.write(report.render())
    if args.keep:
        print(f"kept extracted parts in {workdir}", file=sys.stderr)
    if args.diffoscope and not report.identical:
        _, text = diffreport.run_diffoscope(args.a, args.b)
        sys.stdout.write(text)
    return 0 if report.identical else 1
