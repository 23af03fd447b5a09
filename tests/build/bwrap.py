"""A Runner made of bubblewrap, to check the engine's mount layout in a real empty root.

Only for tests and for comparing against the real sandbox: the engine itself always uses
:mod:`sandbox`. Mounts become --ro-bind/--bind, the environment is cleared and set.
"""

from __future__ import annotations

import subprocess
import time

from sandbox.spec import SandboxResult, SandboxSpec


class BwrapRunner:
    def command(self, spec: SandboxSpec) -> list[str]:
        argv = ["bwrap", "--unshare-all", "--die-with-parent", "--clearenv",
                "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp",
                "--hostname", "localhost"]
        for mount in spec.mounts:
            argv += ["--bind" if mount.writable else "--ro-bind", mount.source, mount.target]
        env = dict(spec.env)
        env.update({"HOME": "/homeless-shelter", "TMPDIR": "/tmp", "TZ": "UTC",
                    "LANG": "C.UTF-8", "SOURCE_DATE_EPOCH": str(spec.epoch),
                    "NIX_BUILD_CORES": str(spec.cores)})
        for key, value in sorted(env.items()):
            argv += ["--setenv", key, value]
        return [*argv, "--chdir", spec.cwd, "--", *spec.argv]

    def run(self, spec: SandboxSpec, *, log_fd: int) -> SandboxResult:
        start = time.monotonic()
        try:
            proc = subprocess.run(self.command(spec), stdin=subprocess.DEVNULL,
                                  stdout=log_fd, stderr=log_fd, timeout=spec.timeout,
                                  check=False)
        except subprocess.TimeoutExpired:
            return SandboxResult(None, 9, timed_out=True, duration=time.monotonic() - start)
        if proc.returncode < 0:
            return SandboxResult(None, -proc.returncode, duration=time.monotonic() - start)
        return SandboxResult(proc.returncode, duration=time.monotonic() - start)

    def close(self) -> None:
        pass
