"""Where a regular file's bytes come from: :class:`Content` and its sources.

A tree owns no file data: a regular file carries a :class:`Content`, its size and a
:class:`ContentSource` to stream the bytes from (a store file, a region of an archive or
image, bytes in memory). :class:`ContentReader` reads many small contents with one call
each. (:mod:`reprobuild.trees.tree` re-exports these names.)
"""

from __future__ import annotations

import functools
import importlib
import io
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, BinaryIO, Protocol, cast

from reprobuild.errors import ImageError
from reprobuild.trees.region import FileRegion

if TYPE_CHECKING:
    from blake3 import blake3 as Blake3

CHUNK = 1 << 20
"""Read size when streaming file contents."""

ZERO_BLAKE3 = bytes.fromhex("af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262")
"""The blake3 digest of no bytes (a test checks it against the library)."""

BLAKE3 = "blake3"


@functools.cache
def _blake3() -> type[Blake3]:
    # The hasher class, its library loaded on the first content hashed: a format that
    # never hashes a file's bytes (tar, cpio of a directory) does not load it at start-up.
    return cast("type[Blake3]", importlib.import_module(BLAKE3).blake3)


class ContentSource(Protocol):
    """Where the bytes of a regular file come from."""

    def open(self) -> BinaryIO:
        """Open the bytes for reading from offset 0."""
        ...


@dataclass(frozen=True, slots=True, init=False)
class FileSource:
    """File bytes read from a path on disk (a store file, a spooled tar member)."""

    path: bytes

    def __init__(self, path: bytes) -> None:
        _set_source_path(self, path)  # see slot_setters

    def open(self) -> BinaryIO:
        return open(self.path, "rb")


@dataclass(frozen=True, slots=True)
class BytesSource:
    """File bytes held in memory (small files, overrides, tests)."""

    data: bytes

    def open(self) -> BinaryIO:
        return io.BytesIO(self.data)


@dataclass(frozen=True, slots=True, init=False)
class Content:
    """A regular file's bytes: their size and where to stream them from.

    The blake3 digest is computed on first use (or given when already known, e.g. from
    the store), so building a tree does not read every file twice.
    """

    size: int
    source: ContentSource = field(compare=False, repr=False)
    known_blake3: bytes | None = field(default=None, compare=False, repr=False)
    _computed_blake3: bytes | None = field(default=None, init=False, compare=False,
                                           repr=False)

    def __init__(self, size: int, source: ContentSource,
                 known_blake3: bytes | None = None) -> None:
        _set_size(self, size)  # see slot_setters
        _set_source(self, source)
        _set_known_blake3(self, known_blake3)
        _set_computed_blake3(self, None)

    @property
    def blake3(self) -> bytes:
        if self.known_blake3 is not None:
            return self.known_blake3
        if self._computed_blake3 is None:
            object.__setattr__(self, "_computed_blake3", self._digest())
        assert self._computed_blake3 is not None
        return self._computed_blake3

    def _digest(self) -> bytes:
        hasher = _blake3()()
        size = 0
        for chunk in self.chunks():
            hasher.update(chunk)
            size += len(chunk)
        if size != self.size:
            raise ImageError(
                f"file content changed while reading: expected {self.size} bytes, got {size}",
                hint="do not modify the source tree during a build",
            )
        return hasher.digest()

    def chunks(self, chunk_size: int = CHUNK) -> Iterator[bytes]:
        """Yield the file's bytes in order, ``chunk_size`` at a time."""
        with self.source.open() as stream:
            while True:
                chunk = stream.read(chunk_size)
                if not chunk:
                    return
                yield chunk

    def read(self) -> bytes:
        """The whole content in memory; only for small files (symlink-sized, tests)."""
        return b"".join(self.chunks())

    @staticmethod
    def from_bytes(data: bytes) -> Content:
        return Content(len(data), BytesSource(data), _blake3()(data).digest())


class ContentReader:
    """Reads whole contents, fast: one ``pread`` from a descriptor kept open per archive
    or image for bytes read in place, one ``read`` for a file, the bytes for bytes.

    For writers that read many small files; :meth:`close` (or ``with``) releases the
    descriptors. The result is what :meth:`Content.read` gives, checked for its size.
    """

    def __init__(self) -> None:
        self._fds: dict[bytes, int] = {}

    def read(self, content: Content, where: str) -> bytes:
        source = content.source
        size = content.size
        if isinstance(source, BytesSource):
            data = source.data
        elif isinstance(source, FileRegion) and len(source.pieces) == 1 and \
                source.pieces[0].offset is not None:
            fd = self._fds.get(source.path)
            if fd is None:
                fd = self._fds[source.path] = os.open(source.path, os.O_RDONLY | os.O_CLOEXEC)
            data = os.pread(fd, source.pieces[0].length, source.pieces[0].offset)
        elif isinstance(source, FileSource):
            fd = os.open(source.path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                data = os.read(fd, size + 1)  # one byte more: a file that grew shows
                while 0 < len(data) < size:  # a short read (some filesystems do)
                    more = os.read(fd, size + 1 - len(data))
                    if not more:
                        break
                    data += more
            finally:
                os.close(fd)
        else:
            data = content.read()
        if len(data) != size:
            raise ImageError(f"{where}: content is {len(data)} bytes, the tree says {size}",
                             hint="do not modify the source tree during a build")
        return data

    @staticmethod
    def cheap_to_read_again(content: Content) -> bool:
        """True when reading ``content`` again costs no more than keeping it: bytes in
        memory, or one piece of an archive or image read with ``pread``."""
        source = content.source
        return isinstance(source, BytesSource) or (
            isinstance(source, FileRegion) and len(source.pieces) == 1
            and source.pieces[0].offset is not None)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> ContentReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def slot_setters(cls: type, *names: str) -> tuple[Callable[[object, object], None], ...]:
    """The ``__set__`` of each named slot of the frozen dataclass ``cls``.

    A frozen dataclass's generated ``__init__`` stores each field through
    ``object.__setattr__``; an ``__init__`` that stores through the slots' own
    descriptors makes the same object in half the time, and loading a tree makes an
    Entry, a Content and its source per file. (The class's own ``__setattr__`` still
    refuses every change after ``__init__``.)
    """
    return tuple(cls.__dict__[name].__set__ for name in names)


_set_size, _set_source, _set_known_blake3, _set_computed_blake3 = slot_setters(
    Content, "size", "source", "known_blake3", "_computed_blake3")
(_set_source_path,) = slot_setters(FileSource, "path")
