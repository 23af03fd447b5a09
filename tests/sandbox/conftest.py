"""Helpers for the sandbox tests: run sandboxes through tests/sandbox/driver.py.

The driver runs as uid 65534 (through the session's ``unprivileged`` fixture) or, for
the host-uid comparison, as the test process's own user.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Unprivileged, need

BUSYBOX = "/bin/busybox"
DRIVER = Path(__file__).with_name("driver.py")

Runs = Sequence[dict[str, Any]]
Driver = Callable[..., dict[str, dict[str, Any]]]


def busybox_run(name: str, script: str, *, mounts: Sequence[Sequence[object]] = (),
                **extra: Any) -> dict[str, Any]:
    """A run of ``busybox sh -c script`` with busybox at /bin/busybox and PATH=/bin."""
    env = [["PATH", "/bin"], *extra.pop("env", [])]
    return {"name": name, "argv": [BUSYBOX, "sh", "-c", script],
            "mounts": [[BUSYBOX, BUSYBOX, False], *mounts], "env": env, **extra}


@pytest.fixture(scope="session")
def sandbox_driver(unprivileged: Unprivileged) -> Driver:
    need(os.path.exists(BUSYBOX), "needs /bin/busybox (busybox-static)")
    driver = unprivileged.root / "driver.py"
    shutil.copyfile(DRIVER, driver)
    os.chmod(driver, 0o644)

    def run(runs: Runs, *, as_caller: bool = False, env: dict[str, str] | None = None,
            cwd: str | Path | None = None, umask: int | None = None
            ) -> dict[str, dict[str, Any]]:
        """Run ``runs`` in one driver; as uid 65534, or as this process (``as_caller``)."""
        job = json.dumps({"runs": list(runs)})
        argv = ["python", str(driver)]
        if umask is not None:
            argv = ["/bin/sh", "-c", f"umask {umask:03o} && exec \"$0\" \"$@\"",
                    unprivileged.python, str(driver)]
        if as_caller:
            full_env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
                        "PYTHONPATH": unprivileged.pythonpath,
                        "PYTHONDONTWRITEBYTECODE": "1", **(env or {})}
            argv = [unprivileged.python if a == "python" else a for a in argv]
            done = subprocess.run(argv, input=job, capture_output=True, text=True,
                                  env=full_env, cwd=cwd or unprivileged.root, timeout=120)
        else:
            done = subprocess.run(unprivileged.command(
                [unprivileged.python if a == "python" else a for a in argv]),
                input=job, capture_output=True, text=True, timeout=120,
                cwd=cwd or unprivileged.root,
                env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
                     "PYTHONPATH": unprivileged.pythonpath,
                     "PYTHONDONTWRITEBYTECODE": "1", **(env or {})})
        assert done.returncode == 0, done.stderr
        results: dict[str, dict[str, Any]] = json.loads(done.stdout)
        return results

    return run
