#!/usr/bin/env python3
"""Time `true` in our sandbox (from a running runner) against bubblewrap, in one run.

bwrap gets the equivalent sandbox: ``--unshare-all --die-with-parent``, busybox bound
read-only, a tmpfs /tmp, a new /proc and a minimal /dev. Both are timed from this Python
process, each run waited for, alternating so that both see the same machine load.
Prints both medians and the ratio ours/bwrap (target: <= 1.0). As root it re-runs itself
as uid 65534, since the sandbox is meant for unprivileged users.

    .venv/bin/python scripts/bench_sandbox.py [-n 200]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BUSYBOX = "/bin/busybox"
NOBODY = 65534


def reexec_as_nobody() -> int:
    import msgpack

    site = str(Path(msgpack.__file__).resolve().parent.parent)
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": f"{REPO}:{site}",
           "PYTHONDONTWRITEBYTECODE": "1", "BENCH_SANDBOX_CHILD": "1"}
    cmd = ["setpriv", "--reuid", str(NOBODY), "--regid", str(NOBODY), "--clear-groups",
           "/usr/bin/python3", str(Path(__file__).resolve()), *sys.argv[1:]]
    return subprocess.run(cmd, env=env, cwd="/").returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", "--runs", type=int, default=200)
    args = parser.parse_args()
    if os.geteuid() == 0 and not os.environ.get("BENCH_SANDBOX_CHILD"):
        return reexec_as_nobody()
    sys.path.insert(0, str(REPO))
    from sandbox.runner import start
    from sandbox.spec import Mount, SandboxSpec

    bwrap = shutil.which("bwrap")
    if bwrap is None:
        print("bwrap not found (apt-get install bubblewrap)", file=sys.stderr)
        return 2
    spec = SandboxSpec(argv=(BUSYBOX, "true"), mounts=(Mount(BUSYBOX, BUSYBOX),))
    bwrap_cmd = [bwrap, "--unshare-all", "--die-with-parent", "--ro-bind", BUSYBOX, BUSYBOX,
                 "--tmpfs", "/tmp", "--proc", "/proc", "--dev", "/dev", BUSYBOX, "true"]
    ours: list[float] = []
    theirs: list[float] = []
    null = os.open(os.devnull, os.O_WRONLY)
    with start() as runner:
        for _ in range(5):  # warm up both
            runner.run(spec, log_fd=null)
            subprocess.run(bwrap_cmd, stdout=null, stderr=null, check=True)
        for _ in range(args.runs):
            t0 = time.perf_counter()
            result = runner.run(spec, log_fd=null)
            t1 = time.perf_counter()
            subprocess.run(bwrap_cmd, stdout=null, stderr=null, check=True)
            t2 = time.perf_counter()
            if not result.ok:
                print(f"sandboxed true failed: {result}", file=sys.stderr)
                return 1
            ours.append(t1 - t0)
            theirs.append(t2 - t1)
    ours_ms = statistics.median(ours) * 1000
    bwrap_ms = statistics.median(theirs) * 1000
    print(f"runs: {args.runs} (uid {os.geteuid()})")
    print(f"reprobuild sandbox median: {ours_ms:.2f} ms")
    print(f"bwrap --unshare-all median: {bwrap_ms:.2f} ms")
    print(f"ratio ours/bwrap: {ours_ms / bwrap_ms:.2f} (target <= 1.0)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
