"""Holding a run to its :class:`sandbox.spec.Limits`: rlimits, the watcher, the log, cgroups.

Memory and processes are bounded by a cgroup v2 child of a delegated subtree when the
caller has one (:class:`Cgroups`), else by rlimits set in the sandbox's pid 1 before it
executes the command (``RLIMIT_DATA`` per process, ``RLIMIT_NPROC``, which the kernel
counts per user namespace, so per run) together with the server's :class:`Watch`, which
sums the private resident memory of the run's processes and kills the run above
``memory``. The watcher also measures the allocated blocks of the run's writable mounts
(``disk``): they lie on the store's disk, where no kernel quota is available to an
unprivileged user; ``RLIMIT_FSIZE`` stops any one file at once at that size, and the
watcher catches many files within a scan (what the run writes in that time is the
overshoot). Its scans are spaced so that they cost at most a twentieth of the
server's time. The log goes through a pipe to a :class:`LogKeeper` that keeps its head
and tail.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import os
import resource
import stat
import time
from collections.abc import Iterable

from sandbox.spec import Limits

PAGE = os.sysconf("SC_PAGE_SIZE")
MIN_SCAN_INTERVAL = 0.05  # seconds between two scans of one run, at least
CROWDED_WINDOW = 10  # scans looked back on for a run that keeps hitting its pids limit
CROWDED_SCANS = 3  # of which this many found it near the limit: a runaway
SCAN_SHARE = 20  # a scan taking t seconds waits SCAN_SHARE * t before the next


def apply_rlimits(limits: Limits, *, cgroup: bool) -> None:
    """In the sandbox's pid 1, before exec: the rlimits that bound it and its children."""
    if limits.memory is not None and not cgroup:
        resource.setrlimit(resource.RLIMIT_DATA, (limits.memory, limits.memory))
    if limits.pids is not None and not cgroup:
        resource.setrlimit(resource.RLIMIT_NPROC, (limits.pids, limits.pids))
    if limits.disk is not None:  # one file at once; the watcher bounds them all together
        resource.setrlimit(resource.RLIMIT_FSIZE, (limits.disk, limits.disk))


def describe(limits: Limits, mechanism: str) -> str:
    """The log's first line: which limits apply to this run, and how."""
    def size(n: int | None) -> str:
        return "unbounded" if n is None else human(n)

    pids = "unbounded" if limits.pids is None else str(limits.pids)
    return (f"sandbox limits ({mechanism}): memory {size(limits.memory)}, pids {pids}, "
            f"/tmp {size(limits.tmp)}, /dev/shm {size(limits.shm)}, "
            f"/build and $out {size(limits.disk)} (watched), log {size(limits.log)}\n")


def human(n: int) -> str:
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} bytes"


def tmpfs_size(size: int | None) -> str:
    """A tmpfs ``size=`` option (``size=0`` would mean no bound: at least one page)."""
    return "" if size is None else f",size={max(size, PAGE)}"


class LogKeeper:
    """Writes a run's output to its log, keeping the first and the last ``limit / 2`` bytes."""

    def __init__(self, fd: int, limit: int | None) -> None:
        self.fd = fd
        self.head_left = None if limit is None else limit - limit // 2
        self.tail_size = 0 if limit is None else limit // 2
        self.tail: collections.deque[bytes] = collections.deque()
        self.tail_bytes = 0
        self.dropped = 0
        self.limit = limit

    def feed(self, chunk: bytes) -> None:
        if self.head_left is None:
            self._write(chunk)
            return
        if self.head_left > 0:
            head, chunk = chunk[: self.head_left], chunk[self.head_left:]
            self._write(head)
            self.head_left -= len(head)
        if not chunk:
            return
        self.tail.append(chunk)
        self.tail_bytes += len(chunk)
        while self.tail and self.tail_bytes - len(self.tail[0]) >= self.tail_size:
            self.dropped += len(self.tail[0])
            self.tail_bytes -= len(self.tail.popleft())

    def finish(self) -> int:
        """Write the marker and the tail; close the log; the number of bytes dropped."""
        tail = b"".join(self.tail)
        cut = max(0, len(tail) - self.tail_size)
        self.dropped += cut
        if self.dropped:
            assert self.limit is not None
            self._write(f"\n[sandbox: {self.dropped} bytes of output dropped here: the log "
                        f"keeps the first and the last {human(self.limit // 2)} "
                        f"(limit log = {human(self.limit)})]\n".encode())
        self._write(tail[cut:])
        os.close(self.fd)
        return self.dropped

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self.fd, view):]
            except OSError:
                return  # the log's disk is full or gone: the run goes on without it


class Watch:
    """Measures one run every so often; names the limit it passed, if any."""

    def __init__(self, limits: Limits, writable: Iterable[str], *, rlimits: bool) -> None:
        self.limits = limits
        self.writable = tuple(writable)
        self.rlimits = rlimits
        self.next_scan = time.monotonic() + MIN_SCAN_INTERVAL
        self.crowded: collections.deque[bool] = collections.deque(maxlen=CROWDED_WINDOW)

    @property
    def needed(self) -> bool:
        return self.limits.disk is not None or (self.rlimits and (
            self.limits.memory is not None or self.limits.pids is not None))

    def check(self, pid1: int) -> str | None:
        started = time.monotonic()
        try:
            return self._check(pid1)
        finally:
            now = time.monotonic()
            self.next_scan = now + max(MIN_SCAN_INTERVAL, SCAN_SHARE * (now - started))

    def _check(self, pid1: int) -> str | None:
        limits = self.limits
        pids: list[int] = []
        tasks, private = process_usage(pid1, pids)
        hidden_disk, hidden_memory = unlinked_usage(pids)
        if self.rlimits:  # else the run's cgroup bounds memory and processes
            # RLIMIT_NPROC refuses forks at the limit; what keeps forking hovers just
            # below it (failed forks exit, and a loaded machine lets it sag between
            # scans): near it in several of the last scans means a runaway.
            near = limits.pids is not None and tasks >= limits.pids - max(2, limits.pids // 16)
            self.crowded.append(near)
            if sum(self.crowded) >= CROWDED_SCANS:
                return "pids"
            if limits.memory is not None and private + hidden_memory > limits.memory:
                return "memory"
        if limits.disk is not None and \
                disk_usage(self.writable) + hidden_disk > limits.disk:
            return "disk"
        return None


def process_usage(pid1: int, found: list[int] | None = None) -> tuple[int, int]:
    """(tasks, private resident bytes) of ``pid1`` and every process below it (their
    pids appended to ``found``).

    Orphans in a pid namespace are re-parented to its pid 1, so the tree from it holds
    every process of the run. Private memory is resident minus shared pages, summed.
    """
    tasks = 0
    private = 0
    todo = [pid1]
    seen: set[int] = set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        try:
            tids = os.listdir(f"/proc/{pid}/task")  # nondet-ok: only counted
            with open(f"/proc/{pid}/statm", "rb") as f:
                fields = f.read().split()
            private += max(0, int(fields[1]) - int(fields[2])) * PAGE
        except (OSError, ValueError, IndexError):
            continue  # it exited
        tasks += len(tids)
        if found is not None:
            found.append(pid)
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                    todo.extend(int(c) for c in f.read().split())
            except (OSError, ValueError):
                continue
    return tasks, private


def unlinked_usage(pids: Iterable[int]) -> tuple[int, int]:
    """(disk, memory) bytes of deleted files the processes still hold open.

    A scan of the writable mounts cannot see them. A memfd is memory no rlimit bounds;
    a deleted file of the tmpfs /tmp or /dev/shm still counts against its size; any
    other (on /build or $out, the store's disk) is disk. Named as the sandbox names
    them, as its processes' descriptors show.
    """
    disk = memory = 0
    seen: set[tuple[int, int]] = set()
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")  # nondet-ok: only summed
        except OSError:
            continue
        for fd in fds:
            link = f"/proc/{pid}/fd/{fd}"
            try:
                st = os.stat(link)
                name = os.readlink(link)
            except OSError:
                continue
            if st.st_nlink or not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            if name.startswith("/memfd:"):
                memory += st.st_blocks * 512
            elif not name.startswith(("/tmp/", "/dev/shm/")):
                disk += st.st_blocks * 512
    return disk, memory


def disk_usage(roots: Iterable[str]) -> int:
    """Allocated bytes of the files under ``roots`` (each inode once; sparse holes free).

    A directory the run made unreadable is opened up again (the server owns it, or is
    root), so that mode 000 does not hide what lies below it.
    """
    total = 0
    seen: set[tuple[int, int]] = set()
    todo = list(roots)
    while todo:
        path = todo.pop()
        try:
            entries = _scan(path)
        except OSError:
            continue
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            total += st.st_blocks * 512
            if stat.S_ISDIR(st.st_mode):
                todo.append(entry.path)
    return total


def _scan(path: str) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(path) as it:
            return list(it)
    except PermissionError:
        os.chmod(path, 0o700, follow_symlinks=False)
        with os.scandir(path) as it:
            return list(it)


class Cgroups:
    """A delegated cgroup v2 subtree the server puts each run in (its own child cgroup).

    Found by :meth:`find`: the caller's cgroup (``0::PATH`` of /proc/self/cgroup under
    /sys/fs/cgroup) must be writable by this user, offer the memory and pids controllers
    and hold no process but the caller and this server, which move into a leaf
    ``reprobuild-leaf`` so that the cgroup may hand the controllers to its children.
    """

    def __init__(self, base: str) -> None:
        self.base = base
        self.runs = 0

    @classmethod
    def find(cls, *, caller: int, root: str = "/sys/fs/cgroup",
             own: str = "/proc/self/cgroup") -> tuple[Cgroups | None, str]:
        """The subtree, or None and why there is none (for the log)."""
        try:
            with open(own, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except OSError:
            return None, "no /proc/self/cgroup"
        path = next((line[3:] for line in lines if line.startswith("0::")), None)
        if path is None or not os.path.exists(os.path.join(root, "cgroup.controllers")):
            return None, "no cgroup v2 hierarchy at " + root
        base = os.path.normpath(root + "/" + path)
        if not all(os.access(os.path.join(base, name), os.W_OK)
                   for name in ("", "cgroup.procs", "cgroup.subtree_control")):
            return None, f"cgroup {path} is not delegated to this user"
        try:
            with open(os.path.join(base, "cgroup.controllers"), encoding="utf-8") as f:
                available = f.read().split()
        except OSError:
            return None, f"cannot read {path}/cgroup.controllers"
        if not {"memory", "pids"} <= set(available):
            return None, f"cgroup {path} lacks the memory or pids controller"
        try:
            cls._leave_room(base, caller)
        except OSError as exc:
            return None, f"cannot use cgroup {path}: {exc.strerror or exc}"
        except ValueError as exc:
            return None, str(exc)
        return cls(base), f"cgroup v2 {path}"

    @staticmethod
    def _leave_room(base: str, caller: int) -> None:
        with open(os.path.join(base, "cgroup.subtree_control"), encoding="utf-8") as f:
            if {"memory", "pids"} <= set(f.read().split()):
                return
        with open(os.path.join(base, "cgroup.procs"), encoding="utf-8") as f:
            members = {int(p) for p in f.read().split()}
        if not members <= {caller, os.getpid()}:
            raise ValueError("the caller's cgroup holds other processes: run reprobuild in "
                             "its own delegated cgroup (systemd-run --user --scope -p "
                             "Delegate=yes) for cgroup limits")
        leaf = os.path.join(base, "reprobuild-leaf")
        with contextlib.suppress(FileExistsError):
            os.mkdir(leaf)
        for pid in sorted(members):
            _write(os.path.join(leaf, "cgroup.procs"), str(pid))
        _write(os.path.join(base, "cgroup.subtree_control"), "+memory +pids")

    def enter(self, pid: int, limits: Limits) -> str:
        """Make a cgroup for one run with its limits and move ``pid`` (its pid 1) in."""
        self.runs += 1
        path = os.path.join(self.base, f"reprobuild-{os.getpid()}-{self.runs}")
        os.mkdir(path)
        if limits.memory is not None:
            _write(os.path.join(path, "memory.max"), str(limits.memory))
            with contextlib.suppress(FileNotFoundError):  # no swap accounting
                _write(os.path.join(path, "memory.swap.max"), "0")
            _write(os.path.join(path, "memory.oom.group"), "1")
        if limits.pids is not None:
            _write(os.path.join(path, "pids.max"), str(limits.pids))
        _write(os.path.join(path, "cgroup.procs"), str(pid))
        return path

    @staticmethod
    def passed(path: str) -> str | None:
        """"memory" after an OOM kill in the run's cgroup, "pids" after a refused fork."""
        if _event(path, "memory.events", "oom_kill") or _event(path, "memory.events",
                                                                  "oom_group_kill"):
            return "memory"
        if _event(path, "pids.events", "max"):
            return "pids"
        return None

    @staticmethod
    def remove(path: str) -> None:
        for _ in range(50):  # the last processes may still be leaving it
            try:
                os.rmdir(path)
                return
            except OSError as exc:
                if exc.errno != errno.EBUSY:
                    return
                time.sleep(0.01)


def _event(path: str, name: str, key: str) -> int:
    try:
        with open(os.path.join(path, name), encoding="utf-8") as f:
            for line in f:
                word, _, value = line.partition(" ")
                if word == key:
                    return int(value)
    except (OSError, ValueError):
        pass
    return 0


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)
