"""Time our squashfs writer against mksquashfs on the same trees, in the same run.

For each shape of scripts/benchshapes.py (``--shape``, all three by default) and each
compressor (``--compressors``, zstd and gzip at 128 KiB blocks and mksquashfs's default
levels), our writer runs as a subprocess from the shape's tar and from its directory
(load the tree as an image step does, plan, write) against
``mksquashfs DIR OUT -comp C -b 131072 -noappend -processors N -mkfs-time E -all-time E
-all-root``. Runs alternate, best of ``--repeat`` kept. Prints the table (times, ratio
ours / mksquashfs, target <= 1.0; peak memory), and per run the size ratio (target
<= 1.02) and ``unsquashfs -lls`` of our image. A directory argument replaces the shapes.

Both sides make the same layout (``--layout``): "packed", our default, puts the tails of
files larger than a block into fragment blocks, which mksquashfs does with
``-always-use-fragments``; "plain" is mksquashfs's default, where such a tail is a short
block of its own (ours with ``tail_fragments`` false). "both" runs the two in turn.
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
TARGET = 1.0

OURS = """
import sys
from reprobuild.images.squashfs import image as squashfs
from reprobuild.images.registry import ImageOptions
from reprobuild.trees.gcpause import freeze_after_pauses
from reprobuild.trees.load import load_tree
from reprobuild.trees.tree import Tree
options = ImageOptions(epoch={epoch}, compress=sys.argv[3], block_size=131072,
                       extra=(("threads", int(sys.argv[4])),
                              ("tail_fragments", sys.argv[5] == "packed")))
with freeze_after_pauses():  # as `reprobuild image` does
    tree = load_tree(sys.argv[1], epoch={epoch}) if sys.argv[1] else Tree()
    with open(sys.argv[2], "wb") as output:
        squashfs.write(tree, output, options)
"""


def main() -> int:
    parser = argument_parser(__doc__, repeat=1)
    add_shape_option(parser)
    parser.add_argument("--processors", type=int, default=2)
    parser.add_argument("--compressors", default="zstd,gzip")
    parser.add_argument("--layout", choices=("packed", "plain", "both"), default="packed",
                        help="tails of large files in fragments (packed, our default) or"
                             " in short blocks of their own (plain, mksquashfs's default)")
    args = parser.parse_args()
    ours_py = OURS.format(epoch=EPOCH)
    ok = True
    with tempfile.TemporaryDirectory(prefix="bench-squashfs-") as tmp:
        out, ref_out = os.path.join(tmp, "ours.sqfs"), os.path.join(tmp, "mksquashfs.sqfs")
        if args.tree is not None:
            shapes = [(args.tree.name, 0, {"dir": str(args.tree)}, str(args.tree))]
        else:
            shapes = [(s.name, s.entries, {"tar": str(s.tar), "dir": str(s.directory)},
                       str(s.directory)) for s in chosen(args)]
        layouts = ("packed", "plain") if args.layout == "both" else (args.layout,)
        for comp, layout in [(c, lay) for c in args.compressors.split(",") for lay in layouts]:
            def ours(path: str, comp: str = comp, layout: str = layout) -> list[str]:
                return [sys.executable, "-c", ours_py, path, out, comp, str(args.processors),
                        layout]

            def check(image: str) -> str:
                size = os.path.getsize(image) / os.path.getsize(ref_out)
                lls = subprocess.run(["unsquashfs", "-lls", image], capture_output=True)
                return (f"size ratio {size:.4f}, unsquashfs -lls "
                        f"{'clean' if lls.returncode == 0 else 'FAILED'}")

            rows: list[Row] = []
            for name, entries, sources, directory in shapes:
                warm(directory)
                baseline = largest_file_baseline(directory, tmp, ours, out)
                ref = ["mksquashfs", directory, ref_out, "-comp", comp, "-b", "131072",
                       "-noappend", "-processors", str(args.processors),
                       "-mkfs-time", str(EPOCH), "-all-time", str(EPOCH), "-all-root",
                       "-quiet", "-no-progress"]
                ref += ["-always-use-fragments"] if layout == "packed" else []
                rows += compare_on_shape(f"{name}", entries, sources, reference=ref,
                                         ref_output=ref_out, output=out, ours=ours,
                                         repeat=args.repeat, baseline_kib=baseline,
                                         check=check)
            print_table(f"squashfs {comp}, {layout} tails: ours / mksquashfs", "mksquashfs", rows,
                        baseline="a tree of the shape's largest file alone:")
            ok = ok and all(row.ratio <= TARGET for row in rows) and memory_ok(rows)
    print(f"targets: ratio <= {TARGET}, peak < 300 MB, < 2048 B per entry "
          f"[{'ok' if ok else 'MISSED'}]")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
