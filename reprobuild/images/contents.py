"""Regular files' bytes for the image writers: ``Content.chunks()``, with fewer calls.

A writer of 100,000 small files spends more on opening them than on their bytes:
``Content.chunks()`` makes a buffered file object per file, and a tar member read in
place opens the whole archive again for each member. :class:`ContentStreamer` is the
tree's :class:`~reprobuild.trees.tree.ContentReader` (a small file whole in one call,
one descriptor kept per archive or image) with streaming added for large files; it
yields the very same bytes, in the same order, for the sources trees are made of:

* a file on disk (:class:`~reprobuild.trees.tree.FileSource`): ``os.open`` and
  ``os.read``, no file object;
* pieces of another file (:class:`~reprobuild.trees.region.FileRegion`: a tar or cpio
  member in place, an image's blocks): ``os.pread`` on the kept descriptor; holes are
  zeros;
* bytes in memory (:class:`~reprobuild.trees.tree.BytesSource`): the bytes themselves.

Anything else streams through ``Content.chunks()``. :meth:`ContentStreamer.chunks` does
not check the total length: the writer compares what it got with the size it planned and
names the file if they differ (:meth:`ContentStreamer.read_file` checks it itself).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from reprobuild.errors import ImageError
from reprobuild.trees.region import FileRegion
from reprobuild.trees.tree import CHUNK, BytesSource, Content, ContentReader, FileSource

_ZEROS = bytes(CHUNK)


class ContentStreamer(ContentReader):
    """Reads file contents for one image write, whole or in ``chunk_size`` pieces; a
    context manager that closes the descriptors of the archives and images it read."""

    def __init__(self, chunk_size: int = CHUNK) -> None:
        super().__init__()
        self.chunk_size = chunk_size

    def __enter__(self) -> ContentStreamer:
        return self

    def read_file(self, content: Content, path: bytes) -> bytes:
        """The whole content of the file at ``path`` in the tree (for files known to be
        small), its size checked; the error names the path (formatted only then)."""
        try:
            return self.read(content, "")
        except ImageError as error:
            shown = "/" + path.decode("utf-8", "backslashreplace")
            raise ImageError(f"{shown}{error.message}", hint=error.hint) from None

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
            while chunk := os.read(fd, step):
                yield chunk
        finally:
            os.close(fd)

    def _region(self, region: FileRegion) -> Iterator[bytes]:
        fd = self._fds.get(region.path)
        if fd is None:
            fd = self._fds[region.path] = os.open(region.path, os.O_RDONLY | os.O_CLOEXEC)
        step = self.chunk_size
        for offset, length in region.pieces:
            done = 0
            while done < length:
                want = min(step, length - done)
                if offset is None:
                    chunk = _ZEROS[:want] if want <= len(_ZEROS) else bytes(want)
                else:
                    chunk = os.pread(fd, want, offset + done)
                    if not chunk:
                        shown = region.path.decode("utf-8", "backslashreplace")
                        raise ImageError(f"{shown} ended inside a file's bytes (at offset "
                                         f"{offset + done})",
                                         hint="the image or archive changed or was "
                                              "truncated")
                done += len(chunk)
                yield chunk
