#!/usr/bin/env python3
"""Engine benchmark: 200 trivial sandboxed steps built cold, then again as a no-op.

Runs `reprobuild build` as a user would (a fresh process each time) on a generated recipe
whose 200 independent steps each write one small file with the host's static busybox.
Targets on a 2-core machine: cold < 2 s, no-op < 0.3 s. ``--fake`` runs the steps with
the engine tests' fake runner (no namespaces) and ``--runner bwrap`` with bubblewrap, to
separate the engine's costs from the sandbox's. The reference, measured in the same run,
is the same steps as bare ``bwrap --unshare-all`` processes with no engine at all.

On ext4 without a journal (this machine's /tmp), every new inode skips each inode of its
block group freed in the last 30 s: a run started within 30 s of the previous one (whose
store it deleted) is slower, and so is anything that creates files on the store's file
system. Per step, the engine creates 3 files and the sandbox's one writable overlay
probes with 6 more (made and removed by the kernel at mount time).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def make_recipe(directory: Path, steps: int) -> Path:
    lines = ["epoch = 1700000000", "[sources.bb]", 'host = "/bin/busybox"', ""]
    for i in range(steps):
        lines += [f"[steps.s{i:03d}]", 'inputs = ["bb"]',
                  f'builder = ["bb", "sh", "-c", "echo {i} > $out"]', ""]
    lines += ["[steps.all]", "inputs = [" + ", ".join(f'"s{i:03d}"' for i in range(steps))
              + ', "bb"]', 'builder = ["bb", "sh", "-c", "echo done > $out"]', ""]
    path = directory / "bench.toml"
    path.write_text("\n".join(lines))
    return path


def timed_build(recipe: Path, store: Path, jobs: int, runner: str) -> float:
    module = "reprobuild" if runner == "sandbox" else "tests.build.fakecli"
    argv = [sys.executable, "-m", module, "build", "--store", str(store), "-j", str(jobs),
            "--no-out-link", str(recipe), "all"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "REPROBUILD_TEST_RUNNER": runner}
    start = time.perf_counter()
    result = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"bench_engine: build failed:\n{result.stderr[-3000:]}")
    return elapsed


def bwrap_reference(directory: Path, steps: int, jobs: int) -> float | None:
    """The same steps as bare ``bwrap --unshare-all`` runs, ``jobs`` at a time, no engine."""
    if shutil.which("bwrap") is None:
        return None
    out = directory / "reference"
    out.mkdir()

    def one(i: int) -> int:
        argv = ["bwrap", "--unshare-all", "--die-with-parent", "--clearenv",
                "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp",
                "--ro-bind", "/bin/busybox", "/bin/busybox", "--bind", str(out), "/output",
                "--setenv", "out", f"/output/{i}", "--", "/bin/busybox", "sh", "-c",
                f"echo {i} > $out"]
        return subprocess.run(argv, capture_output=True, check=False).returncode

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        codes = list(pool.map(one, range(steps)))
    elapsed = time.perf_counter() - start
    return elapsed if not any(codes) else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--runner", choices=("sandbox", "fake", "bwrap", "null"),
                        default="sandbox",
                        help="sandbox (default), the tests' fake runner, bubblewrap, or "
                             "null (runs nothing: the engine's own cost)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="reprobuild-bench-") as tmp:
        root = Path(tmp)
        os.chmod(root, 0o755)
        recipe = make_recipe(root, args.steps)
        cold = timed_build(recipe, root / "store", args.jobs, args.runner)
        noop = timed_build(recipe, root / "store", args.jobs, args.runner)
        reference = bwrap_reference(root, args.steps, args.jobs)
    print(f"engine ({args.runner}, -j {args.jobs}): {args.steps} trivial steps cold "
          f"{cold:.2f} s (target < 2 s, {cold / 2:.2f}x of target); "
          f"no-op {noop:.3f} s (target < 0.3 s, {noop / 0.3:.2f}x of target)")
    if reference is not None:
        print(f"reference: the same {args.steps} steps as bare bwrap runs, -j {args.jobs}, "
              f"no engine: {reference:.2f} s; engine cold / bare bwrap = "
              f"{cold / reference:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
