"""Locks of a store: per-entry build locks, the gc session lock, temporary roots and
locked build directories.

Every lock is an ``flock`` held by an open file: it goes away with the process that
holds it, whatever kills it, so "does a live process hold this?" is answered by trying
the lock, never by guessing from pids.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
import threading
from collections.abc import Iterable, Iterator

from reprobuild.store import canon
from reprobuild.store.layout import Layout

# Prefixes of build directories under tmp/ that a later run may clean (see clean_tmp).
CLEANABLE_PREFIXES = ("build.", "shell.")
# The sandbox's overlay work directory of build directory NAME is tmp/.sandbox-work-NAME
# (sandbox.plan.work_directory); it goes with its build directory.
COMPANION_PREFIX = ".sandbox-work-"


@contextlib.contextmanager
def entry_lock(layout: Layout, derivation_id: str) -> Iterator[None]:
    """Hold the build lock of ``derivation_id`` (blocks while another process has it).

    The lock is taken on the entry's log file, which a build makes anyway: one file
    fewer to create per step (file creation is most of a trivial step's cost on a busy
    ext4 without a journal). Opening it neither truncates nor writes it.
    """
    fd = os.open(layout.log_path(derivation_id), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def session(layout: Layout, *, exclusive: bool = False) -> Iterator[None]:
    """Builders hold this shared; gc holds it exclusively so it never races a build."""
    fd = os.open(os.path.join(layout.root, "gc.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)


def _held_elsewhere(path: str) -> bool:
    """Whether another open file holds an flock on ``path`` (False when it is gone)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


class TempRoots:
    """This process's temporary gc roots (Nix's temp roots): a file of ids in
    ``temproots/``, locked for as long as the process lives.

    Add ids only while holding the store session (shared): gc, which holds it
    exclusively, then sees every id added, and never meets a file not yet locked.
    """

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self._fd: int | None = None
        self._path = ""
        self._ids: set[str] = set()
        self._lock = threading.Lock()

    def add(self, derivation_ids: Iterable[str]) -> None:
        with self._lock:
            new = sorted(set(derivation_ids) - self._ids)
            if not new:
                return
            if self._fd is None:
                fd, self._path = tempfile.mkstemp(dir=self.layout.subdir("temproots"),
                                             prefix=f"{os.getpid()}.")
                os.set_inheritable(fd, False)
                fcntl.flock(fd, fcntl.LOCK_EX)
                self._fd = fd
            os.write(self._fd, "".join(f"{did}\n" for did in new).encode())
            self._ids.update(new)

    def release(self) -> None:
        """Drop the roots (the result links exist now, or the build is over)."""
        with self._lock:
            if self._fd is None:
                return
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path)
            os.close(self._fd)
            self._fd = None
            self._ids.clear()


def live_temp_roots(layout: Layout) -> set[str]:
    """The ids in every temporary root file a live process holds; removes the others.
    Call with the session held exclusively."""
    ids: set[str] = set()
    directory = layout.subdir("temproots")
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if not _held_elsewhere(path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            continue
        with contextlib.suppress(OSError), open(path, encoding="ascii",
                                                errors="replace") as f:
            ids.update(line.strip() for line in f if line.strip())
    return ids


class BuildDir:
    """A private directory under ``tmp/`` on the store's filesystem, locked while this
    process uses it so that :func:`clean_tmp` in another process leaves it alone.

    It is made under a name no cleaner touches, locked, then renamed to its final
    ``LABEL.*`` name: a cleaner never sees it unlocked.
    """

    def __init__(self, layout: Layout, label: str) -> None:
        tmp = layout.subdir("tmp")
        fresh = tempfile.mkdtemp(prefix=".new-", dir=tmp)
        self._fd = os.open(fresh, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        self.path = os.path.join(tmp, label + "." + os.path.basename(fresh)[len(".new-"):])
        os.rename(fresh, self.path)

    def close(self, *, remove: bool = True) -> None:
        if remove:
            canon.remove_tree(self.path)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def clean_tmp(layout: Layout) -> list[str]:
    """Remove build directories under ``tmp/`` that no live process holds; return them.
    Directories kept on purpose (``failed-*``) stay."""
    removed = []
    tmp = layout.subdir("tmp")
    names = sorted(os.listdir(tmp))
    for name in names:
        if not name.startswith(CLEANABLE_PREFIXES):
            continue
        path = os.path.join(tmp, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live process is using it
            canon.remove_tree(path)
            removed.append(path)
        finally:
            os.close(fd)
    for name in names:
        owner = name[len(COMPANION_PREFIX):]
        if (name.startswith(COMPANION_PREFIX) and owner.startswith(CLEANABLE_PREFIXES)
                and not os.path.lexists(os.path.join(tmp, owner))):
            canon.remove_tree(os.path.join(tmp, name))
            removed.append(os.path.join(tmp, name))
    return removed
