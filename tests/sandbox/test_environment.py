"""The same step, run under different host conditions, sees an identical environment."""

from __future__ import annotations

import os
from typing import Any

import pytest

from tests.conftest import Unprivileged, need
from tests.sandbox.conftest import Driver, busybox_run

pytestmark = pytest.mark.userns

STATUS_FIELDS = ("Name|Umask|State|Tgid|Pid|PPid|TracerPid|Uid|Gid|FDSize|Groups|NStgid|NSpid|"
                 "NSpgid|NSsid|CapInh|CapPrm|CapEff|CapBnd|CapAmb|NoNewPrivs|Seccomp|"
                 "Seccomp_filters|SigQ|SigPnd|ShdPnd|SigBlk|SigIgn|SigCgt|"
                 "Speculation_Store_Bypass|Cpus_allowed_list|Mems_allowed_list")

DUMP = f"""
echo '== env'; env | sort
echo '== id'; id
echo '== hostname'; hostname; cat /proc/sys/kernel/domainname
echo '== umask'; umask
echo '== date'; date -d @86400
echo '== pwd'; pwd
echo '== personality'; cat /proc/self/personality
echo '== status'; grep -E '^({STATUS_FIELDS}):' /proc/self/status
echo '== ls /'; ls -la /
echo '== ls /dev'; ls -la /dev
echo '== ls /etc'; ls -la /etc; cat /etc/passwd /etc/group /etc/hosts
echo '== touch'; touch /tmp/new /build/new; mkdir /tmp/dir
stat -c '%A %U %G %n' /tmp/new /build/new /tmp/dir
"""


def normalise(log: str) -> str:
    """Blank what the kernel sets and a user namespace cannot change: the mount time of
    /proc and /dev/pts, and /proc's link count (the number of processes on the host)."""
    lines = []
    for line in log.splitlines():
        words = line.split()
        if len(words) == 9 and words[-1] in ("proc", "pts"):
            words[5:8] = ["<mount", "time>", "-"]
            if words[-1] == "proc":
                words[1] = "<n>"
            line = " ".join(words)
        lines.append(line)
    return "\n".join(lines)


def dump(driver: Driver, **conditions: Any) -> str:
    results = driver([busybox_run("dump", DUMP, env=[["GREETING", "hi"]], epoch=1700000000)],
                     **conditions)
    result = results["dump"]
    assert result.get("returncode") == 0, result
    log: str = result["log"]
    return normalise(log)


def test_identical_environment(unprivileged: Unprivileged, sandbox_driver: Driver) -> None:
    first_cwd = unprivileged.scratch("env-cwd")
    first = dump(sandbox_driver, cwd=first_cwd, umask=0o077,
                 env={"LANG": "de_DE.UTF-8", "TZ": "Asia/Tokyo", "HOST_ONLY": "1",
                      "SOURCE_DATE_EPOCH": "5", "HOME": "/root"})
    # The second run: this process's uid (root in CI), another cwd, umask, locale, zone.
    second = dump(sandbox_driver, as_caller=True, cwd="/", umask=0o022,
                  env={"LANG": "C", "TZ": "UTC", "LC_ALL": "C", "OTHER_HOST_VAR": "2"})
    assert first == second
    assert "uid=1000(build) gid=100(users)" in first
    assert "\nlocalhost\n(none)\n" in first
    assert "== umask\n0022\n" in first
    assert "Fri Jan  2 00:00:00 UTC 1970" in first  # TZ=UTC
    assert "== personality\n00040000\n" in first  # ADDR_NO_RANDOMIZE
    status = dict(line.split(":\t", 1) for line in first.split("== status\n")[1]
                  .split("\n== ")[0].splitlines())
    assert status["NoNewPrivs"] == "1" and status["Seccomp"] == "2"
    assert status["CapEff"] == status["CapBnd"] == "0000000000000000"
    assert status["Uid"].split() == ["1000"] * 4 and status["Groups"].strip() == ""
    env = first.split("== env\n")[1].split("\n== ")[0].splitlines()
    assert env == sorted(["BUILD_CORES=1", "GREETING=hi", "HOME=/homeless-shelter",
                          "LANG=C.UTF-8", "PATH=/bin", "PWD=/build", "SHLVL=1",
                          "SOURCE_DATE_EPOCH=1700000000", "TMPDIR=/tmp", "TZ=UTC"])
    assert "Nov 14  2023 etc" in first  # what the sandbox made carries the epoch
    assert "-rw-r--r-- build users /build/new" in first
    need(os.geteuid() == 0,
         "compared two runs as the same uid; run as root to compare root with 65534")
