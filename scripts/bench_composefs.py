"""Time our composefs writer against mkcomposefs on the same tree, in the same run.

The tree is a directory argument or, by default, the Debian bookworm minbase root the
tests cache (``/var/tmp/reprobuild-test-cache/bookworm-minbase.tar``, unpacked here;
run as root so owners survive). mkcomposefs is Debian unstable's, from the chroot the
tests cache (``sid-composefs``), run through its own loader with its default threads.
Ours is a subprocess: walk the directory keeping owners, mtimes and xattrs as
mkcomposefs does, hash every file over 64 bytes (fs-verity; started during the walk, as
``reprobuild image`` does), plan and write. Both write the image only (no digest store).
Alternating, best of N each; prints the times, the ratio (ours / mkcomposefs; target
<= 1.2) and whether the images are identical; then the time of ``reprobuild image
--format composefs`` itself (a store output's metadata: other bytes, the same work)
against the same mkcomposefs time.
"""

from __future__ import annotations

import filecmp
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from benchutil import argument_parser, run_child, warm

TARGET = 1.2
CACHE = Path(os.environ.get("REPROBUILD_TEST_CACHE", "/var/tmp/reprobuild-test-cache"))
CHROOT = CACHE / "sid-composefs"

OURS = """
import sys
from reprobuild.images.composefs import image as composefs
from reprobuild.images.registry import ImageOptions
from reprobuild.trees.directory import tree_from_directory
from reprobuild.trees.gcpause import collector_paused, freeze_after_pauses
import gc
# As the image command runs the pipeline: what each pause made frozen at its end, the
# files hashed while the walk goes on, what is left to the exit.
with freeze_after_pauses(), composefs.while_loading() as early:
    with collector_paused():
        tree = tree_from_directory(sys.argv[1], preserve_owner=True, preserve_mtime=True,
                                   read_xattrs=True, detect_hardlinks=False,
                                   found=early.found)
    with open(sys.argv[2], "wb") as output:
        composefs.write(tree, output, ImageOptions(epoch=0), early=early)
gc.freeze()
"""


def mkcomposefs(*args: str) -> list[str]:
    libs = f"{CHROOT}/usr/lib/x86_64-linux-gnu:{CHROOT}/lib/x86_64-linux-gnu"
    return [str(CHROOT / "lib64/ld-linux-x86-64.so.2"), "--library-path", libs,
            str(CHROOT / "usr/bin/mkcomposefs"), *args]


def main() -> int:
    args = argument_parser(__doc__).parse_args()
    if not (CHROOT / "usr/bin/mkcomposefs").exists():
        print(f"no mkcomposefs in {CHROOT}: run pytest tests/images/test_composefs.py "
              "once (as root) to make it", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="bench-composefs-") as tmp:
        tree = args.tree
        if tree is None:
            tree = Path(tmp, "minbase")
            tree.mkdir()
            subprocess.run(["tar", "--xattrs", "--xattrs-include=*", "-xpf",
                            str(CACHE / "bookworm-minbase.tar"), "-C", str(tree)], check=True)
        warm(tree)
        ours_out, ref_out = os.path.join(tmp, "ours.cfs"), os.path.join(tmp, "ref.cfs")
        ours_argv = [sys.executable, "-c", OURS, str(tree), ours_out]
        ref_argv = mkcomposefs(str(tree), ref_out)
        cli_out = os.path.join(tmp, "cli.cfs")
        cli_argv = [sys.executable, "-m", "reprobuild", "image", "--format", "composefs",
                    str(tree), cli_out]
        ours_times: list[float] = []
        ref_times: list[float] = []
        cli_times: list[float] = []
        for _ in range(args.repeat):
            ref_times.append(run_child(ref_argv, output=ref_out).wall)
            ours_times.append(run_child(ours_argv, output=ours_out).wall)
            cli_times.append(run_child(cli_argv, output=cli_out).wall)
        ours_time, ref_time = min(ours_times), min(ref_times)
        same = filecmp.cmp(ours_out, ref_out, shallow=False)
        ratio = ours_time / ref_time
        verdict = "ok" if ratio <= TARGET and same else "MISSED"
        print(f"composefs: ours {ours_time:.3f} s, mkcomposefs {ref_time:.3f} s, "
              f"time ratio {ratio:.2f} (target <= {TARGET}); images "
              f"{'identical' if same else 'DIFFER'} ({os.path.getsize(ref_out)} B) "
              f"[{verdict}]", flush=True)
        # The command itself (owners root, mtimes the epoch: other bytes, the same work).
        cli_ratio = min(cli_times) / ref_time
        print(f"composefs: reprobuild image {min(cli_times):.3f} s, time ratio "
              f"{cli_ratio:.2f} (target <= {TARGET}) "
              f"[{'ok' if cli_ratio <= TARGET else 'MISSED'}]", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
