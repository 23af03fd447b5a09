"""Time our ext4 writer against ``mke2fs -d`` on the same trees, in the same run.

For each shape of scripts/benchshapes.py (``--shape``, all three by default) our writer
runs as a subprocess twice, once from the shape's tar and once from its directory (load
the tree as an image step does, plan, write; the UUID and hash seed given so both sides
share them). The reference reads the directory:
``mke2fs -t ext4 -b 4096 -I 256 -m 0 -N INODES -O ^has_journal,^resize_inode,^orphan_file,
^metadata_csum_seed -E root_owner=0:0,hash_seed=U,lazy_itable_init=0 -U U -d TREE``
with E2FSPROGS_FAKE_TIME and SOURCE_DATE_EPOCH set, at a size 30 % above the tree's
blocks plus its inode tables, and 1.25 inodes per entry (its default of one inode per
16 KiB is too few for small files).
Alternating runs, best of N each. Prints the table (times, ratio ours / mke2fs with the
target <= 1.5, peak memory of both children with the target < 300 MB, bytes per entry
beyond our peak on a tree of the shape's largest file alone, target < 2 KB) and checks
our images with ``e2fsck -fn``. A directory argument replaces the shapes (directory row only).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from benchshapes import Shape, add_shape_option, chosen
from benchutil import (
    MEMORY_TARGET_MB,
    PER_ENTRY_TARGET,
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
from reprobuild.images.ext4 import image as ext4
from reprobuild.images.registry import ImageOptions
from reprobuild.trees.gcpause import freeze_after_pauses
from reprobuild.trees.load import load_tree
from reprobuild.trees.tree import Tree
with freeze_after_pauses():  # as `reprobuild image` does
    tree = load_tree(sys.argv[1], epoch={epoch}) if sys.argv[1] else Tree()
    with open(sys.argv[2], "wb") as output:
        ext4.write(tree, output, ImageOptions(epoch={epoch}, uuid="{uuid}",
                   extra=(("hash_seed", "{uuid}"),)))
"""


def tree_bytes(tree: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(tree):
        for name in files:
            total += -(-os.lstat(os.path.join(dirpath, name)).st_size // 4096) * 4096
    return total


def e2fsck(image: str) -> str:
    check = subprocess.run(["e2fsck", "-fn", image], capture_output=True, text=True)
    return "clean" if check.returncode == 0 else "FAILED: " + check.stdout[-500:]


def bench_shape(shape: Shape, tmp: str, repeat: int,
                sources: tuple[str, ...]) -> tuple[list[Row], bool]:
    ours_out = os.path.join(tmp, "ours.ext4")
    ours_py = OURS.format(epoch=EPOCH, uuid=UUID)

    def ours(path: str) -> list[str]:
        return [sys.executable, "-c", ours_py, path, ours_out]

    # The memory target is per entry beyond the largest file's buffers: the baseline is
    # our peak on a tree of that file alone.
    baseline_kib = largest_file_baseline(str(shape.directory), tmp, ours, ours_out)
    ref_out = os.path.join(tmp, "mke2fs.ext4")
    entries = shape.entries
    inodes = entries * 5 // 4 + 1024
    size_kib = (int(tree_bytes(shape.directory) * 1.3) + inodes * 256) // 1024 + 16384
    ref_argv = ["mke2fs", "-q", "-F", "-t", "ext4", "-b", "4096", "-I", "256", "-m", "0",
                "-N", str(inodes),
                "-O", "^has_journal,^resize_inode,^orphan_file,^metadata_csum_seed",
                "-E", f"root_owner=0:0,hash_seed={UUID},lazy_itable_init=0",
                "-U", UUID, "-d", str(shape.directory), ref_out, f"{size_kib}k"]
    ref_env = dict(os.environ, E2FSPROGS_FAKE_TIME=str(EPOCH), SOURCE_DATE_EPOCH=str(EPOCH))
    verdicts: list[str] = []

    def check(image: str) -> str:
        verdicts.append(e2fsck(image))
        return f"e2fsck -fn {verdicts[-1]}"

    warm(shape.directory)
    paths = {"tar": str(shape.tar), "dir": str(shape.directory)}
    rows = compare_on_shape(shape.name, entries, {source: paths[source] for source in sources},
                            ours=ours, reference=ref_argv, ref_env=ref_env,
                            ref_output=ref_out, output=ours_out, repeat=repeat,
                            baseline_kib=baseline_kib, check=check)
    return rows, all(verdict == "clean" for verdict in verdicts)


def main() -> int:
    parser = argument_parser(__doc__, repeat=2)
    add_shape_option(parser)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-ext4-", dir="/var/tmp") as tmp:
        if args.tree is not None:
            shapes = [Shape(args.tree.name, args.tree, args.tree)]
            sources: tuple[str, ...] = ("dir",)
        else:
            shapes, sources = chosen(args), ("tar", "dir")
        rows: list[Row] = []
        ok = True
        for shape in shapes:
            shape_rows, clean = bench_shape(shape, tmp, args.repeat, sources)
            rows += shape_rows
            ok = ok and clean
    print_table("ext4: ours / mke2fs -d", "mke2fs", rows,
                baseline="a tree of the shape's largest file alone:")  # its buffers
    ok = ok and all(row.ratio <= TARGET for row in rows) and memory_ok(rows)
    print(f"targets: ratio <= {TARGET}, peak < {MEMORY_TARGET_MB} MB, < {PER_ENTRY_TARGET} B "
          f"per entry [{'ok' if ok else 'MISSED'}]")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
