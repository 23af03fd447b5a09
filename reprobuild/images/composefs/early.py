"""Content digests started while the tree loads: the files a directory walk finds are
hashed by a child process as they are found, and this process, once the tree is loaded
and the plan's digest-free part made, hashes from the other end until the two meet.

On a root filesystem the fs-verity digests of the files over 64 bytes are most of a
composefs image's work, and the walk that finds them most of the rest: hashing only
after the walk leaves one core idle for the whole walk. The loader calls
:meth:`EarlyDigests.found` for each regular file it meets; once enough files are known
to be worth a process (:data:`~reprobuild.images.composefs.shares.PARALLEL_MIN_FILES`),
a child is forked. It takes the files found so far from its copy of this process and
those found later from a pipe, and hashes them in the order found, from the first.
This process, when the writer asks for the digests (:meth:`EarlyDigests.hashing`),
hashes from the last file down. Each side marks in a shared page how far it has gone and
stops where the other has been; when both pass the same file at the same moment it is
hashed twice, never skipped: a side stops only at a file the other has taken on.

Which process hashes which file depends on timing, the digests do not: each is its
file's own, and whatever the child did not send back (it stopped, failed or was never
forked) is hashed here, so an error is raised here, naming the tree's path. Only one
child: on two cores this process's own share is the other half.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import signal
import struct
import threading
from collections.abc import Callable, Iterator, Sequence

from reprobuild.images.composefs import digests, ondisk
from reprobuild.images.composefs.digests import DIGEST_SIZE, WHOLE_MAX, FileHasher
from reprobuild.images.composefs.shares import PARALLEL_MIN_FILES
from reprobuild.integrity.fsverity import digest_file
from reprobuild.trees.tree import Entry, FileSource

_RECORD = struct.Struct("<QH")
"""A file found after the fork, sent to the child: its size, its path's length, the path."""
_BATCH = 64
"""Records sent in one write."""
_DRAIN_EVERY = 256
"""The child looks for new records after this many files even with files still to do,
so that the pipe never fills and stops the walk."""
_PIPE_SIZE = 1 << 20
_FAR = 1 << 62
_ENDING = (signal.SIGINT, signal.SIGTERM)
Results = Callable[[], dict[bytes, bytes]]


class EarlyDigests:
    """The files a loader found, hashed from the first by a child, from the last here."""

    def __init__(self, *, processes: int | None = None) -> None:
        self.paths: list[bytes] = []
        self.sizes: list[int] = []
        wanted = processes if processes is not None else os.cpu_count() or 1
        self._may_fork = wanted > 1
        self._pending: list[bytes] = []
        self._child: tuple[int, int, int] | None = None  # pid, record pipe, result pipe
        # [0]: how many files the child has taken on; [1]: the first file taken on here.
        self._marks: memoryview | None = None

    def found(self, path: bytes, size: int) -> None:
        """A regular file of ``size`` bytes at ``path`` on disk, as the loader finds it."""
        if size <= ondisk.INLINE_CONTENT_MAX:
            return
        self.paths.append(path)
        self.sizes.append(size)
        if self._child is not None:
            if self._child[1] >= 0:  # the child still takes records
                pending = self._pending
                pending.append(_RECORD.pack(size, len(path)))
                pending.append(path)
                if len(pending) >= 2 * _BATCH:
                    self._send()
        elif len(self.paths) == PARALLEL_MIN_FILES and self._may_fork:
            self._may_fork = False
            self._fork()

    @property
    def forked(self) -> bool:
        """Whether a child is hashing the files found."""
        return self._child is not None

    @contextlib.contextmanager
    def hashing(self, entries: Sequence[Entry], *,
                head_start: int = 0) -> Iterator[Results]:
        """As :func:`reprobuild.images.composefs.digests.hashing` (whose shares it uses
        when no child was forked): yields a function returning path -> digest of every
        entry of ``entries``; the child goes on hashing until it is called."""
        if self._child is None:
            with digests.hashing(entries, head_start=head_start) as results:
                yield results
            return
        self._end_records()
        yield lambda: self._results(entries)

    def close(self) -> None:
        """End a child still running (an error or an interruption before the results)."""
        if self._child is not None:
            pid, records, results = self._child
            self._child = None
            for fd in (records, results):
                if fd >= 0:
                    os.close(fd)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            os.waitpid(pid, 0)

    def _send(self) -> None:
        """Send the pending records; a child gone (it failed) takes no more: the files
        it did not hash are hashed here."""
        assert self._child is not None
        if not _write_all(self._child[1], b"".join(self._pending)):
            self._end_records(send=False)
        self._pending.clear()

    def _end_records(self, *, send: bool = True) -> None:
        assert self._child is not None
        pid, records, results = self._child
        if records >= 0:
            if send:
                _write_all(records, b"".join(self._pending))
                self._pending.clear()
            os.close(records)
            self._child = (pid, -1, results)

    def _fork(self) -> None:
        """Fork the child (not when another thread runs: a fork copies no thread, and a
        lock one holds would stay held; not when no process or pipe can be made)."""
        if threading.active_count() > 1:
            return
        try:
            marks = memoryview(mmap.mmap(-1, mmap.PAGESIZE)).cast("q")  # MAP_SHARED
            records = os.pipe()
        except OSError:
            return
        try:
            results = os.pipe()
        except OSError:
            os.close(records[0])
            os.close(records[1])
            return
        marks[0], marks[1] = 0, _FAR
        with contextlib.suppress(OSError):  # a bigger pipe: the walk seldom waits
            fcntl.fcntl(records[1], fcntl.F_SETPIPE_SZ, _PIPE_SIZE)
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, _ENDING)  # see shares._forked
        try:
            pid = os.fork()
        except OSError:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            for fd in (*records, *results):
                os.close(fd)
            return
        if pid == 0:  # the child: hash, send what was done, leave without any cleanup
            try:
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
                os.close(records[1])
                os.close(results[0])
                _child_work(self.paths, self.sizes, records[0], results[1], marks)
            finally:
                os._exit(0)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        os.close(records[0])
        os.close(results[1])
        self._child = (pid, records[1], results[0])
        self._marks = marks

    def _results(self, entries: Sequence[Entry]) -> dict[bytes, bytes]:
        """Hash from the last file found down to where the child has been, then take
        the child's digests and hash here whatever it did not send."""
        assert self._child is not None and self._marks is not None
        slots, others = self._slots(entries)
        hasher = FileHasher()
        found = {entry.path: digests.digest_entry(entry, hasher) for entry in others}
        marks = self._marks
        at = len(slots) - 1
        while at >= 0 and marks[0] <= at:
            marks[1] = at
            slot = slots[at]
            if slot is not None:
                found[slot.path] = digests.digest_entry(slot, hasher)
            at -= 1
        taken_here = at + 1
        from_child = self._collect()
        done = min(len(from_child) // DIGEST_SIZE, taken_here)
        for at, slot in enumerate(slots[:taken_here]):
            if slot is not None:
                found[slot.path] = (from_child[at * DIGEST_SIZE:(at + 1) * DIGEST_SIZE]
                                    if at < done else digests.digest_entry(slot, hasher))
        return {entry.path: found[entry.path] for entry in entries}

    def _slots(self, entries: Sequence[Entry]) -> tuple[list[Entry | None], list[Entry]]:
        """The entry of each file found (None: not in the tree), and the entries not
        found by the loader (an override) or found twice."""
        paths, sizes = self.paths, self.sizes
        if len(entries) == len(paths):  # the usual: every file as the walk found it
            found = [getattr(entry.content.source, "path", None) if entry.content else None
                     for entry in entries]
            if found == paths and [entry.size for entry in entries] == sizes:
                return list(entries), []
        index = {path: i for i, path in enumerate(paths)}
        slots: list[Entry | None] = [None] * len(paths)
        others: list[Entry] = []
        for entry in entries:
            content = entry.content
            assert content is not None
            source = content.source
            at = index.get(source.path) if isinstance(source, FileSource) else None
            if at is None or sizes[at] != content.size or slots[at] is not None:
                others.append(entry)
            else:
                slots[at] = entry
        return slots, others

    def _collect(self) -> bytes:
        """The child's digests, in the order found (as many as it did), once it ended."""
        assert self._child is not None
        pid, _, results = self._child
        self._child = None
        try:
            with open(results, "rb") as pipe:
                data = pipe.read()
        finally:
            _, status = os.waitpid(pid, 0)
        return data if status == 0 else b""


def _child_work(paths: list[bytes], sizes: list[int], records: int, results: int,
                marks: memoryview) -> None:
    """The child's part: hash the files in the order found until this process has
    taken on the next one or none is left; send the digests done (those before a file
    that failed: this process hashes the rest, and names what failed)."""
    done: list[bytes] = []
    try:
        with contextlib.suppress(Exception):
            _hash_in_order(paths, sizes, records, marks, done)
    finally:
        with open(results, "wb") as out:
            out.write(b"".join(done))


def _hash_in_order(paths: list[bytes], sizes: list[int], records: int, marks: memoryview,
                   done: list[bytes]) -> None:
    digest = FileHasher().digest
    left = b""  # a record cut by the end of a read
    ended = False
    at = 0
    while True:
        if at == len(paths) or (not ended and at % _DRAIN_EVERY == 0):
            if ended:
                return
            # Wait for records only when none is left to hash.
            os.set_blocking(records, at == len(paths))
            try:
                chunk = os.read(records, _PIPE_SIZE)
            except BlockingIOError:
                chunk = None
            if chunk == b"":
                ended = True
            elif chunk:
                left = _parse(left + chunk, paths, sizes)
            if at == len(paths):
                continue
        if marks[1] <= at:
            return
        marks[0] = at + 1
        size = sizes[at]
        done.append(digest(paths[at], size) if size <= WHOLE_MAX
                    else digest_file(paths[at], threads=1))
        at += 1


def _write_all(fd: int, data: bytes) -> bool:
    """Write ``data`` whole to the pipe ``fd``; False when its reader is gone."""
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view):]
    except OSError:
        return False
    return True


def _parse(data: bytes, paths: list[bytes], sizes: list[int]) -> bytes:
    """Append the whole records of ``data`` to ``paths`` and ``sizes``; the rest back."""
    offset, end, unpack, head = 0, len(data), _RECORD.unpack_from, _RECORD.size
    while offset + head <= end:
        size, length = unpack(data, offset)
        if offset + head + length > end:
            break
        paths.append(data[offset + head:offset + head + length])
        sizes.append(size)
        offset += head + length
    return data[offset:]


@contextlib.contextmanager
def while_loading(*, processes: int | None = None) -> Iterator[EarlyDigests]:
    """An :class:`EarlyDigests` for a loader to tell the files it finds; a child still
    running when the block ends is ended."""
    early = EarlyDigests(processes=processes)
    try:
        yield early
    finally:
        early.close()
