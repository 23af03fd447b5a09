"""Time our EROFS writer against mkfs.erofs on the same trees, in the same run.

For each shape of scripts/benchshapes.py (``--shape``, all three by default) our writer
runs as a subprocess from the shape's tar and from its directory (load the tree as an
image step does, plan, write, the UUID given as mkfs.erofs gets it), against
``mkfs.erofs -T EPOCH -U UUID --all-root -x -1 --quiet OUT DIR`` (erofs-utils 1.5 always
uses 4 KiB blocks here; -T fixes every mtime and the build time, --all-root the owners,
-x -1 leaves xattrs out as a directory source does), alternating, best of N each.
Prints the table (times, ratio ours / mkfs.erofs, target <= 1.5; peak memory) and
checks our images with fsck.erofs. ``--compress lz4`` compares ``-zlz4`` images (no
target). A directory argument replaces the shapes (directory row only).
"""

from __future__ import annotations

import os
import subprocess
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
UUID = "6a7e0c52-61d4-4f0e-9c3b-2f0a8f5d1e42"
TARGET = 1.5

OURS = """
import sys
from reprobuild.images.erofs import image as erofs
from reprobuild.images.registry import ImageOptions
from reprobuild.trees.gcpause import freeze_after_pauses
from reprobuild.trees.load import load_tree
from reprobuild.trees.tree import Tree
with freeze_after_pauses():  # as `reprobuild image` does
    tree = load_tree(sys.argv[1], epoch={epoch}) if sys.argv[1] else Tree()
    with open(sys.argv[2], "wb") as output:
        erofs.write(tree, output, ImageOptions(epoch={epoch}, uuid="{uuid}",
                                               compress=sys.argv[3] or None))
"""


def fsck(image: str) -> str:
    check = subprocess.run(["fsck.erofs", image], capture_output=True, text=True)
    return "fsck.erofs clean" if check.returncode == 0 else "fsck.erofs FAILED: " + \
        check.stderr.strip()[-500:]


def main() -> int:
    parser = argument_parser(__doc__, repeat=2)
    add_shape_option(parser)
    parser.add_argument("--compress", default="", help="lz4: compressed images (no target)")
    args = parser.parse_args()
    ours_py = OURS.format(epoch=EPOCH, uuid=UUID)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="bench-erofs-") as tmp:
        out, ref_out = os.path.join(tmp, "ours.erofs"), os.path.join(tmp, "mkfs.erofs")
        if args.tree is not None:
            shapes = [(args.tree.name, 0, {"dir": str(args.tree)}, str(args.tree))]
        else:
            shapes = [(s.name, s.entries, {"tar": str(s.tar), "dir": str(s.directory)},
                       str(s.directory)) for s in chosen(args)]
        def ours(path: str) -> list[str]:
            return [sys.executable, "-c", ours_py, path, out, args.compress]

        for name, entries, sources, directory in shapes:
            warm(directory)
            baseline = largest_file_baseline(directory, tmp, ours, out)
            ref = ["mkfs.erofs", "-T", str(EPOCH), "-U", UUID, "--all-root", "-x", "-1",
                   "--quiet", *(["-z" + args.compress] if args.compress else []), ref_out,
                   directory]
            rows += compare_on_shape(
                name, entries, sources, reference=ref, ref_output=ref_out, output=out,
                ours=ours,
                repeat=args.repeat, baseline_kib=baseline, check=fsck)
    print_table(f"erofs{' ' + args.compress if args.compress else ''}: ours / mkfs.erofs",
                "mkfs.erofs", rows, baseline="a tree of the shape's largest file alone:")
    ok = args.compress != "" or all(row.ratio <= TARGET for row in rows)
    ok = ok and memory_ok(rows)
    print(f"targets: ratio <= {TARGET}, peak < 300 MB, < 2048 B per entry "
          f"[{'ok' if ok else 'MISSED'}]")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
