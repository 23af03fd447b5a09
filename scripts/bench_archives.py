"""Time our tar and cpio writers against GNU tar and GNU cpio on the same tree, same run.

Ours: a subprocess that walks the directory (store semantics: owners root, mtimes the
epoch), plans and writes. Reference: GNU tar with its reproducibility flags
(``--sort=name --format=pax --numeric-owner --owner=0 --group=0 --mtime=@EPOCH
--pax-option=delete=atime,delete=ctime``) and ``find | LC_ALL=C sort | cpio -o -H newc
--reproducible``. Best of N each, alternating; prints times and ratios (ours / reference).
The source is a directory argument or the generated benchmark tree (scripts/benchtree.py).
"""

from __future__ import annotations

import os
import sys

from benchutil import argument_parser, run_child, workspace

EPOCH = 1_700_000_000

OURS = """
import sys
from reprobuild.images.registry import ImageOptions, get_format
from reprobuild.trees.directory import tree_from_directory
tree = tree_from_directory(sys.argv[2], epoch={epoch})
with open(sys.argv[3], "wb") as output:
    get_format(sys.argv[1]).load().write(tree, output, ImageOptions(epoch={epoch}))
"""


def main() -> int:
    parser = argument_parser(__doc__)
    args = parser.parse_args()
    with workspace("archives", args.tree) as (tmp, tree):
        out = os.path.join(tmp, "out")
        refs = {
            "tar": (["tar", "--sort=name", "--format=pax", "--numeric-owner", "--owner=0",
                     "--group=0", f"--mtime=@{EPOCH}",
                     "--pax-option=delete=atime,delete=ctime", "-cf", out, "-C", str(tree),
                     "."], False),
            "cpio": (["find", ".", "|", "LC_ALL=C", "sort", "|", "cpio", "-o", "-H", "newc",
                      "--reproducible", "--quiet", ">", out], True),
        }
        for fmt, (ref_argv, shell) in refs.items():
            ours_argv = [sys.executable, "-c", OURS.format(epoch=EPOCH), fmt, str(tree), out]
            ours, ref = [], []
            for _ in range(args.repeat):
                ref.append(run_child(ref_argv, output=out, shell=shell, cwd=str(tree),
                                     quiet=True).wall)
                ref_size = os.path.getsize(out)
                ours.append(run_child(ours_argv, output=out, quiet=True).wall)
                our_size = os.path.getsize(out)
            print(f"{fmt}: ours {min(ours):.3f} s, reference {min(ref):.3f} s, time ratio "
                  f"{min(ours) / min(ref):.2f}; size ours {our_size} B, reference "
                  f"{ref_size} B", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
