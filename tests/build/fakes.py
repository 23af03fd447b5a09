"""A fake sandbox Runner for engine tests: runs the argv with subprocess, no namespaces.

Mount targets are emulated by rewriting every argv word and environment value that
starts with a mount's target to the mount's host source (longest target first), and the
working directory is the source of the ``/build`` mount. Good enough for shell builders
that use ``$out``, ``$NAME`` and ``/inputs/...``; it proves nothing about isolation.
A built-in image step imports reprobuild from this process's own ``sys.path`` (the
runtime's mounts at ``/.reprobuild/site`` are not emulated).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

from sandbox.spec import SandboxResult, SandboxSpec


class FakeRunner:
    def __init__(self) -> None:
        self.runs: list[SandboxSpec] = []
        self.lock = threading.Lock()
        self.closed = False
        self.procs: list[subprocess.Popen[bytes]] = []

    def _rewrite(self, spec: SandboxSpec, word: str) -> str:
        if word.startswith("{"):  # a built-in step's JSON job: rewrite quoted paths
            for mount in sorted(spec.mounts, key=lambda m: -len(m.target)):
                word = word.replace(f'"{mount.target}', f'"{mount.source}')
            return word
        for mount in sorted(spec.mounts, key=lambda m: -len(m.target)):
            if word == mount.target or word.startswith(mount.target + "/"):
                return mount.source + word[len(mount.target):]
        return word.replace("/output/out", self._source(spec, "/output") + "/out")

    @staticmethod
    def _source(spec: SandboxSpec, target: str) -> str:
        return next(m.source for m in spec.mounts if m.target == target)

    def run(self, spec: SandboxSpec, *, log_fd: int) -> SandboxResult:
        with self.lock:
            self.runs.append(spec)
        argv = [self._rewrite(spec, w) for w in spec.argv]
        env = {k: self._rewrite(spec, v) for k, v in spec.env}
        if "PYTHONPATH" in env:
            env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        env.update({"SOURCE_DATE_EPOCH": str(spec.epoch), "HOME": "/homeless",
                    "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "TZ": "UTC"})
        start = time.monotonic()
        proc = subprocess.Popen(argv, env=env, cwd=self._source(spec, "/build"),
                                stdin=subprocess.DEVNULL, stdout=log_fd, stderr=log_fd)
        with self.lock:
            self.procs.append(proc)
        try:
            code = proc.wait(timeout=spec.timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return SandboxResult(None, 9, timed_out=True,
                                 duration=time.monotonic() - start)
        if self.closed:  # like the real runner: closing kills what runs
            return SandboxResult(None, 9, interrupted=True, duration=time.monotonic() - start)
        if code < 0:
            return SandboxResult(None, -code, duration=time.monotonic() - start)
        return SandboxResult(code, duration=time.monotonic() - start)

    def close(self) -> None:
        self.closed = True
        with self.lock:
            for proc in self.procs:
                if proc.poll() is None:
                    proc.kill()


class NullRunner:
    """Runs nothing: writes the builder's argv into ``$out`` (measures the engine alone)."""

    def run(self, spec: SandboxSpec, *, log_fd: int) -> SandboxResult:
        output = next(m.source for m in spec.mounts if m.target == "/output")
        with open(f"{output}/out", "w") as f:
            f.write(" ".join(spec.argv))
        return SandboxResult(0)

    def close(self) -> None:
        pass
