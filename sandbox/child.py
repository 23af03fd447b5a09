"""The processes of one sandboxed run, forked from the fork server.

The *supervisor* (a child of the server, in the host's pid namespace) enters fresh
user, mount, network, UTS, IPC and cgroup namespaces and forks the sandbox's *pid 1*,
which builds the new root and executes the command. The supervisor waits for pid 1, kills
it on timeout, on SIGINT/SIGTERM/SIGHUP or when the caller goes away, and sends the
result back. Killing pid 1 kills everything in its pid namespace, and pid 1 only returns
from ``waitpid`` once all of it is gone, so nothing outlives a run.

Both run with modules the server imported before forking; nothing is imported here
after the fork, because after ``pivot_root`` the host's files are gone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import select
import shlex
import signal
import socket
import stat
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NoReturn

import msgpack

from sandbox import syscalls
from sandbox.errors import SandboxError
from sandbox.operations import EnterUserNamespace, Operation
from sandbox.plan import (
    BUILD_GID,
    BUILD_UID,
    ROOT_CALLER_UID,
    ResolvedMount,
    environment,
    filesystem_operations,
    namespace_operations,
    network_operations,
)
from sandbox.spec import SandboxResult, SandboxSpec
from sandbox.userns import diagnose, read_facts
from sandbox.wire import MAX_MESSAGE, decode_spec, encode_error, encode_result

UMASK = 0o022
EXIT_SETUP_FAILED = 125


@dataclass(frozen=True)
class ServerConfig:
    """What the server learns once, before forking supervisors."""

    server_pid: int
    debug: bool
    cgroup: bool  # CLONE_NEWCGROUP works here
    cap_last_cap: int
    seccomp_filter: bytes
    ignored_signals: tuple[int, ...]  # SIG_IGN here; exec keeps those, so reset them


class SetupFailed(Exception):
    """An operation failed; carries it and the OSError."""

    def __init__(self, operation: Operation, error: OSError) -> None:
        super().__init__(operation.describe())
        self.operation = operation
        self.error = error

    def describe(self) -> str:
        return f"sandbox setup failed at `{self.operation.describe()}`: {self.error.strerror}"


def run_operations(operations: Sequence[Operation], debug_fd: int | None) -> None:
    for operation in operations:
        if debug_fd is not None:
            os.write(debug_fd, f"+ {operation.describe()}\n".encode())
        try:
            operation.execute()
        except OSError as exc:
            raise SetupFailed(operation, exc) from exc


def resolve_mounts(spec: SandboxSpec) -> list[ResolvedMount]:
    """Follow the symlinks of each mount's source on the host; refuse bad mounts."""
    resolved = []
    seen: set[str] = set()
    for m in spec.mounts:
        target = os.path.normpath(m.target)
        if not target.startswith("/") or target == "/" or not m.source.startswith("/"):
            raise SandboxError(f"mount {m.source} -> {m.target}: both paths must be "
                               "absolute and the target must not be /")
        if target in seen:
            raise SandboxError(f"two mounts have the target {target}",
                               hint="give each mount its own target")
        seen.add(target)
        source = os.path.realpath(m.source)
        try:
            is_dir = stat.S_ISDIR(os.stat(source).st_mode)
        except OSError as exc:
            raise SandboxError(f"mount source {m.source} (for {target}): {exc.strerror}",
                               hint="create it, or check the path the caller gave") from None
        resolved.append(ResolvedMount(source, target, m.writable, is_dir))
    return resolved


def open_sources(mounts: Sequence[ResolvedMount]) -> list[ResolvedMount]:
    """Reach each source (a read-only file: its directory) through a descriptor.

    A root caller opens them in the new mount namespace while its fs uid is still host
    root, then becomes the build user: paths only root may walk (/root/...) still work.
    """
    opened: dict[str, str] = {}
    reached = []
    for m in mounts:
        reach = m.source if m.is_dir or m.writable else os.path.dirname(m.source)
        if reach not in opened:
            fd = os.open(reach, os.O_PATH | os.O_CLOEXEC)
            opened[reach] = f"/proc/self/fd/{fd}"
        reached.append(dataclasses.replace(m, via=opened[reach]))
    return reached


def become_build_user() -> None:
    """A root caller, now in its user namespace, takes the build uid and gid there.

    The namespace maps no uid 0, so the switch keeps the capabilities (they go at exec,
    as for everybody); files the sandbox makes are then the build user's, as for anybody.
    """
    os.setresgid(BUILD_GID, BUILD_GID, BUILD_GID)
    os.setresuid(BUILD_UID, BUILD_UID, BUILD_UID)
    syscalls.prctl(syscalls.PR_SET_DUMPABLE, 1)  # changing uid cleared it


def supervise(conn: socket.socket, log_fd: int, terminal: list[int],
              config: ServerConfig) -> NoReturn:
    """The supervisor's whole life; always ends with ``os._exit``."""
    try:
        reply = _supervise(conn, log_fd, terminal, config)
        if reply is not None:
            conn.send(reply)
    except BaseException as exc:  # report anything rather than die silently
        with contextlib.suppress(OSError):
            conn.send(encode_error(SandboxError(f"sandbox supervisor failed: {exc!r}")))
    finally:
        os._exit(0)


def _supervise(conn: socket.socket, log_fd: int, terminal: list[int],
               config: ServerConfig) -> bytes | None:
    syscalls.prctl(syscalls.PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != config.server_pid:
        return None
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    spec = decode_spec(conn.recv(MAX_MESSAGE))
    debug_fd = log_fd if (spec.debug or config.debug) else None
    try:
        if spec.extra:
            raise SandboxError(f"unknown sandbox options {[k for k, _ in spec.extra]}")
        mounts = resolve_mounts(spec)
        as_root = os.geteuid() == 0
        if as_root:
            os.setgroups([])
            for m in mounts:
                if m.writable:
                    os.chown(m.source, ROOT_CALLER_UID, ROOT_CALLER_UID)
        namespaces = namespace_operations(os.getuid(), os.getgid(), cgroup=config.cgroup)
        try:
            run_operations(namespaces, debug_fd)
        except SetupFailed as exc:
            if isinstance(exc.operation, EnterUserNamespace):
                raise diagnose(exc.error, read_facts()) from None
            raise
        if as_root:
            mounts = open_sources(mounts)
            become_build_user()
            # Changing credentials cleared the parent-death signal.
            syscalls.prctl(syscalls.PR_SET_PDEATHSIG, signal.SIGKILL)
            if os.getppid() != config.server_pid:
                return None
        run_operations(network_operations(), debug_fd)
    except SandboxError as exc:
        return encode_error(exc)
    except SetupFailed as exc:
        return encode_error(SandboxError(exc.describe()))
    operations = filesystem_operations(mounts, epoch=spec.epoch)
    env = environment(spec)
    error_r, error_w = os.pipe2(os.O_CLOEXEC)
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:
        os.close(error_r)
        conn.close()
        become_pid1(spec, operations, env, log_fd, terminal, error_w, debug_fd, config)
    os.close(error_w)
    return _wait(conn, spec, pid, error_r, started)


def _wait(conn: socket.socket, spec: SandboxSpec, pid: int, error_r: int,
          started: float) -> bytes:
    interrupted = False

    def kill(signum: int, _frame: object) -> None:
        nonlocal interrupted
        interrupted = True
        os.kill(pid, signal.SIGKILL)

    for signum in (signal.SIGTERM, signal.SIGHUP) + (() if spec.interactive
                                                     else (signal.SIGINT,)):
        signal.signal(signum, kill)
    pidfd = os.pidfd_open(pid)
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    poller.register(error_r, select.POLLIN)
    poller.register(conn.fileno(), select.POLLIN)
    deadline = None if spec.timeout is None else started + spec.timeout
    timed_out = False
    report = b""
    exited = False
    while not exited:
        wait_ms = None
        if deadline is not None and not timed_out:
            wait_ms = max(0, int((deadline - time.monotonic()) * 1000) + 1)
        events = poller.poll(wait_ms)
        if not events and not timed_out:
            timed_out = True
            os.kill(pid, signal.SIGKILL)
        for fd, _ in events:
            if fd == pidfd:
                exited = True
            elif fd == error_r:
                chunk = os.read(error_r, 65536)
                report += chunk
                if not chunk:
                    poller.unregister(error_r)
            else:  # the caller went away (closed its socket)
                poller.unregister(fd)
                interrupted = True
                os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    duration = time.monotonic() - started
    while chunk := os.read(error_r, 65536):
        report += chunk
    if report:
        message, hint = msgpack.unpackb(report)
        return encode_error(SandboxError(message, hint=hint))
    code = os.waitstatus_to_exitcode(status)
    return encode_result(SandboxResult(
        returncode=code if code >= 0 else None, signal=-code if code < 0 else None,
        timed_out=timed_out, duration=duration, interrupted=interrupted))


def become_pid1(spec: SandboxSpec, operations: Sequence[Operation], env: dict[str, str],
                log_fd: int, terminal: list[int], error_w: int, debug_fd: int | None,
                config: ServerConfig) -> NoReturn:
    """Build the new root and execute the command as pid 1 of the new pid namespace."""
    try:
        syscalls.prctl(syscalls.PR_SET_PDEATHSIG, signal.SIGKILL)
        # If the supervisor died before that, the pipe's read end is gone.
        if _reader_gone(error_w):
            os._exit(EXIT_SETUP_FAILED)
        if not spec.interactive:
            os.setsid()  # no controlling terminal: nothing to TIOCSTI into
        run_operations(operations, debug_fd)
        _note(debug_fd, f"cd {spec.cwd}")
        os.chdir(spec.cwd)
        _harden_process(config, debug_fd)
        if spec.interactive:
            for fd, target in zip(terminal, (0, 1, 2), strict=True):
                os.dup2(fd, target)
        else:
            null = os.open("/dev/null", os.O_RDONLY)
            os.dup2(null, 0)
            os.dup2(log_fd, 1)
            os.dup2(log_fd, 2)
        os.closerange(3, error_w)
        os.closerange(error_w + 1, 1 << 20)
        if debug_fd is not None:  # closed above; the log is stderr now
            _note(2, "exec env -i " + " ".join(shlex.quote(f"{k}={v}") for k, v in
                                               sorted(env.items()))
                  + " " + " ".join(shlex.quote(a) for a in spec.argv))
        syscalls.install_seccomp(config.seccomp_filter)
    except SetupFailed as exc:
        _report(error_w, exc.describe(),
                "check that every mount source exists and that its target is not inside "
                "another read-only mount")
    except BaseException as exc:
        _report(error_w, f"sandbox setup failed: {exc!r}", None)
    _exec(spec.argv, env)


def _reader_gone(fd: int) -> bool:
    poller = select.poll()
    poller.register(fd, 0)
    return any(ev & select.POLLERR for _, ev in poller.poll(0))


def _note(debug_fd: int | None, text: str) -> None:
    if debug_fd is not None:
        os.write(debug_fd, f"+ {text}\n".encode())


def _harden_process(config: ServerConfig, debug_fd: int | None) -> None:
    """Everything about the process that must not depend on the caller."""
    for cap in range(config.cap_last_cap + 1):
        syscalls.prctl(syscalls.PR_CAPBSET_DROP, cap)
    syscalls.prctl(syscalls.PR_CAP_AMBIENT, syscalls.PR_CAP_AMBIENT_CLEAR_ALL)
    os.umask(UMASK)
    for signum in signal.valid_signals():
        if signum not in (signal.SIGKILL, signal.SIGSTOP):
            with contextlib.suppress(OSError, ValueError):
                signal.signal(signum, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    syscalls.prctl(syscalls.PR_SET_NO_NEW_PRIVS, 1)
    syscalls.personality(syscalls.ADDR_NO_RANDOMIZE)
    _note(debug_fd, f"umask {UMASK:03o}; setpriv --no-new-privs --bounding-set=-all "
                    "setarch -R (seccomp: no setuid/setgid modes, xattrs, device nodes)")


def _report(error_w: int, message: str, hint: str | None) -> NoReturn:
    try:
        os.write(error_w, msgpack.packb([message, hint]))
    finally:
        os._exit(EXIT_SETUP_FAILED)


def _exec(argv: Sequence[str], env: dict[str, str]) -> NoReturn:
    program = argv[0]
    candidates = [program] if "/" in program else [
        os.path.join(d or ".", program) for d in env.get("PATH", "").split(":")]
    failure: OSError = FileNotFoundError(errno.ENOENT, "not found in PATH")
    for path in candidates:
        try:
            os.execve(path, list(argv), env)
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENOTDIR) or failure.errno == errno.ENOENT:
                failure = exc
    os.write(2, f"sandbox: cannot execute {program}: {failure.strerror}\n".encode())
    os._exit(126 if failure.errno == errno.EACCES else 127)
