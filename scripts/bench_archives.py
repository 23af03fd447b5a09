"""Time our tar and cpio writers against GNU tar and GNU cpio on the same trees, same run.

For each shape of scripts/benchshapes.py (``--shape``, all three by default) our writer
runs as a subprocess from the shape's tar and from its directory (load the tree as an
image step does: owners as given, mtimes clamped to the epoch; plan, write) against GNU
tar with its reproducibility flags (``--sort=name --format=pax --numeric-owner
--owner=0 --group=0 --mtime=@EPOCH --pax-option=delete=atime,delete=ctime``) and
``find | LC_ALL=C sort | cpio -o -H newc --reproducible`` on the directory. Best of N
each, alternating; prints the table (times, ratio ours / reference, target <= 1.5; peak
memory). A directory argument replaces the shapes (directory row only).
"""

from __future__ import annotations

import os
import sys
import tempfile

from benchshapes import add_shape_option, chosen
from benchutil import (
    Row,
    argument_parser,
    compare_on_shape,
    largest_file_baseline,
    memory_ok,
    print_table,
    warm,
)

EPOCH = 1_700_000_000
TARGET = 1.5

OURS = """
import sys
from reprobuild.images.registry import ImageOptions, get_format
from reprobuild.trees.gcpause import freeze_after_pauses
from reprobuild.trees.load import load_tree
from reprobuild.trees.tree import Tree
with freeze_after_pauses():  # as `reprobuild image` does
    tree = load_tree(sys.argv[2], epoch={epoch}) if sys.argv[2] else Tree()
    with open(sys.argv[3], "wb") as output:
        get_format(sys.argv[1]).load().write(tree, output, ImageOptions(epoch={epoch}))
"""


def main() -> int:
    parser = argument_parser(__doc__, repeat=2)
    add_shape_option(parser)
    args = parser.parse_args()
    ours_py = OURS.format(epoch=EPOCH)
    ok = True
    with tempfile.TemporaryDirectory(prefix="bench-archives-") as tmp:
        out, ref_out = os.path.join(tmp, "ours"), os.path.join(tmp, "reference")
        if args.tree is not None:
            shapes = [(args.tree.name, 0, {"dir": str(args.tree)}, str(args.tree))]
        else:
            shapes = [(s.name, s.entries, {"tar": str(s.tar), "dir": str(s.directory)},
                       str(s.directory)) for s in chosen(args)]
        for fmt in ("tar", "cpio"):
            def ours(path: str, fmt: str = fmt) -> list[str]:
                return [sys.executable, "-c", ours_py, fmt, path, out]

            rows: list[Row] = []
            for name, entries, sources, directory in shapes:
                warm(directory)
                baseline = largest_file_baseline(directory, tmp, ours, out)
                if fmt == "tar":
                    ref, shell = ["tar", "--sort=name", "--format=pax", "--numeric-owner",
                                  "--owner=0", "--group=0", f"--mtime=@{EPOCH}",
                                  "--pax-option=delete=atime,delete=ctime", "-cf", ref_out,
                                  "-C", directory, "."], False
                else:
                    ref, shell = ["find", ".", "|", "LC_ALL=C", "sort", "|", "cpio", "-o",
                                  "-H", "newc", "--reproducible", "--quiet", ">",
                                  ref_out], True
                rows += compare_on_shape(name, entries, sources, reference=ref,
                                         ref_output=ref_out, ref_shell=shell,
                                         ref_cwd=directory, output=out, ours=ours,
                                         repeat=args.repeat, baseline_kib=baseline)
            print_table(f"{fmt}: ours / GNU {fmt}", f"GNU {fmt}", rows,
                        baseline="a tree of the shape's largest file alone:")
            ok = ok and all(row.ratio <= TARGET for row in rows) and memory_ok(rows)
    print(f"targets: ratio <= {TARGET}, peak < 300 MB, < 2048 B per entry "
          f"[{'ok' if ok else 'MISSED'}]")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
