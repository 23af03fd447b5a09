"""The fork server: the one way to run sandboxes, callable from any thread.

``unshare(CLONE_NEWUSER)`` fails in a multi-threaded process, and forking a big Python
process is slow, so :func:`start` forks a small server while the caller has one thread.
Each :meth:`ForkServer.run` makes a socketpair and sends the spec (msgpack) to the
server with one end of it and the log fd (plus the terminal's fds 0, 1, 2 for interactive
runs) attached by SCM_RIGHTS; the server (:mod:`sandbox.server`) clones the sandbox and
answers on that socket. Every sandbox dies with the server (PR_SET_PDEATHSIG) and the
server with its caller, so closing the runner, or the caller dying, kills them all.
"""

from __future__ import annotations

import array
import contextlib
import gc
import os
import signal
import socket
import threading
from typing import Any, NoReturn

import msgpack

from sandbox import syscalls
from sandbox.child import ServerConfig
from sandbox.errors import SandboxError
from sandbox.limits import Cgroups
from sandbox.plan import namespace_operations
from sandbox.seccomp import build_filter
from sandbox.server import Server
from sandbox.spec import SandboxResult, SandboxSpec
from sandbox.userns import diagnose, read_facts
from sandbox.wire import MAX_MESSAGE, decode_reply, encode_error, encode_spec


class ForkServer:
    """A running fork server; implements :class:`sandbox.spec.Runner`."""

    def __init__(self, pid: int, control: socket.socket) -> None:
        self.pid = pid
        self._control = control
        self._lock = threading.Lock()
        self._closed = False

    def run(self, spec: SandboxSpec, *, log_fd: int) -> SandboxResult:
        """Run ``spec``; stdout and stderr go to ``log_fd``. Safe from any thread."""
        payload = encode_spec(spec)
        if len(payload) > MAX_MESSAGE:
            raise SandboxError(f"the sandbox spec is too large ({len(payload)} bytes)",
                               hint="mount a directory instead of many single files")
        ours, theirs = socket.socketpair(socket.AF_UNIX,
                                         socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        with ours:
            try:
                fds = [theirs.fileno(), log_fd, *((0, 1, 2) if spec.interactive else ())]
                message = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                with self._lock:
                    if self._closed:
                        raise SandboxError("the sandbox runner is closed")
                    try:
                        self._control.sendmsg([payload], message)
                    except OSError as exc:
                        raise SandboxError(f"the sandbox fork server is gone: {exc}",
                                           hint="start a new runner") from None
            finally:
                theirs.close()
            try:
                reply = ours.recv(MAX_MESSAGE)
            except OSError as exc:
                raise SandboxError(f"lost the sandbox server: {exc}") from None
        if not reply:
            raise SandboxError("the sandbox server died without a result",
                               hint="was the runner closed, or the server killed?")
        return decode_reply(reply)

    def close(self) -> None:
        """Stop the server; running sandboxes are killed (they die with it)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._control.close()
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)

    def __enter__(self) -> ForkServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def start(*, debug: bool = False) -> ForkServer:
    """Fork the server; call it before the process starts any thread.

    Raises :class:`sandbox.errors.UserNamespacesUnavailable` (saying which setting and
    how to change it) when this host cannot make the sandbox's namespaces.
    """
    control, server_end = socket.socketpair(socket.AF_UNIX,
                                            socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    caller = os.getpid()
    pid = os.fork()
    if pid == 0:
        try:
            control.close()
            _serve(server_end, caller, debug)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                server_end.send(encode_error(SandboxError(f"sandbox fork server: {exc!r}")))
        finally:
            os._exit(0)
    server_end.close()
    runner = ForkServer(pid, control)
    hello = control.recv(MAX_MESSAGE)
    if hello != b"ready":
        runner.close()
        if hello:
            decode_reply(hello)  # raises the error it carries
        raise SandboxError("the sandbox fork server failed to start")
    return runner


def _serve(control: socket.socket, caller: int, debug: bool) -> NoReturn:
    syscalls.prctl(syscalls.PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != caller:
        os._exit(0)
    try:
        cgroup = _probe()
    except SandboxError as exc:
        control.send(encode_error(exc))
        os._exit(0)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # until the server's own handler
    ignored = tuple(s for s in sorted(signal.valid_signals())
                    if s not in (signal.SIGKILL, signal.SIGSTOP, signal.SIGINT)
                    and signal.getsignal(s) == signal.SIG_IGN)
    cgroups, mechanism = Cgroups.find(caller=caller)
    config = ServerConfig(server_pid=os.getpid(), debug=debug, cgroup=cgroup,
                          cgroup_limits=cgroups is not None,
                          cap_last_cap=_cap_last_cap(),
                          seccomp=syscalls.SeccompProgram(build_filter()),
                          ignored_signals=(signal.SIGINT, *ignored))
    # Sandboxes are cloned from here: no garbage collection to touch (and so copy) every
    # page of the server's objects in them.
    server = Server(control, config, cgroups,
                    mechanism if cgroups else f"rlimits and a watcher; {mechanism}")
    server.warm_up()
    gc.disable()
    gc.freeze()
    server.start_spare()
    control.send(b"ready")
    server.serve_forever()


def _cap_last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap", "rb") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 63


def _probe() -> bool:
    """Try the namespaces in a child, as a run would; True if a cgroup namespace works."""
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    go_r, go_w = os.pipe2(os.O_CLOEXEC)
    _clone, maps, namespaces = namespace_operations(os.getuid(), os.getgid(), cgroup=False)
    as_root = maps.pid != "self"
    try:
        pid = syscalls.clone(syscalls.CLONE_NEWUSER)
    except OSError as exc:
        raise diagnose(exc, read_facts()) from None
    if pid == 0:
        os.close(read_end)
        os.close(go_w)
        stage = "map"
        outcome: list[object]
        try:
            if as_root:
                os.read(go_r, 1)
            else:
                maps.execute()
            stage = "namespaces"
            syscalls.unshare(namespaces.flags | syscalls.CLONE_NEWPID)
            syscalls.mount(None, b"/", None, syscalls.MS_REC | syscalls.MS_PRIVATE)
            syscalls.mount(b"tmpfs", b"/tmp", b"tmpfs", 0, None)
            try:
                syscalls.unshare(syscalls.CLONE_NEWCGROUP)
                outcome = ["ok", True]
            except OSError:
                outcome = ["ok", False]
        except OSError as exc:
            outcome = [stage, exc.errno, exc.strerror]
        os.write(write_end, msgpack.packb(outcome))
        os._exit(0)
    os.close(write_end)
    os.close(go_r)
    map_error = None
    if as_root:
        try:
            mapped = type(maps)(maps.uid_map, maps.gid_map, str(pid))
            mapped.execute()
        except OSError as exc:
            map_error = exc
        os.write(go_w, b"g")
    os.close(go_w)
    with os.fdopen(read_end, "rb") as f:
        answer = f.read()
    os.waitpid(pid, 0)
    reply: list[Any] = msgpack.unpackb(answer) if answer else ["map", 0, "probe died"]
    if map_error is not None:
        raise diagnose(map_error, read_facts())
    if reply[0] == "ok":
        return bool(reply[1])
    stage, number, text = reply
    if stage == "namespaces":
        raise SandboxError(f"cannot create the sandbox's namespaces: {text}",
                           hint="the kernel needs mount, pid, network, UTS and IPC "
                                "namespaces inside a user namespace")
    raise diagnose(OSError(number, text), read_facts())


def probe() -> None:
    """Raise :class:`UserNamespacesUnavailable` unless this host can run sandboxes."""
    _probe()
