"""Time our squashfs writer against mksquashfs on the same tree, in the same run.

For zstd and gzip at 128 KiB blocks and mksquashfs's default levels, runs our writer (a
subprocess: walk the directory, plan, write) and
``mksquashfs TREE OUT -comp C -b 131072 -noappend -processors N -mkfs-time E -all-time E
-all-root``, and prints the times, the time ratio (ours / mksquashfs; target <= 1.0), the
CPU-time ratio (steadier than wall time on a shared machine) and the size ratio (target
<= 1.02). Runs alternate and the best of ``--repeat`` is kept. The source is a directory
argument or the generated benchmark tree (scripts/benchtree.py).
"""

from __future__ import annotations

import os
import subprocess
import sys

from benchutil import argument_parser, run_child, workspace

EPOCH = 1_700_000_000

OURS = """
import sys
from reprobuild.images.squashfs import image as squashfs
from reprobuild.images.registry import ImageOptions
from reprobuild.trees.directory import tree_from_directory
tree = tree_from_directory(sys.argv[1], epoch={epoch})
options = ImageOptions(epoch={epoch}, compress=sys.argv[3], block_size=131072,
                       extra=(("threads", int(sys.argv[4])),))
with open(sys.argv[2], "wb") as output:
    squashfs.write(tree, output, options)
"""


def timed(argv: list[str]) -> tuple[float, float]:
    """Wall-clock and CPU (user + system) seconds of one run of ``argv``."""
    run = run_child(argv)
    return run.wall, run.cpu


def main() -> int:
    parser = argument_parser(__doc__, repeat=1)
    parser.add_argument("--processors", type=int, default=2)
    parser.add_argument("--compressors", default="zstd,gzip")
    args = parser.parse_args()
    ok = True
    with workspace("squashfs", args.tree) as (tmp, tree):
        ours_py = OURS.format(epoch=EPOCH)
        env_python = sys.executable
        for comp in args.compressors.split(","):
            ours_out = os.path.join(tmp, f"ours-{comp}.sqfs")
            ref_out = os.path.join(tmp, f"mksquashfs-{comp}.sqfs")
            ref_argv = ["mksquashfs", str(tree), ref_out, "-comp", comp, "-b", "131072",
                        "-noappend", "-processors", str(args.processors),
                        "-mkfs-time", str(EPOCH), "-all-time", str(EPOCH), "-all-root",
                        "-quiet", "-no-progress"]
            ours_argv = [env_python, "-c", ours_py, str(tree), ours_out, comp,
                         str(args.processors)]
            # Interleaved, best of N: the machine is shared and noisy.
            ref_runs, our_runs = [], []
            for _ in range(args.repeat):
                ref_runs.append(timed(ref_argv))
                our_runs.append(timed(ours_argv))
            ref_time, ref_cpu = min(ref_runs)
            our_time, our_cpu = min(our_runs)
            ref_size = os.path.getsize(ref_out)
            our_size = os.path.getsize(ours_out)
            time_ratio = our_time / ref_time
            size_ratio = our_size / ref_size
            check = subprocess.run(["unsquashfs", "-lls", ours_out], capture_output=True)
            verdict = ("ok" if time_ratio <= 1.0 and size_ratio <= 1.02
                       and check.returncode == 0 else "MISSED")
            ok = ok and verdict == "ok"
            print(f"squashfs {comp}: ours {our_time:.2f} s (cpu {our_cpu:.2f} s) {our_size} B,"
                  f" mksquashfs {ref_time:.2f} s (cpu {ref_cpu:.2f} s) {ref_size} B,"
                  f" time ratio {time_ratio:.3f}, cpu ratio {our_cpu / ref_cpu:.3f},"
                  f" size ratio {size_ratio:.4f} [{verdict}]", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
