"""Time our EROFS writer against mkfs.erofs on the same tree, in the same run.

Runs our writer (a subprocess: walk the directory, plan, write; once with the same given
UUID as mkfs.erofs, once deriving it from the content, which hashes every byte) and
``mkfs.erofs -T EPOCH -U UUID --all-root -x -1 --quiet OUT TREE`` (erofs-utils 1.5 always
uses 4 KiB blocks here; -T fixes every mtime and the build time, --all-root the owners,
-x -1 leaves xattrs out as our default walk does), alternating, best of N each. Prints
the times, the time ratio (ours / mkfs.erofs; target <= 1.5) and the size ratio, and
checks our image with fsck.erofs. The source is a directory argument or the generated
benchmark tree (scripts/benchtree.py, ~200 MB in 10,000 files).
"""

from __future__ import annotations

import os
import subprocess
import sys

from benchutil import argument_parser, run_child, workspace

EPOCH = 1_700_000_000
UUID = "6a7e0c52-61d4-4f0e-9c3b-2f0a8f5d1e42"
TARGET = 1.5

OURS = """
import sys
from reprobuild.images.erofs import image as erofs
from reprobuild.images.registry import ImageOptions
from reprobuild.trees.directory import tree_from_directory
tree = tree_from_directory(sys.argv[1], epoch={epoch})
with open(sys.argv[2], "wb") as output:
    erofs.write(tree, output, ImageOptions(epoch={epoch}, uuid=sys.argv[3] or None,
                                           compress=sys.argv[4] if len(sys.argv) > 4 else None))
"""


def timed(argv: list[str], output: str) -> float:
    return run_child(argv, output=output).wall


def main() -> int:
    parser = argument_parser(__doc__)
    parser.add_argument("--lz4", action="store_true",
                        help="also compare LZ4 images with mkfs.erofs -zlz4 (no target)")
    args = parser.parse_args()
    with workspace("erofs", args.tree) as (tmp, tree):
        ours_out = os.path.join(tmp, "ours.erofs")
        ref_out = os.path.join(tmp, "mkfs.erofs")
        ours_argv = [sys.executable, "-c", OURS.format(epoch=EPOCH), str(tree), ours_out, UUID]
        derived_argv = [*ours_argv[:-1], ""]
        ref_argv = ["mkfs.erofs", "-T", str(EPOCH), "-U", UUID, "--all-root", "-x", "-1",
                    "--quiet", ref_out, str(tree)]
        ours_times: list[float] = []
        ref_times: list[float] = []
        derived_times: list[float] = []
        for _ in range(args.repeat):
            ref_times.append(timed(ref_argv, ref_out))
            derived_times.append(timed(derived_argv, ours_out))
            ours_times.append(timed(ours_argv, ours_out))
        ref_time, our_time = min(ref_times), min(ours_times)
        derived_ratio = min(derived_times) / ref_time
        ref_size, our_size = os.path.getsize(ref_out), os.path.getsize(ours_out)
        check = subprocess.run(["fsck.erofs", ours_out], capture_output=True, text=True)
        ratio = our_time / ref_time
        verdict = ("ok" if max(ratio, derived_ratio) <= TARGET and check.returncode == 0
                   else "MISSED")
        print(f"erofs: ours {our_time:.3f} s, mkfs.erofs {ref_time:.3f} s, "
              f"time ratio {ratio:.2f} (target <= {TARGET}), "
              f"{derived_ratio:.2f} with the UUID derived from the content; "
              f"size ours {our_size} B, mkfs.erofs {ref_size} B, "
              f"size ratio {our_size / ref_size:.4f}; fsck.erofs "
              f"{'clean' if check.returncode == 0 else 'FAILED: ' + check.stderr.strip()}"
              f" [{verdict}]", flush=True)
        if args.lz4:
            lz4_ours = [*ours_argv, "lz4"]
            lz4_ref = [*ref_argv[:1], "-zlz4", *ref_argv[1:]]
            ref_lz4 = min(timed(lz4_ref, ref_out) for _ in range(args.repeat))
            our_lz4 = min(timed(lz4_ours, ours_out) for _ in range(args.repeat))
            check = subprocess.run(["fsck.erofs", ours_out], capture_output=True, text=True)
            print(f"erofs lz4 (no target): ours {our_lz4:.3f} s, mkfs.erofs -zlz4 "
                  f"{ref_lz4:.3f} s, time ratio {our_lz4 / ref_lz4:.2f}; size ours "
                  f"{os.path.getsize(ours_out)} B, mkfs.erofs {os.path.getsize(ref_out)} B, "
                  f"size ratio {os.path.getsize(ours_out) / os.path.getsize(ref_out):.4f}; "
                  f"fsck.erofs {'clean' if check.returncode == 0 else 'FAILED'}", flush=True)
        return 0 if verdict == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
