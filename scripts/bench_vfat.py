"""Time our FAT writer against mkfs.fat + mcopy -s on the same tree, in the same run.

Runs our writer (a subprocess: walk the directory, plan, write; once with the volume id
derived from the content, which hashes every byte, once with it given) and
``mkfs.fat -C OUT KIB`` followed by ``mcopy -s -m -i OUT TREE/* ::/`` for an image of
the same size (the size ours chose with size "min"), alternating, best of N each.
Prints the times, the time ratios (ours / mkfs.fat + mcopy; target <= 1.5), the peak
memory of each side (mkfs.fat and mcopy: the larger of the two), and whether fsck.fat -n
finds our image clean. The source is a directory argument or the generated
benchmark tree (scripts/benchtree.py, ~200 MB in 10,000 files) without its symlinks,
which FAT cannot hold.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

from benchtree import make_tree
from benchutil import ChildRun, argument_parser, run_child, warm

EPOCH = 1_700_000_000
TARGET = 1.5

OURS = """
import sys
from reprobuild.images.vfat import image as vfat
from reprobuild.images.registry import ImageOptions
from reprobuild.trees.directory import tree_from_directory
tree = tree_from_directory(sys.argv[1], epoch={epoch})
with open(sys.argv[2], "wb") as output:
    extra = (("volume_id", sys.argv[3]),) if len(sys.argv) > 3 else ()
    vfat.write(tree, output, ImageOptions(epoch={epoch}, extra=extra))
"""


def fat_tree(tmp: str) -> Path:
    """The benchmark tree without symlinks."""
    tree = make_tree(Path(tmp) / "tree")
    for dirpath, _dirnames, filenames in os.walk(tree):
        for name in filenames:
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                os.unlink(path)
    return tree


def main() -> int:
    parser = argument_parser(__doc__)
    args = parser.parse_args()
    import tempfile

    with tempfile.TemporaryDirectory(prefix="bench-vfat-") as tmp:
        tree = args.tree or fat_tree(tmp)
        warm(tree)
        ours_out = os.path.join(tmp, "ours.img")
        ref_out = os.path.join(tmp, "mkfs.img")
        ours_argv = [sys.executable, "-c", OURS.format(epoch=EPOCH), str(tree), ours_out]
        run_child(ours_argv, output=ours_out)
        kib = os.path.getsize(ours_out) // 1024
        entries = " ".join(shlex.quote(str(tree / name)) for name in sorted(os.listdir(tree)))
        ref_argv = [f"mkfs.fat -C {shlex.quote(ref_out)} {kib} >/dev/null && "
                    f"mcopy -s -m -i {shlex.quote(ref_out)} {entries} ::/"]
        env = {**os.environ, "MTOOLS_SKIP_CHECK": "1", "TZ": "UTC"}
        given_argv = [*ours_argv, "ABCD-1234"]
        ours_runs: list[ChildRun] = []
        given_times: list[float] = []
        ref_runs: list[ChildRun] = []
        for _ in range(args.repeat):
            ref_runs.append(run_child(ref_argv, output=ref_out, env=env, shell=True))
            given_times.append(run_child(given_argv, output=ours_out).wall)
            ours_runs.append(run_child(ours_argv, output=ours_out))
        ref_time = min(run.wall for run in ref_runs)
        our_time = min(run.wall for run in ours_runs)
        our_peak = max(run.peak_kib for run in ours_runs) / 1024
        ref_peak = max(run.peak_kib for run in ref_runs) / 1024
        check = subprocess.run(["fsck.fat", "-n", ours_out], capture_output=True, text=True)
        ratio = our_time / ref_time
        verdict = "ok" if ratio <= TARGET and check.returncode == 0 else "MISSED"
        print(f"vfat: ours {our_time:.3f} s, mkfs.fat + mcopy -s {ref_time:.3f} s, "
              f"time ratio {ratio:.2f} (target <= {TARGET}), "
              f"{min(given_times) / ref_time:.2f} with the volume id given; "
              f"image {kib} KiB; peak memory {our_peak:.0f} MiB, theirs {ref_peak:.0f} MiB; "
              f"fsck.fat "
              f"{'clean' if check.returncode == 0 else 'FAILED: ' + check.stdout.strip()}"
              f" [{verdict}]", flush=True)
        return 0 if verdict == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
