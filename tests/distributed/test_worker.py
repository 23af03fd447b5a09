"""`reprobuild worker` refuses to start where user namespaces cannot be made."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from reprobuild.proof import signing
from tests.conftest import NOBODY, REPO, can_unshare_user, need


@pytest.mark.userns
def test_worker_without_user_namespaces_refuses_to_start(tmp_path: Path) -> None:
    need(can_unshare_user(), "needs unprivileged user namespaces")
    key, _public = signing.generate_key(tmp_path / "worker.key")
    # Inside a user namespace whose user.max_user_namespaces is 0, as uid 65534 outside.
    script = ("echo 0 > /proc/sys/user/max_user_namespaces && exec \"$@\"")
    argv = ["unshare", "--user", "--map-root-user", "sh", "-c", script, "sh",
            sys.executable, "-m", "reprobuild", "worker", "--store", str(tmp_path / "store"),
            "--scheduler", "dask://127.0.0.1:9", "--cache", f"file://{tmp_path}/cache",
            "--key", str(key)]
    if os.geteuid() == 0:  # the sandbox fails before the key or the store is read
        argv = ["setpriv", "--reuid", str(NOBODY), "--regid", str(NOBODY), "--clear-groups",
                *argv]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 2, result.stderr
    assert "this worker cannot run sandboxes, so it does not start" in result.stderr
    assert "user.max_user_namespaces=0" in result.stderr
    assert "Traceback" not in result.stderr
