"""``python -m sandbox``: runs a command, and ``--debug`` shows every operation."""

from __future__ import annotations

import os

import pytest

from tests.conftest import Unprivileged, need
from tests.sandbox.conftest import BUSYBOX

pytestmark = pytest.mark.userns


def test_debug_prints_each_operation_as_a_command(unprivileged: Unprivileged) -> None:
    need(os.path.exists(BUSYBOX), "needs /bin/busybox")
    done = unprivileged.run(["python", "-m", "sandbox", "--debug", "--ro",
                             f"{BUSYBOX}:{BUSYBOX}", "--env", "GREETING=hi", "--", BUSYBOX,
                             "sh", "-c", "echo $GREETING from $(hostname); exit 3"])
    assert done.returncode == 3, done.stderr
    lines = done.stderr.splitlines()
    commands = [line[2:] for line in lines if line.startswith("+ ")]
    assert commands[0].startswith("unshare --user --pid --fork")
    for expected in ("echo deny > /proc/", "unshare --mount --net --uts --ipc",
                     "ip link set lo up", "mount --make-rprivate /",
                     "cd /tmp && pivot_root . oldroot && cd /",
                     "mount -t proc -o nosuid,nodev,noexec proc /newroot/proc",
                     "mount -o remount,bind,ro,nosuid,nodev /newroot",
                     "cd /newroot && pivot_root . . && cd /", "umount -l ."):
        assert any(c.startswith(expected) for c in commands), expected
    assert any(c.startswith("exec env -i ") and "GREETING=hi" in c for c in commands)
    assert "hi from localhost" in done.stderr


def test_usage_errors_and_missing_sources(unprivileged: Unprivileged) -> None:
    bad = unprivileged.run(["python", "-m", "sandbox", "--ro", "nocolon", "--", "true"])
    assert bad.returncode == 2 and "HOST:TARGET" in bad.stderr
    missing = unprivileged.run(["python", "-m", "sandbox", "--ro", "/nonexistent:/x", "--",
                                "/x"])
    assert missing.returncode == 2
    assert "mount source /nonexistent (for /x)" in missing.stderr and "hint:" in missing.stderr
