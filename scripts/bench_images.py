"""Run every image benchmark against its reference tool in one run and print the ratios.

Each part is its own script (bench_ext4, bench_squashfs, bench_erofs, bench_verity) so
it can be run alone; this one runs them in turn on one shared benchmark tree.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
PARTS = ("bench_ext4.py", "bench_squashfs.py", "bench_erofs.py", "bench_verity.py",
         "bench_archives.py")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("tree", nargs="?", type=Path,
                        help="source directory (default: the shapes of benchshapes.py)")
    parser.add_argument("--only", action="append", choices=[p[6:-3] for p in PARTS])
    args = parser.parse_args()
    failed = 0
    tree = args.tree
    for part in PARTS:
        name = part[6:-3]
        if args.only and name not in args.only:
            continue
        script = HERE / part
        if not script.exists():
            print(f"== {name}: {part} missing", flush=True)
            failed += 1
            continue
        print(f"== {name}", flush=True)
        argv = [sys.executable, str(script)]
        if name != "verity" and tree is not None:
            argv.append(str(tree))
        failed += subprocess.run(argv).returncode != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
