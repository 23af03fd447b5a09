"""Namespace and mount operations as small values with ``execute()`` and ``describe()``.

``describe()`` is a shell command a person can read and re-run (inside ``unshare``) to
repeat the step by hand; ``--debug`` prints each one before it is executed.
"""

from __future__ import annotations

import errno
import os
import shlex
import socket
from dataclasses import dataclass

from sandbox import syscalls
from sandbox.syscalls import (
    MNT_DETACH,
    MS_BIND,
    MS_NODEV,
    MS_NOEXEC,
    MS_NOSUID,
    MS_PRIVATE,
    MS_RDONLY,
    MS_REC,
    MS_REMOUNT,
)

_FLAG_NAMES = ((MS_RDONLY, "ro"), (MS_NOSUID, "nosuid"), (MS_NODEV, "nodev"),
               (MS_NOEXEC, "noexec"))


def _q(text: str) -> str:
    return shlex.quote(text)


def _options(flags: int, data: str | None = None) -> str:
    words = [name for bit, name in _FLAG_NAMES if flags & bit]
    if data:
        words.append(data)
    return ",".join(words)


class Operation:
    """One step of setting a sandbox up."""

    def execute(self) -> None:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError


_NAMESPACE_OPTIONS = ((syscalls.CLONE_NEWUSER, "--user"), (syscalls.CLONE_NEWNS, "--mount"),
                      (syscalls.CLONE_NEWPID, "--pid"), (syscalls.CLONE_NEWNET, "--net"),
                      (syscalls.CLONE_NEWUTS, "--uts"), (syscalls.CLONE_NEWIPC, "--ipc"),
                      (syscalls.CLONE_NEWCGROUP, "--cgroup"))


@dataclass(frozen=True)
class CloneNamespaces(Operation):
    """Fork a child into fresh namespaces: it is pid 1 of the new pid namespace.

    One clone(2) instead of fork + unshare + fork: the fork server does this, and the
    child goes on with everything else.
    """

    flags: int

    def clone(self) -> int:
        """Like os.fork: the child's pid in the parent, 0 in the child."""
        return syscalls.clone(self.flags)

    def execute(self) -> None:
        raise TypeError("CloneNamespaces returns twice; call clone()")

    def describe(self) -> str:
        names = [name for bit, name in _NAMESPACE_OPTIONS if self.flags & bit]
        return "unshare " + " ".join(names) + " --fork sh  # what follows runs as its pid 1"


@dataclass(frozen=True)
class Unshare(Operation):
    """Move this process into fresh namespaces (those that need no fork)."""

    flags: int

    def execute(self) -> None:
        syscalls.unshare(self.flags)

    def describe(self) -> str:
        return "unshare " + " ".join(n for bit, n in _NAMESPACE_OPTIONS if self.flags & bit)


@dataclass(frozen=True)
class MapIds(Operation):
    """Deny setgroups and map one uid and one gid of a new user namespace.

    A process may map its own uid in the namespace it made (``pid`` "self"). A root
    caller maps an unprivileged uid instead, which needs CAP_SETUID in the parent
    namespace, so the fork server writes those maps from outside (``pid`` the child's).
    """

    uid_map: str  # "inside outside 1"
    gid_map: str
    pid: str = "self"

    def _files(self) -> tuple[tuple[str, str], ...]:
        return (("setgroups", "deny"), ("uid_map", self.uid_map), ("gid_map", self.gid_map))

    def execute(self) -> None:
        for name, content in self._files():
            fd = os.open(f"/proc/{self.pid}/{name}", os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.write(fd, content.encode())
            finally:
                os.close(fd)

    def describe(self) -> str:
        where = "self" if self.pid == "self" else "$SANDBOX_PID"
        writes = "; ".join(f"echo {_q(text)} > /proc/{where}/{name}"
                           for name, text in self._files())
        return writes + ("" if self.pid == "self" else "  # from outside, as root")


@dataclass(frozen=True)
class SetHostname(Operation):
    hostname: str
    domainname: str

    def execute(self) -> None:
        socket.sethostname(self.hostname)
        syscalls.setdomainname(self.domainname.encode())

    def describe(self) -> str:
        return f"hostname {_q(self.hostname)}; domainname {_q(self.domainname)}"


@dataclass(frozen=True)
class LoopbackUp(Operation):
    def execute(self) -> None:
        syscalls.loopback_up()

    def describe(self) -> str:
        return "ip link set lo up"


@dataclass(frozen=True)
class MakePrivate(Operation):
    """Stop mount events propagating back to the host."""

    def execute(self) -> None:
        syscalls.mount(None, b"/", None, MS_REC | MS_PRIVATE)

    def describe(self) -> str:
        return "mount --make-rprivate /"


@dataclass(frozen=True)
class MountFilesystem(Operation):
    """A fresh kernel filesystem: tmpfs, proc, devpts."""

    fstype: str
    target: str
    flags: int = MS_NOSUID | MS_NODEV
    data: str | None = None

    def execute(self) -> None:
        syscalls.mount(self.fstype.encode(), os.fsencode(self.target), self.fstype.encode(),
                       self.flags, self.data.encode() if self.data else None)

    def describe(self) -> str:
        opts = _options(self.flags, self.data)
        return f"mount -t {self.fstype} -o {opts} {self.fstype} {_q(self.target)}"


@dataclass(frozen=True)
class BindMount(Operation):
    source: str
    target: str

    def execute(self) -> None:
        syscalls.mount(os.fsencode(self.source), os.fsencode(self.target), None, MS_BIND)

    def describe(self) -> str:
        return f"mount --bind {_q(self.source)} {_q(self.target)}"


@dataclass(frozen=True)
class RemountBind(Operation):
    """Change a mount's flags, keeping those the kernel locked (e.g. the host's noexec)."""

    target: str
    flags: int

    def execute(self) -> None:
        target = os.fsencode(self.target)
        kept = syscalls.kept_mount_flags(target)
        syscalls.mount(None, target, None, MS_REMOUNT | MS_BIND | kept | self.flags)

    def describe(self) -> str:
        return f"mount -o remount,bind,{_options(self.flags)} {_q(self.target)}"


@dataclass(frozen=True)
class OverlayMount(Operation):
    """Mount ``lower`` read-only at ``target`` through a one-layer overlay.

    A plain bind mount would show the source's path in /proc/self/mountinfo; the overlay
    is a new filesystem whose root is the source, and its options name only ``.`` (the
    source, made the working directory while mounting) and ``empty`` (an empty directory
    of the sandbox's own), so no host path is visible inside.
    """

    lower: str
    target: str
    empty: str

    def execute(self) -> None:
        os.chdir(self.lower)
        try:
            syscalls.mount(b"overlay", os.fsencode(self.target), b"overlay",
                           MS_RDONLY | MS_NOSUID | MS_NODEV,
                           b"lowerdir=.:" + os.fsencode(self.empty))
        except OSError as exc:
            # Some file systems cannot be an overlay's lower layer (or a kernel has no
            # overlayfs in user namespaces): a read-only bind mount still isolates, it
            # only shows the source's path in mountinfo.
            if exc.errno not in (errno.EINVAL, errno.ENODEV, errno.EOPNOTSUPP, errno.EPERM):
                raise
            BindMount(".", self.target).execute()
            RemountBind(self.target, MS_RDONLY | MS_NOSUID | MS_NODEV).execute()
        finally:
            os.chdir("/")

    def describe(self) -> str:
        opts = _options(MS_RDONLY | MS_NOSUID | MS_NODEV, f"lowerdir=.:{self.empty}")
        target = _q(self.target)
        return (f"(cd {_q(self.lower)} && mount -t overlay -o {opts} overlay {target}"
                f" || {{ mount --bind . {target} && "
                f"mount -o remount,bind,ro,nosuid,nodev {target}; }})")


@dataclass(frozen=True)
class WritableOverlay(Operation):
    """Mount a writable host directory at ``target`` as the upper layer of an overlay.

    Writes land in the directory itself, as through a bind mount, but mountinfo names
    only ``.`` and the work directory, not the host path. Where overlayfs refuses (no
    xattrs on that file system, an old kernel), a bind mount with nosuid,nodev instead.
    """

    upper: str
    target: str
    work: str  # relative to ``upper``, or absolute
    empty: str

    def _data(self, *, uuid_off: bool = True) -> str:
        # volatile: no syncfs of the whole upper file system when the sandbox ends (the
        # store fsyncs what it keeps); uuid=off: no xattr written into every new upper
        # directory (2 ms a mount). The work directory is new for every run.
        options = f"lowerdir={self.empty},upperdir=.,workdir={self.work},userxattr,volatile"
        return options + (",uuid=off" if uuid_off else "")

    def execute(self) -> None:
        os.chdir(self.upper)
        try:
            for uuid_off in (True, False):  # kernels before 5.15 know no uuid=
                try:
                    syscalls.mount(b"overlay", os.fsencode(self.target), b"overlay",
                                   MS_NOSUID | MS_NODEV,
                                   os.fsencode(self._data(uuid_off=uuid_off)))
                    return
                except OSError as exc:
                    if not (uuid_off and exc.errno == errno.EINVAL):
                        raise
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.ENODEV, errno.EOPNOTSUPP, errno.EPERM,
                                 errno.EACCES, errno.ENOENT):
                raise
            BindMount(".", self.target).execute()
            RemountBind(self.target, MS_NOSUID | MS_NODEV).execute()
        finally:
            os.chdir("/")

    def describe(self) -> str:
        target = _q(self.target)
        return (f"(cd {_q(self.upper)} && mount -t overlay -o nosuid,nodev,{self._data()} "
                f"overlay {target} || {{ mount --bind . {target} && "
                f"mount -o remount,bind,nosuid,nodev {target}; }})")


@dataclass(frozen=True)
class MakeDirectory(Operation):
    path: str
    mode: int = 0o755

    def execute(self) -> None:
        os.mkdir(self.path, self.mode)  # the sandbox builds its root with umask 0

    def describe(self) -> str:
        return f"mkdir -m {self.mode:04o} {_q(self.path)}"


@dataclass(frozen=True)
class WriteFile(Operation):
    path: str
    content: bytes
    mode: int = 0o644

    def execute(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, self.mode)
        try:
            if self.content:
                os.write(fd, self.content)
        finally:
            os.close(fd)

    def describe(self) -> str:
        text = self.content.decode(errors="replace")
        path = _q(self.path)
        return f"(umask 0; printf %s {_q(text)} > {path}; chmod {self.mode:04o} {path})"


@dataclass(frozen=True)
class Symlink(Operation):
    target: str
    path: str

    def execute(self) -> None:
        os.symlink(self.target, self.path)  # noqa: PTH211 (str paths throughout)

    def describe(self) -> str:
        return f"ln -s {_q(self.target)} {_q(self.path)}"


@dataclass(frozen=True)
class Stamp(Operation):
    """Set the times of what the sandbox made to the epoch, so `ls -l /` is reproducible."""

    paths: tuple[str, ...]
    epoch: int

    def execute(self) -> None:
        times = (self.epoch, self.epoch)
        for path in self.paths:
            os.utime(path, times, follow_symlinks=False)

    def describe(self) -> str:
        return f"touch -h -d @{self.epoch} " + " ".join(_q(p) for p in self.paths)


@dataclass(frozen=True)
class PivotRoot(Operation):
    """Make ``new_root`` the root; the old root stays reachable at ``put_old`` (if given)."""

    new_root: str
    put_old: str = "."

    def execute(self) -> None:
        os.chdir(self.new_root)
        syscalls.pivot_root(b".", os.fsencode(self.put_old))
        os.chdir("/")

    def describe(self) -> str:
        return f"cd {_q(self.new_root)} && pivot_root . {_q(self.put_old)} && cd /"


@dataclass(frozen=True)
class Unmount(Operation):
    """Detach a mount (and everything under it) lazily."""

    target: str

    def execute(self) -> None:
        syscalls.umount2(os.fsencode(self.target), MNT_DETACH)

    def describe(self) -> str:
        return f"umount -l {_q(self.target)}"

