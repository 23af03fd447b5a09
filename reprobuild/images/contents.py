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

Anything else streams through ``Content.chunks()``. Neither
:meth:`ContentStreamer.whole` nor :meth:`ContentStreamer.chunks` checks the total length:
the writer compares what it got with the size it planned and names the file if they
differ.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from typing import BinaryIO

from reprobuild.errors import ImageError
from reprobuild.trees.region import FileRegion
from reprobuild.trees.tree import CHUNK, BytesSource, Content, ContentReader, FileSource

_ZEROS = bytes(CHUNK)
WINDOW = 1 << 18
"""Bytes read at once from an archive whose small members are read in its order."""


class ContentStreamer(ContentReader):
    """Reads file contents for one image write, whole or in ``chunk_size`` pieces; a
    context manager that closes the descriptors of the archives and images it read.

    Small pieces read in place that follow each other through a file (the members of
    a canonical tar, written in the same order) come out of one read-ahead window of
    :data:`WINDOW` bytes, not one ``pread`` each; a read that jumps back or far ahead
    is one ``pread``, so no order of reads costs more than before.
    """

    def __init__(self, chunk_size: int = CHUNK) -> None:
        super().__init__()
        self.chunk_size = chunk_size
        self._window = b""
        self._window_path = b""
        self._window_start = 0
        self._last_end = -1  # where the last piece read in place ended (in _window_path)

    def __enter__(self) -> ContentStreamer:
        return self

    def whole(self, content: Content) -> bytes:
        """The whole content (for files known to be small), one call for the common
        sources; its length is the caller's to check, as for :meth:`chunks`."""
        source = content.source
        kind = type(source)
        if kind is FileSource:
            assert isinstance(source, FileSource)
            fd = os.open(source.path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                # One byte more than planned: a file that grew returns it, and the writer
                # reports the size it did not expect. Only a short read reads on.
                data = os.read(fd, content.size + 1)
                if len(data) < content.size:
                    data += b"".join(iter(lambda: os.read(fd, self.chunk_size), b""))
            finally:
                os.close(fd)
            return data
        if kind is BytesSource:
            assert isinstance(source, BytesSource)
            return source.data
        if kind is FileRegion:  # a member read in place: the window, or one pread
            assert isinstance(source, FileRegion)
            pieces = source.pieces
            offset = pieces[0].offset if len(pieces) == 1 else None
            if offset is not None:
                length = pieces[0].length
                at = offset - self._window_start
                if source.path == self._window_path and at >= 0 and \
                        at + length <= len(self._window):  # _in_place's first case, inline
                    self._last_end = offset + length
                    return self._window[at:at + length]
                data = self._in_place(source.path, offset, length)
                if len(data) == length:
                    return data
        return b"".join(self.chunks(content))

    def _in_place(self, path: bytes, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset`` of ``path`` (fewer at its end)."""
        at = offset - self._window_start
        same_file = path == self._window_path
        if same_file and at >= 0 and at + length <= len(self._window):
            data = self._window[at:at + length]
        elif same_file and length < WINDOW // 4 and \
                0 <= offset - self._last_end < WINDOW // 4:  # going forward: read ahead
            self._window = os.pread(self._fd(path), WINDOW, offset)
            self._window_start = offset
            data = self._window[:length]
        else:
            data = os.pread(self._fd(path), length, offset)
            self._window, self._window_path, self._window_start = b"", path, 0
        self._last_end = offset + length
        return data

    def copy_to(self, content: Content, output: BinaryIO) -> int | None:
        """Copy the content to ``output`` (a file whose Python buffer is empty) at its
        position, by ``os.copy_file_range`` (the kernel moves the bytes, no copy
        through Python), for a file on disk or one piece of an archive or image; the
        bytes copied - one more than planned for a file that grew - or None when this
        cannot be done (another source, an output that is not a plain file): then
        nothing was written and the caller streams the bytes itself."""
        source = content.source
        kind = type(source)
        try:
            out_fd = output.fileno()
        except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation too
            return None
        if kind is FileSource:
            assert isinstance(source, FileSource)
            fd = os.open(source.path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                copied = _copy_range(fd, out_fd, 0, content.size)
                if copied == content.size and os.pread(fd, 1, copied):
                    copied += 1  # the file grew since the tree was made
            finally:
                os.close(fd)
        elif kind is FileRegion:
            assert isinstance(source, FileRegion)
            if len(source.pieces) != 1 or source.pieces[0].offset is None:
                return None
            copied = _copy_range(self._fd(source.path), out_fd, source.pieces[0].offset,
                                 content.size)
        else:
            return None
        if copied is not None:
            output.seek(0, os.SEEK_CUR)  # the buffered file learns its new position
        return copied

    def _fd(self, path: bytes) -> int:
        fd = self._fds.get(path)
        if fd is None:
            fd = self._fds[path] = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        return fd

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
        fd = self._fd(region.path)
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


def _copy_range(source_fd: int, out_fd: int, offset: int, size: int) -> int | None:
    """``size`` bytes from ``offset`` of ``source_fd`` to ``out_fd``'s position: the
    count copied (less at the source's end), or None when the kernel copies nothing
    between these two files (another file system type, a pipe, an old kernel)."""
    done = 0
    while done < size:
        try:
            count = os.copy_file_range(source_fd, out_fd, size - done, offset + done)
        except OSError as exc:
            if done or exc.errno not in _NO_COPY_RANGE:
                raise
            return None
        if not count:
            break
        done += count
    return done


_NO_COPY_RANGE = frozenset((errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP,
                            errno.EBADF, errno.EPERM))
