"""Time our ext4 writer against ``mke2fs -d`` on the same tree, in the same run.

Our side is a subprocess (walk the directory, plan, write; the UUID and hash seed given
so both sides share them). The reference is
``mke2fs -t ext4 -b 4096 -I 256 -m 0 -O ^has_journal,^resize_inode,^orphan_file,
^metadata_csum_seed -E root_owner=0:0,hash_seed=U,lazy_itable_init=0 -U U -d TREE``
with E2FSPROGS_FAKE_TIME and SOURCE_DATE_EPOCH set, at a size 30 % above the tree's.
Alternating runs, best of N each. Prints both times, the ratio (ours / mke2fs; target
<= 1.5), our peak memory (ru_maxrss of our child; target < 300 MB) and checks our image
with ``e2fsck -fn``. The source is a directory argument or the generated benchmark tree
(scripts/benchtree.py, ~200 MB in 10,000 files).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from benchutil import argument_parser, run_child, workspace

EPOCH = 1_700_000_000
UUID = "6a7e0c52-61d4-4f0e-9c3b-2f0a8f5d1e42"
TARGET = 1.5
MEMORY_TARGET_MB = 300

OURS = """
import sys
from reprobuild.images.ext4 import image as ext4
from reprobuild.images.registry import ImageOptions
from reprobuild.trees.directory import tree_from_directory
tree = tree_from_directory(sys.argv[1], epoch={epoch})
with open(sys.argv[2], "wb") as output:
    ext4.write(tree, output, ImageOptions(epoch={epoch}, uuid="{uuid}",
               extra=(("hash_seed", "{uuid}"),)))
"""


def tree_bytes(tree: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(tree):
        for name in files:
            total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def main() -> int:
    parser = argument_parser(__doc__)
    args = parser.parse_args()
    with workspace("ext4", args.tree) as (tmp, tree):
        ours_out = os.path.join(tmp, "ours.ext4")
        ref_out = os.path.join(tmp, "mke2fs.ext4")
        size_kib = int(tree_bytes(tree) * 1.3) // 1024 + 16384
        ours_argv = [sys.executable, "-c", OURS.format(epoch=EPOCH, uuid=UUID), str(tree),
                     ours_out]
        ref_argv = ["mke2fs", "-q", "-F", "-t", "ext4", "-b", "4096", "-I", "256", "-m", "0",
                    "-O", "^has_journal,^resize_inode,^orphan_file,^metadata_csum_seed",
                    "-E", f"root_owner=0:0,hash_seed={UUID},lazy_itable_init=0",
                    "-U", UUID, "-d", str(tree), ref_out, f"{size_kib}k"]
        ref_env = dict(os.environ, E2FSPROGS_FAKE_TIME=str(EPOCH),
                       SOURCE_DATE_EPOCH=str(EPOCH))
        ours_times: list[float] = []
        ref_times: list[float] = []
        ours_cpu: list[float] = []
        ref_cpu: list[float] = []
        peak_kib = 0
        for _ in range(args.repeat):
            ref = run_child(ref_argv, output=ref_out, env=ref_env)
            ref_times.append(ref.wall)
            ref_cpu.append(ref.cpu)
            ours = run_child(ours_argv, output=ours_out)
            ours_times.append(ours.wall)
            ours_cpu.append(ours.cpu)
            peak_kib = max(peak_kib, ours.peak_kib)
        ref_time, our_time = min(ref_times), min(ours_times)
        check = subprocess.run(["e2fsck", "-fn", ours_out], capture_output=True, text=True)
        ratio = our_time / ref_time
        peak_mb = peak_kib / 1024
        ok = ratio <= TARGET and peak_mb < MEMORY_TARGET_MB and check.returncode == 0
        print(f"ext4: ours {our_time:.3f} s, mke2fs -d {ref_time:.3f} s, "
              f"time ratio {ratio:.2f} (target <= {TARGET}); CPU ours {min(ours_cpu):.3f} s, "
              f"mke2fs {min(ref_cpu):.3f} s, ratio {min(ours_cpu) / min(ref_cpu):.2f}; "
              f"peak memory {peak_mb:.0f} MB "
              f"(target < {MEMORY_TARGET_MB}); size ours {os.path.getsize(ours_out)} B, "
              f"mke2fs {os.path.getsize(ref_out)} B; e2fsck -fn "
              f"{'clean' if check.returncode == 0 else 'FAILED: ' + check.stdout[-500:]}"
              f" [{'ok' if ok else 'MISSED'}]", flush=True)
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
