"""Runs sandboxes for the tests, as whatever user starts it (the tests use uid 65534).

Reads a JSON job on stdin: ``{"runs": [{"name", "argv", "mounts": [[src, dst, rw]],
"env": [[k, v]], "timeout", "cwd", "epoch", "interrupt_after", "marker", "limits":
{field: value}}]}``, runs each from one runner and prints a JSON object name ->
{returncode, signal, timed_out, interrupted, limit, log_dropped, mechanism, duration, log,
survivors}. ``survivors`` lists the host processes whose command line holds ``marker``,
looked for right after the run returned (before the runner closes). With
``interrupt_after`` the whole process group gets SIGINT, as a terminal's Ctrl-C.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import threading

from sandbox.errors import SandboxError
from sandbox.runner import start
from sandbox.spec import Limits, Mount, SandboxSpec


def survivors(marker: str) -> list[str]:
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            found.append(f"{name}: {cmdline}")
    return sorted(found)


def main() -> int:
    job = json.load(sys.stdin)
    os.setpgid(0, 0)  # our own process group, so a "Ctrl-C" reaches only us
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    results: dict[str, object] = {}
    with start() as runner:
        for run in job["runs"]:
            spec = SandboxSpec(
                argv=tuple(run["argv"]),
                mounts=tuple(Mount(s, t, bool(w)) for s, t, w in run.get("mounts", [])),
                env=tuple((k, v) for k, v in run.get("env", [])),
                cwd=run.get("cwd", "/build"), epoch=run.get("epoch", 0),
                timeout=run.get("timeout"), limits=Limits(**run.get("limits", {})))
            timer = None
            if run.get("interrupt_after") is not None:
                timer = threading.Timer(run["interrupt_after"],
                                        lambda: os.killpg(os.getpgrp(), signal.SIGINT))
                timer.start()
            with tempfile.TemporaryFile() as log:
                try:
                    result = runner.run(spec, log_fd=log.fileno())
                except SandboxError as exc:
                    results[run["name"]] = {"error": exc.message, "hint": exc.hint}
                    continue
                finally:
                    if timer is not None:
                        timer.join()
                log.seek(0)
                text = log.read().decode(errors="replace")
            results[run["name"]] = {
                "returncode": result.returncode, "signal": result.signal,
                "timed_out": result.timed_out, "interrupted": result.interrupted,
                "limit": result.limit, "log_dropped": result.log_dropped,
                "mechanism": result.mechanism, "duration": result.duration,
                "log": text,
                "survivors": survivors(run["marker"]) if run.get("marker") else [],
            }
    json.dump(results, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
