"""Regular files' bytes for the image writers: ``Content.chunks()``, with fewer calls.

A writer of 100,000 small files spends more on opening them than on their bytes:
``Content.chunks()`` makes a buffered file object per file, and a tar member read in
place opens the whole archive again for each member. :class:`ContentReader` yields the
very same bytes, in the same order, for the sources trees are made of:

* a file on disk (:class:`~reprobuild.trees.tree.FileSource`): ``os.open`` and
  ``os.read`` into one reused buffer, no file object;
* pieces of another file (:class:`~reprobuild.trees.region.FileRegion`: a tar or cpio
  member in place, an image's blocks): ``os.pread`` on one descriptor per file, kept
  open for the whole write; holes are zeros;
* bytes in memory (:class:`~reprobuild.trees.tree.BytesSource`): the bytes themselves.

Anything else streams through ``Content.chunks()``. The reader never checks the total
length: as with ``Content.chunks()``, the writer compares what it got with the size it
planned and names the file if they differ.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from types import TracebackType

from reprobuild.errors import ImageError
from reprobuild.trees.region import FileRegion
from reprobuild.trees.tree import CHUNK, BytesSource, Content, FileSource

_ZEROS = bytes(CHUNK)


class ContentReader:
    """Streams file contents for one image write; a context manager that closes the
    descriptors of the archives and images it read from."""

    def __init__(self, chunk_size: int = CHUNK) -> None:
        self.chunk_size = chunk_size
        self._region_fds: dict[bytes, int] = {}

    def __enter__(self) -> ContentReader:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        fds, self._region_fds = self._region_fds, {}
        for fd in fds.values():
            os.close(fd)

    def chunks(self, content: Content) -> Iterator[bytes]:
        """The file's bytes in order, at most ``chunk_size`` at a time (no empty chunk)."""
        source = content.source
        kind = type(source)
        if kind is FileSource:
            assert isinstance(source, FileSource)
            return self._file(source.path)
        if kind is FileRegion:
            assert isinstance(source, FileRegion)
            return self._region(source)
        if kind is BytesSource:
            assert isinstance(source, BytesSource)
            return self._bytes(source.data)
        return content.chunks(self.chunk_size)

    def read(self, content: Content) -> bytes:
        """The whole file in memory (for files known to be small)."""
        source = content.source
        kind = type(source)
        if kind is BytesSource:
            assert isinstance(source, BytesSource)
            return source.data
        if kind is FileSource:  # the common small file: one open, one read, no generator
            assert isinstance(source, FileSource)
            fd = os.open(source.path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                # One byte more than planned: a file that grew returns it, and the writer
                # reports the size it did not expect. Only a short read reads on.
                data = os.read(fd, content.size + 1)
                if len(data) < content.size:
                    data += self._rest(fd)
            finally:
                os.close(fd)
            return data
        if kind is FileRegion:  # a member read in place: one pread on a kept descriptor
            assert isinstance(source, FileRegion)
            pieces = source.pieces
            offset = pieces[0].offset if len(pieces) == 1 else None
            if offset is not None:
                length = pieces[0].length
                data = os.pread(self._region_fd(source.path), length, offset)
                if len(data) == length:
                    return data
        return b"".join(self.chunks(content))

    def _region_fd(self, path: bytes) -> int:
        fd = self._region_fds.get(path)
        if fd is None:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            self._region_fds[path] = fd
        return fd

    def _rest(self, fd: int) -> bytes:
        parts: list[bytes] = []
        while chunk := os.read(fd, self.chunk_size):
            parts.append(chunk)
        return b"".join(parts)

    def _bytes(self, data: bytes) -> Iterator[bytes]:
        step = self.chunk_size
        if len(data) <= step:
            if data:
                yield data
            return
        view = memoryview(data)
        for at in range(0, len(data), step):
            yield bytes(view[at:at + step])

    def _file(self, path: bytes) -> Iterator[bytes]:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            step = self.chunk_size
            while True:
                chunk = os.read(fd, step)
                if not chunk:
                    return
                yield chunk
        finally:
            os.close(fd)

    def _region(self, region: FileRegion) -> Iterator[bytes]:
        fd = self._region_fd(region.path)
        step = self.chunk_size
        for piece in region.pieces:
            done = 0
            while done < piece.length:
                want = min(step, piece.length - done)
                if piece.offset is None:
                    chunk = _ZEROS[:want] if want <= len(_ZEROS) else bytes(want)
                else:
                    chunk = os.pread(fd, want, piece.offset + done)
                    if not chunk:
                        shown = region.path.decode("utf-8", "backslashreplace")
                        raise ImageError(f"{shown} ended inside a file's bytes (at offset "
                                         f"{piece.offset + done})",
                                         hint="the image or archive changed or was "
                                              "truncated")
                done += len(chunk)
                yield chunk
