"""The sandbox's pid 1: cloned by the fork server into fresh namespaces, it maps its ids,
builds the new root, hardens itself and executes the command.

It runs with modules the server imported before cloning; nothing is imported here, as
after ``pivot_root`` the host's files are gone. A setup failure is written to the error
pipe (close-on-exec, so a successful exec closes it empty) for the server to raise.
"""

from __future__ import annotations

import array
import dataclasses
import errno
import os
import select
import shlex
import signal
import socket
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NoReturn

import msgpack

from sandbox import syscalls
from sandbox.errors import SandboxError, UserNamespacesUnavailable
from sandbox.limits import apply_rlimits
from sandbox.operations import MapIds, Operation, Unshare
from sandbox.plan import (
    BUILD_GID,
    BUILD_UID,
    ResolvedMount,
    environment,
    job_operations,
    network_operations,
    skeleton_operations,
    work_directory,
)
from sandbox.spec import SandboxSpec
from sandbox.userns import diagnose, read_facts
from sandbox.wire import MAX_MESSAGE, decode_spec

FD_SIZE = array.array("i").itemsize

UMASK = 0o022
EXIT_SETUP_FAILED = 125


@dataclass(frozen=True)
class ServerConfig:
    """What the server learns once, before cloning sandboxes."""

    server_pid: int
    debug: bool
    cgroup: bool  # CLONE_NEWCGROUP works here
    cgroup_limits: bool  # the server puts each run in a cgroup v2 with its limits
    cap_last_cap: int
    seccomp: syscalls.SeccompProgram
    ignored_signals: tuple[int, ...]  # SIG_IGN in the server; exec keeps those: reset them


@dataclass(frozen=True)
class Spare:
    """A pid 1 cloned ahead of its job: what it needs until the job arrives."""

    maps: MapIds  # written by the spare when ``pid`` is "self", else by the server
    namespaces: Unshare  # the rest, made by the spare itself
    channel: int  # SOCK_SEQPACKET end the job arrives on
    error_w: int
    go_r: int  # readable once the server wrote the maps (root callers), else -1
    as_root: bool


@dataclass(frozen=True)
class Job:
    """One run, as the server hands it to a spare."""

    spec: SandboxSpec
    mounts: tuple[ResolvedMount, ...]
    log_fd: int
    terminal: tuple[int, ...]  # fds 0, 1, 2 of the caller, for interactive runs


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


def resolve_mounts(spec: SandboxSpec) -> tuple[ResolvedMount, ...]:
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
    return tuple(resolved)


def open_sources(mounts: Sequence[ResolvedMount]) -> list[ResolvedMount]:
    """Reach each source (a read-only file: its directory) through a descriptor.

    A root caller opens them in the new mount namespace while its fs uid is still host
    root, then becomes the build user: paths only root may walk (/root/...) still work.
    """
    opened: dict[str, str] = {}

    def reach(path: str) -> str:
        if path not in opened:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            opened[path] = f"/proc/self/fd/{fd}"
        return opened[path]

    reached = []
    for m in mounts:
        via = reach(m.source if m.is_dir or m.writable else os.path.dirname(m.source))
        upper = m.layer or m.source
        work = reach(work_directory(upper)) if m.work else ""
        layer = reach(m.layer) if m.layer else ""
        reached.append(dataclasses.replace(m, via=via, work=work, layer=layer))
    return reached


def become_build_user() -> None:
    """A root caller, in its user namespace, takes the build uid and gid there.

    The namespace maps no uid 0, so the switch keeps the capabilities (they go at exec,
    as for everybody); what the sandbox makes is then the build user's, as for anybody.
    """
    os.setresgid(BUILD_GID, BUILD_GID, BUILD_GID)
    os.setresuid(BUILD_UID, BUILD_UID, BUILD_UID)
    syscalls.prctl(syscalls.PR_SET_DUMPABLE, 1)  # changing uid cleared it


def become_pid1(spare: Spare, config: ServerConfig) -> NoReturn:
    """Enter the namespaces, wait for a job, set the sandbox up, execute; never returns.

    Everything that does not depend on the job (the id maps, the other namespaces, the
    hostname, ``lo`` and, unless the caller is root, the skeleton of the new root) is
    done while the spare waits, so a run only pays for its own mounts.
    """
    done: list[Operation] = []  # described once the job says whether to debug
    try:
        syscalls.prctl(syscalls.PR_SET_PDEATHSIG, signal.SIGKILL)
        # If the server died before that, the pipe's read end is gone.
        if _reader_gone(spare.error_w):
            os._exit(EXIT_SETUP_FAILED)
        os.umask(0)
        if spare.as_root:
            if os.read(spare.go_r, 1) != b"g":
                os._exit(EXIT_SETUP_FAILED)  # the server failed to map us; it reports
        else:
            try:
                run_operations([spare.maps], None)
            except SetupFailed as exc:
                _report(spare.error_w, diagnose(exc.error, read_facts()))
        done.append(spare.maps)
        run_operations([spare.namespaces], None)
        done.append(spare.namespaces)
        network = network_operations()
        run_operations(network, None)
        done += network
        if not spare.as_root:
            # A root caller's pid 1 makes its files as the build user, which it only
            # becomes after opening the job's sources as root: it builds everything then.
            skeleton = skeleton_operations()
            run_operations(skeleton, None)
            done += skeleton
        job = receive_job(spare.channel)
        if job is None:
            os._exit(0)  # the server is shutting down
    except SetupFailed as exc:
        _report(spare.error_w, SandboxError(exc.describe()))
    except BaseException as exc:
        _report(spare.error_w, SandboxError(f"sandbox setup failed: {exc!r}"))
    debug_fd = job.log_fd if (job.spec.debug or config.debug) else None
    for operation in done:
        _note(debug_fd, operation.describe())
    _setup_and_exec(job, spare, config, debug_fd)


def receive_job(channel: int) -> Job | None:
    """The job the server sends: msgpack [spec, mounts] with the log (and terminal) fds."""
    with socket.socket(fileno=channel) as sock:
        space = socket.CMSG_SPACE(4 * FD_SIZE)
        payload, ancillary, _flags, _addr = sock.recvmsg(MAX_MESSAGE, space)
        sock.detach()
    if not payload:
        return None
    fds = array.array("i")
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % FD_SIZE])
    spec_payload, mounts = msgpack.unpackb(payload)
    return Job(spec=decode_spec(spec_payload),
               mounts=tuple(ResolvedMount(*m) for m in mounts),
               log_fd=fds[0], terminal=tuple(fds[1:]))


def encode_job(spec_payload: bytes, mounts: Sequence[ResolvedMount]) -> bytes:
    return bytes(msgpack.packb([spec_payload, [[m.source, m.target, m.writable, m.is_dir,
                                                m.via, m.work, m.layer] for m in mounts]]))


def _setup_and_exec(job: Job, spare: Spare, config: ServerConfig,
                    debug_fd: int | None) -> NoReturn:
    env = environment(job.spec)
    try:
        mounts = job.mounts
        if spare.as_root:
            mounts = tuple(open_sources(mounts))
            become_build_user()
            syscalls.prctl(syscalls.PR_SET_PDEATHSIG, signal.SIGKILL)  # uid change cleared it
        if not job.spec.interactive:
            os.setsid()  # no controlling terminal: nothing to TIOCSTI into
        if spare.as_root:
            run_operations(skeleton_operations(), debug_fd)
        run_operations(job_operations(mounts, epoch=job.spec.epoch,
                                      limits=job.spec.limits), debug_fd)
        _note(debug_fd, f"cd {shlex.quote(job.spec.cwd)}")
        os.chdir(job.spec.cwd)
        _harden_process(config, debug_fd)
        if job.spec.interactive:
            for fd, target in zip(job.terminal, (0, 1, 2), strict=True):
                os.dup2(fd, target)
        else:
            null = os.open("/dev/null", os.O_RDONLY)
            os.dup2(null, 0)
            os.dup2(job.log_fd, 1)
            os.dup2(job.log_fd, 2)
        os.closerange(3, spare.error_w)
        os.closerange(spare.error_w + 1, 1 << 20)
        if debug_fd is not None:  # closed above; the log is stderr now
            _note(2, "exec env -i " + " ".join(shlex.quote(f"{k}={v}") for k, v in
                                               sorted(env.items()))
                  + " " + " ".join(shlex.quote(a) for a in job.spec.argv))
        apply_rlimits(job.spec.limits, cgroup=config.cgroup_limits)
        config.seccomp.install()
    except SetupFailed as exc:
        _report(spare.error_w, SandboxError(
            exc.describe(), hint="check that every mount source exists and that its "
                                 "target is not inside another read-only mount"))
    except BaseException as exc:
        _report(spare.error_w, SandboxError(f"sandbox setup failed: {exc!r}"))
    _exec(job.spec.argv, env)


def _reader_gone(fd: int) -> bool:
    poller = select.poll()
    poller.register(fd, 0)
    return any(ev & select.POLLERR for _, ev in poller.poll(0))


def _note(debug_fd: int | None, text: str) -> None:
    if debug_fd is not None:
        os.write(debug_fd, f"+ {text}\n".encode())


def _harden_process(config: ServerConfig, debug_fd: int | None) -> None:
    """Everything about the process that must not depend on the caller."""
    syscalls.drop_bounding_set(config.cap_last_cap)
    syscalls.prctl(syscalls.PR_CAP_AMBIENT, syscalls.PR_CAP_AMBIENT_CLEAR_ALL)
    os.umask(UMASK)
    for signum in config.ignored_signals:
        signal.signal(signum, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    syscalls.prctl(syscalls.PR_SET_NO_NEW_PRIVS, 1)
    syscalls.personality(syscalls.ADDR_NO_RANDOMIZE)
    _note(debug_fd, f"umask {UMASK:03o}; setpriv --no-new-privs --bounding-set=-all "
                    "setarch -R (seccomp: no setuid/setgid modes, xattrs, device nodes)")


def encode_report(error: SandboxError) -> bytes:
    kind = "userns" if isinstance(error, UserNamespacesUnavailable) else "setup"
    return bytes(msgpack.packb([kind, error.message, error.hint]))


def decode_report(report: bytes) -> SandboxError:
    kind, message, hint = msgpack.unpackb(report)
    cls = UserNamespacesUnavailable if kind == "userns" else SandboxError
    return cls(message, hint=hint)


def _report(error_w: int, error: SandboxError) -> NoReturn:
    try:
        os.write(error_w, encode_report(error))
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
