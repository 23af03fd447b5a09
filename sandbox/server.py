"""The fork server's loop: one process, one thread, every running sandbox at once.

It keeps one *spare*: a child cloned ahead of time into a new user and pid namespace,
which maps its ids, makes its own mount, network, UTS, IPC and cgroup namespaces, brings
``lo`` up and waits (:mod:`sandbox.child`). A request (the spec as msgpack, with the run
socket, the log fd and for interactive runs the terminal's fds 0, 1, 2 by SCM_RIGHTS) is
checked here, handed to the spare with its fds, and the next spare is cloned after the
reply, off the path of the next run. The server watches each sandbox's pid 1 through a
pidfd and kills it (so its whole pid namespace, gone once ``waitpid`` returns) on
timeout, on SIGINT (non-interactive runs) or when the caller closes the run socket.

A spare's mount namespace is a copy of the host's mounts when it was cloned: a file
system mounted on the host later is not visible to it.
"""

from __future__ import annotations

import array
import contextlib
import dataclasses
import os
import select
import signal
import socket
import time
from dataclasses import dataclass, field
from typing import NoReturn

import msgpack

from sandbox.child import (
    EXIT_SETUP_FAILED,
    ServerConfig,
    Spare,
    become_pid1,
    decode_report,
    encode_job,
    resolve_mounts,
)
from sandbox.errors import SandboxError
from sandbox.limits import Cgroups, LogKeeper, Watch, describe
from sandbox.plan import (
    ROOT_CALLER_UID,
    ResolvedMount,
    environment,
    filesystem_operations,
    namespace_operations,
    network_operations,
    shared_layers,
    work_directory,
)
from sandbox.spec import Mount, SandboxResult, SandboxSpec
from sandbox.userns import diagnose, read_facts
from sandbox.wire import MAX_MESSAGE, decode_spec, encode_error, encode_result, encode_spec

FD_SIZE = array.array("i").itemsize
SPARES = 2  # pid 1s kept cloned ahead; one more after each run ends, up to this many
MAX_FDS = 5  # run socket, log, and the terminal's 0, 1, 2


@dataclass
class SpareProcess:
    """A pid 1 cloned ahead of its job (mutable state, not a value)."""

    pid: int
    pidfd: int
    channel: socket.socket
    error_r: int
    setup_error: SandboxError | None = None


@dataclass
class Run:
    """The server's bookkeeping for one running sandbox (mutable state, not a value)."""

    pid: int
    pidfd: int
    conn: socket.socket
    error_r: int
    deadline: float | None
    interactive: bool
    started: float
    report: bytearray = field(default_factory=bytearray)
    timed_out: bool = False
    interrupted: bool = False
    setup_error: SandboxError | None = None
    work_dirs: list[str] = field(default_factory=list)
    log_r: int = -1  # the read end of the pipe the run's output comes through
    keeper: LogKeeper | None = None
    watch: Watch | None = None
    cgroup: str | None = None
    limit: str | None = None

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)


def remove_work_directory(path: str) -> None:
    """Remove an overlay work directory; overlayfs leaves mode 000 directories in it."""
    try:
        os.chmod(path, 0o700)
        names = os.listdir(path)
    except FileNotFoundError:
        return
    except OSError:
        names = []
    for name in names:
        inner = os.path.join(path, name)
        if os.path.isdir(inner) and not os.path.islink(inner):
            remove_work_directory(inner)
        else:
            with contextlib.suppress(OSError):
                os.unlink(inner)
    with contextlib.suppress(OSError):
        os.rmdir(path)


class Server:
    def __init__(self, control: socket.socket, config: ServerConfig,
                 cgroups: Cgroups | None = None, mechanism: str = "rlimits") -> None:
        self.control = control
        self.config = config
        self.cgroups = cgroups
        self.mechanism = mechanism
        self.poller = select.poll()
        self.poller.register(control.fileno(), select.POLLIN)
        self.by_fd: dict[int, Run] = {}
        self.runs: list[Run] = []
        self.as_root = os.geteuid() == 0
        self.clone, self.maps, self.namespaces = namespace_operations(
            os.getuid(), os.getgid(), cgroup=config.cgroup)
        self.spares: list[SpareProcess] = []

    def start_spare(self) -> None:
        self.spares.append(self._clone_spare())

    def warm_up(self) -> None:
        """Run the pure code a sandbox's pid 1 runs, here, before any clone.

        The interpreter specialises bytecode as it runs it; done here once, every clone
        inherits it instead of rewriting (and copying) those pages itself.
        """
        spec = SandboxSpec(argv=("/bin/true",), mounts=(Mount("/", "/warm/dir"),
                                                        Mount("/", "/warm/file")),
                           env=(("K", "V"),), timeout=1.0)
        mounts = (ResolvedMount("/usr", "/warm/dir", False, True),
                  ResolvedMount("/usr/f", "/warm/file", False, False),
                  ResolvedMount("/tmp", "/build", True, True),
                  ResolvedMount("/var/b", "/warm/b", True, True, work="../w", layer="/var"),
                  ResolvedMount("/var/o", "/warm/o", True, True, work="../w", layer="/var"))
        for _ in range(16):
            payload = encode_spec(spec)
            msgpack.unpackb(encode_job(payload, mounts))
            decode_spec(payload)
            environment(spec)
            filesystem_operations(mounts, epoch=0)
            network_operations()

    def serve_forever(self) -> NoReturn:
        signal.signal(signal.SIGINT, self._interrupt)
        while True:
            events = self.poller.poll(self._wait_ms())
            now = time.monotonic()
            for run in self.runs:
                if run.deadline is not None and now >= run.deadline and not run.timed_out:
                    run.timed_out = True
                    run.kill()
                if run.watch is not None and now >= run.watch.next_scan and run.limit is None:
                    self._watch(run)
            for fd, _event in events:
                if fd == self.control.fileno():
                    self._accept()
                elif fd in self.by_fd:
                    self._event(self.by_fd[fd], fd)

    def _watch(self, run: Run) -> None:
        """Kill a run that passed a limit the kernel does not enforce by itself."""
        assert run.watch is not None
        passed = run.watch.check(run.pid)
        if passed is None and run.cgroup is not None:
            passed = "pids" if Cgroups.passed(run.cgroup) == "pids" else None
        if passed is not None:
            run.limit = passed
            run.kill()

    def _wait_ms(self) -> int | None:
        deadlines = [r.deadline for r in self.runs if r.deadline is not None and not r.timed_out]
        deadlines += [r.watch.next_scan for r in self.runs
                      if r.watch is not None and r.limit is None]
        if not deadlines:
            return None
        return max(0, int((min(deadlines) - time.monotonic()) * 1000) + 1)

    def _interrupt(self, _signum: int, _frame: object) -> None:
        if os.getpid() != self.config.server_pid:
            return  # a sandbox's pid 1 before it reset its signals
        for run in self.runs:
            if not run.interactive:
                run.interrupted = True
                run.kill()

    def _accept(self) -> None:
        space = socket.CMSG_SPACE(MAX_FDS * FD_SIZE)
        payload, ancillary, _flags, _addr = self.control.recvmsg(MAX_MESSAGE, space)
        if not payload:
            self._shut_down()
        fds = array.array("i")
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(data[: len(data) - len(data) % FD_SIZE])
        if len(fds) < 2:
            for fd in fds:
                os.close(fd)
            return
        conn = socket.socket(fileno=fds[0])
        try:
            self._start(payload, conn, fds[1], tuple(fds[2:]))
        except SandboxError as exc:
            with contextlib.suppress(OSError):
                conn.send(encode_error(exc))
            conn.close()
        except Exception as exc:  # never let one request stop the server
            with contextlib.suppress(OSError):
                conn.send(encode_error(SandboxError(f"sandbox server failed: {exc!r}")))
            conn.close()
        finally:
            for fd in fds[1:]:
                os.close(fd)

    def _shut_down(self) -> NoReturn:
        """The caller closed the runner (or died): kill every sandbox, wait, exit.

        A pid 1 is reaped only once everything in its pid namespace is gone, so when the
        caller's close() has reaped this server, nothing of any sandbox is left.
        """
        for run in self.runs:
            run.kill()
        for spare in self.spares:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(spare.pidfd, signal.SIGKILL)
        for pid in [run.pid for run in self.runs] + [spare.pid for spare in self.spares]:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        os._exit(0)

    def _start(self, payload: bytes, conn: socket.socket, log_fd: int,
               terminal: tuple[int, ...]) -> None:
        spec = decode_spec(payload)
        if spec.extra:
            raise SandboxError(f"unknown sandbox options {[k for k, _ in spec.extra]}")
        mounts, work_dirs = self._prepare_writable(resolve_mounts(spec),
                                                   overlays=spec.hide_writable_paths)
        keeper, log_r, log_w = None, -1, log_fd
        if not spec.interactive:  # the output comes through us, to keep head and tail
            log_r, log_w = os.pipe2(os.O_CLOEXEC)
            os.set_blocking(log_r, False)
            keeper = LogKeeper(os.dup(log_fd), spec.limits.log)
            if spec.limits.bounded():
                keeper.feed(describe(spec.limits, self.mechanism).encode())
        debug_fd = log_fd if (spec.debug or self.config.debug) else None
        if debug_fd is not None:
            os.write(debug_fd, f"+ {self.clone.describe()}\n".encode())
        job = encode_job(payload, mounts)
        fds = array.array("i", [log_w, *terminal])
        try:
            spare, cgroup = self._hand_over_to_spare(job, fds, spec)
        except BaseException:
            if keeper is not None:
                os.close(log_r)
                os.close(keeper.fd)
            raise
        finally:
            if log_w != log_fd:
                os.close(log_w)
        started = time.monotonic()
        run = Run(pid=spare.pid, pidfd=spare.pidfd, conn=conn, error_r=spare.error_r,
                  deadline=None if spec.timeout is None else started + spec.timeout,
                  interactive=spec.interactive, started=started,
                  setup_error=spare.setup_error, work_dirs=work_dirs, log_r=log_r,
                  keeper=keeper, cgroup=cgroup)
        watch = Watch(spec.limits, [m.source for m in mounts if m.writable],
                      rlimits=self.cgroups is None)
        run.watch = watch if watch.needed else None
        self.runs.append(run)
        for fd in (run.pidfd, run.error_r, conn.fileno(), *([log_r] if log_r >= 0 else [])):
            self.by_fd[fd] = run
            self.poller.register(fd, select.POLLIN)

    def _hand_over_to_spare(self, job: bytes, fds: array.array[int], spec: SandboxSpec
                            ) -> tuple[SpareProcess, str | None]:
        """Give the job to a spare (in its own cgroup when limits go through cgroups)."""
        bounded = spec.limits.memory is not None or spec.limits.pids is not None
        spare = self.spares.pop(0) if self.spares else self._clone_spare()
        for attempt in range(2):
            cgroup = None
            if self.cgroups is not None and bounded and spare.setup_error is None:
                try:
                    cgroup = self.cgroups.enter(spare.pid, spec.limits)
                except OSError as exc:
                    self._discard(spare)
                    raise SandboxError(f"cannot put the run in a cgroup: {exc}") from None
            if self._hand_over(spare, job, fds):
                return spare, cgroup
            if cgroup is not None:
                Cgroups.remove(cgroup)
            if attempt == 0:
                self._discard(spare)  # it died while it waited: try a fresh one
                spare = self._clone_spare()
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(spare.pidfd, signal.SIGKILL)  # it says why
        return spare, None

    def _prepare_writable(self, mounts: tuple[ResolvedMount, ...], *, overlays: bool
                          ) -> tuple[tuple[ResolvedMount, ...], list[str]]:
        """Give writable mounts to the build user (root callers) and their work dirs."""
        prepared = []
        work_dirs = []
        layers = shared_layers(mounts) if overlays else {}
        layer_work: dict[str, str | None] = {}
        for m in mounts:
            if m.writable and self.as_root:
                os.chown(m.source, ROOT_CALLER_UID, ROOT_CALLER_UID)
            layer = layers.get(m.source)
            if layer is not None:
                if layer not in layer_work:
                    layer_work[layer] = self._make_work_directory(layer)
                    if layer_work[layer] is not None:
                        work_dirs.append(str(layer_work[layer]))
                        if self.as_root:
                            os.chown(layer, ROOT_CALLER_UID, ROOT_CALLER_UID)
                work = layer_work[layer]
                if work is not None:
                    m = dataclasses.replace(m, work=f"../{os.path.basename(work)}",
                                            layer=layer)
            elif m.writable and m.is_dir and overlays:
                single = self._make_work_directory(m.source)
                if single is not None:  # else no room beside it: bound as it is
                    work_dirs.append(single)
                    m = dataclasses.replace(m, work=f"../{os.path.basename(single)}")
            prepared.append(m)
        return tuple(prepared), work_dirs

    def _make_work_directory(self, upper: str) -> str | None:
        """A fresh, empty overlay work directory beside ``upper``; None if impossible."""
        work = work_directory(upper)
        try:
            remove_work_directory(work)  # a killed server's leftover
            os.mkdir(work, 0o700)
            if self.as_root:
                os.chown(work, ROOT_CALLER_UID, ROOT_CALLER_UID)
        except OSError:
            return None
        return work

    @staticmethod
    def _hand_over(spare: SpareProcess, job: bytes, fds: array.array[int]) -> bool:
        """Send the job to the spare; False if it is gone."""
        try:
            if spare.setup_error is not None:
                return False
            spare.channel.sendmsg([job], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
            return True
        except OSError:
            return False
        finally:
            spare.channel.close()

    @staticmethod
    def _discard(spare: SpareProcess) -> None:
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(spare.pidfd, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(spare.pid, 0)
        os.close(spare.pidfd)
        os.close(spare.error_r)

    def _clone_spare(self) -> SpareProcess:
        """Clone a pid 1 into fresh namespaces; it maps its ids and waits for a job."""
        error_r, error_w = os.pipe2(os.O_CLOEXEC)
        go_r, go_w = os.pipe2(os.O_CLOEXEC) if self.as_root else (-1, -1)
        ours, theirs = socket.socketpair(socket.AF_UNIX,
                                         socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        spare = Spare(maps=self.maps, namespaces=self.namespaces, channel=theirs.fileno(),
                      error_w=error_w, go_r=go_r, as_root=self.as_root)
        try:
            pid = self.clone.clone()
        except OSError as exc:
            for fd in (error_r, error_w, go_r, go_w):
                if fd >= 0:
                    os.close(fd)
            ours.close()
            theirs.close()
            raise diagnose(exc, read_facts()) from None
        if pid == 0:
            try:
                ours.close()
                become_pid1(spare, self.config)
            finally:
                os._exit(EXIT_SETUP_FAILED)  # never back into the server's loop
        os.close(error_w)
        theirs.close()
        process = SpareProcess(pid=pid, pidfd=os.pidfd_open(pid), channel=ours,
                               error_r=error_r)
        if self.as_root:
            os.close(go_r)
            try:
                dataclasses.replace(self.maps, pid=str(pid)).execute()
                os.write(go_w, b"g")
            except OSError as exc:
                process.setup_error = diagnose(exc, read_facts())
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(process.pidfd, signal.SIGKILL)
            finally:
                os.close(go_w)
        return process

    def _event(self, run: Run, fd: int) -> None:
        if fd == run.pidfd:
            self._finish(run)
        elif fd == run.log_r:
            if not self._read_log(run):
                self._forget(fd)
        elif fd == run.error_r:
            chunk = os.read(run.error_r, 65536)
            run.report += chunk
            if not chunk:
                self._forget(fd)
        else:  # the caller went away (or broke protocol): stop the sandbox
            self._forget(fd)
            run.interrupted = True
            run.kill()

    @staticmethod
    def _read_log(run: Run, *, drain: bool = False) -> bool:
        """Pass what the run printed to its keeper; False at the end of its output."""
        assert run.keeper is not None
        while True:
            try:
                chunk = os.read(run.log_r, 1 << 16)
            except BlockingIOError:
                return True
            except OSError:
                return False
            if not chunk:
                return False
            run.keeper.feed(chunk)
            if not drain:
                return True

    def _forget(self, fd: int) -> None:
        if self.by_fd.pop(fd, None) is not None:
            self.poller.unregister(fd)

    def _finish(self, run: Run) -> None:
        _, status = os.waitpid(run.pid, 0)
        duration = time.monotonic() - run.started
        if run.error_r in self.by_fd:
            while chunk := os.read(run.error_r, 65536):
                run.report += chunk
        for fd in (run.pidfd, run.error_r, run.conn.fileno(), run.log_r):
            self._forget(fd)
        self.runs.remove(run)
        dropped = 0
        if run.keeper is not None:
            self._read_log(run, drain=True)  # every writer is gone with the pid namespace
            os.close(run.log_r)
            dropped = run.keeper.finish()
        if run.cgroup is not None:
            run.limit = run.limit or Cgroups.passed(run.cgroup)
            Cgroups.remove(run.cgroup)
        if run.setup_error is not None:
            reply = encode_error(run.setup_error)
        elif run.report:
            reply = encode_error(decode_report(bytes(run.report)))
        else:
            code = os.waitstatus_to_exitcode(status)
            reply = encode_result(SandboxResult(
                returncode=code if code >= 0 else None, signal=-code if code < 0 else None,
                timed_out=run.timed_out, duration=duration, interrupted=run.interrupted,
                limit=run.limit, log_dropped=dropped, mechanism=self.mechanism))
        for work in run.work_dirs:
            remove_work_directory(work)
        with contextlib.suppress(OSError):
            run.conn.send(reply)
        run.conn.close()
        os.close(run.pidfd)
        os.close(run.error_r)
        if len(self.spares) < SPARES:
            # Clone the next pid 1 now, after the reply: off the path of the next run.
            with contextlib.suppress(SandboxError):
                self.spares.append(self._clone_spare())
