"""The data area of a FAT image: directories and files in cluster order, one sequential
stream from cluster 2 (each file padded to its last cluster).

The bytes go through buffers of :data:`BATCH` bytes, each written with one call when
full: a file on disk is read straight into one (``readv``), anything else is copied in,
and the padding is zeroed in place. Two buffers are reused in turn, so a tree of 10,000
small files costs no allocation and no page fault per file (a ``bytes`` object per
file, freed a batch at a time, made the allocator hand memory back and fault it in
again: 52,000 page faults for 200 MB). When the output is a file, a full buffer is
hashed (for the derived volume id) and written by a second thread while the next one
fills: blake3 and ``pwrite`` release the GIL, so reading overlaps hashing and writing.
The hash is over the data area's bytes as written, whole buffers at a time (blake3 of
200 MB in per-file pieces of ~20 KB took three times as long as in 1 MiB pieces); the
bytes hashed do not depend on the buffer size or on the thread.
"""

from __future__ import annotations

import io
import os
import queue
import threading
from typing import BinaryIO, NoReturn

import blake3

from reprobuild.errors import ImageError
from reprobuild.images.contents import ContentStreamer
from reprobuild.images.vfat.layout import Layout
from reprobuild.trees.tree import Content, Entry, FileSource

BATCH = 1 << 20  # bytes of the data area written at a time (4 MiB was no faster)
_ZEROS = memoryview(bytes(64 << 10))  # padding: less than a cluster (at most 64 KiB)


def write_data_area(layout: Layout, output: BinaryIO, hasher: blake3.blake3 | None) -> None:
    """Write every directory and file with clusters; hash the data area's bytes too
    when ``hasher`` is given."""
    stream = _ClusterStream(output, layout.geometry.cluster_offset(2),
                            layout.used_clusters * layout.geometry.cluster_size, hasher)
    try:
        _fill(layout, stream)
        stream.flush()
    except BaseException:
        stream.abandon()
        raise
    stream.finish()


def _fill(layout: Layout, stream: _ClusterStream) -> None:
    cluster_size = layout.geometry.cluster_size
    files = iter(layout.files)
    with ContentStreamer() as contents:
        for path, extent in layout.extents.items():
            if not extent.count:
                continue
            raw = layout.directories.get(path)
            if raw is not None:
                stream.put(raw)
                continue
            entry = next(files)
            assert entry.path == path and entry.content is not None
            size = entry.content.size
            try:
                if type(entry.content.source) is FileSource:
                    written = stream.read_file(entry.content.source.path, size)
                else:
                    written = stream.put_content(contents, entry.content)
            except OSError as error:
                if error is stream.write_error:  # a full buffer went out and failed
                    raise
                raise ImageError(f"{entry.display()}: cannot read its content: "
                                 f"{error.strerror}",
                                 hint="check that the source tree is readable") from None
            if written != size:
                _refuse_changed(entry, written)
            stream.zeros(-size % cluster_size)


def _refuse_changed(entry: Entry, written: int) -> NoReturn:
    # A file is read one byte past its size at most: it grew by at least one.
    found = f"more than {entry.size}" if written > entry.size else written
    raise ImageError(f"{entry.display()}: content is {found} bytes, expected {entry.size}",
                     hint="do not modify the source tree during a build")


class _ClusterStream:
    """Bytes written at consecutive offsets of ``output`` from ``offset`` on (``total``
    bytes in all), through reused buffers, each handed to ``hasher`` before it is
    written. After the last :meth:`flush`, :meth:`finish` (or :meth:`abandon` on an
    error) must be called."""

    def __init__(self, output: BinaryIO, offset: int, total: int,
                 hasher: blake3.blake3 | None) -> None:
        self.output = output
        self.offset = offset
        self.hasher = hasher
        self.write_error: OSError | None = None  # a failed write of a full buffer
        try:
            self.fd: int | None = output.fileno()
        except (OSError, AttributeError, io.UnsupportedOperation):
            self.fd = None
        if self.fd is not None:
            output.flush()  # what went through ``output`` lies before our writes
        else:
            output.seek(offset)
        size = max(1, min(BATCH, total))
        self.view = memoryview(bytearray(size))
        self.used = 0
        # With a file: a writer thread, and the buffers not in its hands.
        self.writer: _Writer | None = None
        if self.fd is not None and total > size:
            self.writer = _Writer(self.fd, hasher, [memoryview(bytearray(size))])

    def _room(self) -> int:
        """Free bytes in the current buffer (after writing it out when it is full)."""
        if self.used == len(self.view):
            self.flush()
        return len(self.view) - self.used

    def put(self, data: bytes | memoryview) -> None:
        done = 0
        while done < len(data):
            count = min(self._room(), len(data) - done)
            self.view[self.used:self.used + count] = data[done:done + count]
            self.used += count
            done += count

    def zeros(self, count: int) -> None:
        while count:
            part = min(self._room(), count)
            self.view[self.used:self.used + part] = _ZEROS[:part]
            self.used += part
            count -= part

    def read_file(self, path: bytes, size: int) -> int:
        """Read the file at ``path`` (``size`` bytes planned) into the stream; the bytes
        it had. Reads at most one byte more than planned, so a file that grew shows; a
        short read ends it once the planned size is read, as ContentStreamer.whole does."""
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            got = 0
            while got <= size:
                want = min(self._room(), size + 1 - got)
                count = os.readv(fd, [self.view[self.used:self.used + want]])
                self.used += count
                got += count
                if count == 0 or (count < want and got >= size):
                    break
        finally:
            os.close(fd)
        return got

    def put_content(self, contents: ContentStreamer, content: Content) -> int:
        """Any other content, chunk by chunk; the bytes it had."""
        got = 0
        for chunk in contents.chunks(content):
            got += len(chunk)
            if got > content.size:
                return got
            self.put(chunk)
        return got

    def flush(self) -> None:
        """Hand the buffer over (hashed, then written) and go on with another."""
        if not self.used:
            return
        filled = self.view[:self.used]
        try:
            if self.writer is not None:
                self.view = self.writer.swap(self.view, self.used, self.offset)
            else:
                if self.hasher is not None:
                    self.hasher.update(filled)
                if self.fd is None:
                    self.output.write(filled)
                else:
                    _pwrite_all(self.fd, filled, self.offset)
        except OSError as error:
            # Raised unchanged, also from inside read_file: a write error is not the
            # source's (the caller tells them apart by this).
            self.write_error = error
            raise
        self.offset += self.used
        self.used = 0

    def finish(self) -> None:
        """Wait until everything is written; raises a write's error."""
        if self.writer is not None:
            self.writer.stop()

    def abandon(self) -> None:
        """Stop the writer after a failure, without raising its own error."""
        if self.writer is not None:
            self.writer.error = self.writer.error or OSError("abandoned")
            self.writer.jobs.put(None)
            self.writer.thread.join()


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):  # pwrite may write less than asked
        done += os.pwrite(fd, data[done:], offset + done)


class _Writer:
    """A thread that hashes and writes full buffers in the order given, and hands each
    one back for reuse once it is written."""

    def __init__(self, fd: int, hasher: blake3.blake3 | None,
                 spare: list[memoryview]) -> None:
        self.fd = fd
        self.hasher = hasher
        self.jobs: queue.SimpleQueue[tuple[memoryview, int, int] | None] = (
            queue.SimpleQueue())
        self.free: queue.SimpleQueue[memoryview] = queue.SimpleQueue()
        for view in spare:
            self.free.put(view)
        self.error: OSError | None = None
        self.thread = threading.Thread(target=self._run, name="vfat-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (job := self.jobs.get()) is not None:
            buffer, used, offset = job
            try:
                if self.error is None:
                    if self.hasher is not None:
                        self.hasher.update(buffer[:used])
                    _pwrite_all(self.fd, buffer[:used], offset)
            except OSError as error:
                self.error = error
            finally:
                self.free.put(buffer)

    def swap(self, buffer: memoryview, used: int, offset: int) -> memoryview:
        """Queue the first ``used`` bytes of ``buffer`` (for ``offset``) and return an
        empty buffer; raises the error of an earlier write."""
        self._raise()
        self.jobs.put((buffer, used, offset))
        return self.free.get()

    def stop(self) -> None:
        """Wait until everything queued is written; raises a write's error."""
        self.jobs.put(None)
        self.thread.join()
        self._raise()

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error
