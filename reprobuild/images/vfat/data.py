"""The data area of a FAT image: directories and files in cluster order, one sequential
stream from cluster 2 (each file padded to its last cluster).

The bytes go through one buffer of :data:`BATCH` bytes that is written with one call
when full: a file on disk is read straight into it (``readv``) and hashed there,
anything else is copied in, and the padding is zeroed in place. The buffer is reused,
so a tree of 10,000 small files costs no allocation and no page fault per file (a
``bytes`` object per file, freed a batch at a time, made the allocator hand memory back
and fault it in again: 52,000 page faults for 200 MB).
"""

from __future__ import annotations

import io
import os
from typing import BinaryIO, NoReturn

import blake3

from reprobuild.errors import ImageError
from reprobuild.images.contents import ContentStreamer
from reprobuild.images.vfat.layout import Layout
from reprobuild.trees.tree import Content, Entry, FileSource

BATCH = 1 << 20  # bytes of the data area written at a time (4 MiB was no faster)
_ZEROS = memoryview(bytes(64 << 10))  # padding: less than a cluster (at most 64 KiB)


def write_data_area(layout: Layout, output: BinaryIO, hasher: blake3.blake3 | None) -> None:
    """Write every directory and file with clusters; hash the files' bytes too when
    ``hasher`` is given."""
    cluster_size = layout.geometry.cluster_size
    files = iter(layout.files)
    stream = _ClusterStream(output, layout.geometry.cluster_offset(2),
                            layout.used_clusters * cluster_size, hasher)
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
                raise ImageError(f"{entry.display()}: cannot read its content: "
                                 f"{error.strerror}",
                                 hint="check that the source tree is readable") from None
            if written != size:
                _refuse_changed(entry, written)
            stream.zeros(-size % cluster_size)
    stream.flush()


def _refuse_changed(entry: Entry, written: int) -> NoReturn:
    # A file is read one byte past its size at most: it grew by at least one.
    found = f"more than {entry.size}" if written > entry.size else written
    raise ImageError(f"{entry.display()}: content is {found} bytes, expected {entry.size}",
                     hint="do not modify the source tree during a build")


class _ClusterStream:
    """Bytes written at consecutive offsets of ``output`` from ``offset`` on (``total``
    bytes in all), through reused buffers; file bytes handed to ``hasher`` as they come."""

    def __init__(self, output: BinaryIO, offset: int, total: int,
                 hasher: blake3.blake3 | None) -> None:
        self.output = output
        self.offset = offset
        self.hasher = hasher
        try:
            self.fd: int | None = output.fileno()
        except (OSError, AttributeError, io.UnsupportedOperation):
            self.fd = None
        if self.fd is not None:
            output.flush()  # what went through ``output`` lies before our writes
        else:
            output.seek(offset)
        self.view = memoryview(bytearray(max(1, min(BATCH, total))))
        self.used = 0

    def _room(self) -> int:
        """Free bytes in the current buffer (after writing it out when it is full)."""
        if self.used == len(self.view):
            self.flush()
        return len(self.view) - self.used

    def put(self, data: bytes | memoryview) -> None:
        """Directory bytes (not hashed here)."""
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
                start = self.used
                count = os.readv(fd, [self.view[start:start + want]])
                if count:
                    self.used += count
                    got += count
                    if self.hasher is not None:
                        self.hasher.update(self.view[start:start + count])
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
            if self.hasher is not None:
                self.hasher.update(chunk)
        return got

    def flush(self) -> None:
        """Write out the buffer."""
        if not self.used:
            return
        filled = self.view[:self.used]
        if self.fd is None:
            self.output.write(filled)
        else:
            done = 0
            while done < self.used:  # pwrite may write less than asked
                done += os.pwrite(self.fd, filled[done:], self.offset + done)
        self.offset += self.used
        self.used = 0
