"""The seccomp filter, installed in a forked child of the test process (no namespaces)."""

from __future__ import annotations

import ast
import errno
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from sandbox import seccomp, syscalls


def attempt_under_filter(directory: Path) -> dict[str, int]:
    """Fork, install the filter, try each refused call; errno per attempt (0 = allowed)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        outcome: dict[str, int] = {}
        try:
            syscalls.prctl(syscalls.PR_SET_NO_NEW_PRIVS, 1)
            syscalls.install_seccomp(seccomp.build_filter())
            target = directory / "f"
            target.write_text("x")
            attempts: dict[str, Callable[[], object]] = {
                "chmod_suid": lambda: os.chmod(target, 0o4755),
                "chmod_sgid": lambda: os.chmod(target, 0o2755),
                "fchmod_suid": lambda: os.fchmod(os.open(target, os.O_RDONLY), 0o4755),
                "chmod_plain": lambda: os.chmod(target, 0o755),
                "chmod_world": lambda: os.chmod(target, 0o777),
                "setxattr": lambda: os.setxattr(target, "user.k", b"v"),
                "mknod_chr": lambda: os.mknod(directory / "c", stat.S_IFCHR | 0o600,
                                              os.makedev(1, 3)),
                "mknod_whiteout": lambda: os.mknod(directory / "w", stat.S_IFCHR | 0o600, 0),
                "mknod_fifo": lambda: os.mknod(directory / "p", stat.S_IFIFO | 0o600),
            }
            for name, call in attempts.items():
                try:
                    call()
                    outcome[name] = 0
                except OSError as exc:
                    outcome[name] = exc.errno or -1
            os.write(write_end, repr(outcome).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as f:
        text = f.read()
    os.waitpid(pid, 0)
    result: dict[str, int] = ast.literal_eval(text)
    return result


def test_filter_refuses_what_nix_refuses(tmp_path: Path) -> None:
    outcome = attempt_under_filter(tmp_path)
    assert outcome["chmod_suid"] == errno.EPERM
    assert outcome["chmod_sgid"] == errno.EPERM
    assert outcome["fchmod_suid"] == errno.EPERM
    assert outcome["setxattr"] == errno.ENOTSUP
    assert outcome["mknod_chr"] == errno.EPERM
    assert outcome["mknod_whiteout"] == errno.EPERM
    assert outcome["chmod_plain"] == 0
    assert outcome["chmod_world"] == 0
    assert outcome["mknod_fifo"] == 0


def test_filter_program_shape() -> None:
    program = seccomp.build_filter("x86_64")
    assert len(program) % seccomp.SOCK_FILTER.size == 0
    first = seccomp.SOCK_FILTER.unpack_from(program, 0)
    assert first == (seccomp.BPF_LD_W_ABS, 0, 0, seccomp.SECCOMP_DATA_ARCH)
    assert len(seccomp.build_filter("aarch64")) < len(program)  # one ABI, not two
    with pytest.raises(ValueError, match="no seccomp syscall table"):
        seccomp.build_filter("sparc64")
