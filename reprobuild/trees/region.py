"""The one content source for bytes that lie inside another file: a :class:`FileRegion`.

A tar or cpio member read in place, a GPT partition, an EROFS file's blocks and tail, an
ext4 file's extents and holes: each is an ordered list of pieces of one file (an image
or an archive), where a piece is ``length`` bytes at ``offset``, or ``length`` zero
bytes (a hole). Readers build regions with :func:`file_region`, which checks every piece
against the file's size first, so a damaged image is refused when it is read, not when
a file's bytes are streamed later.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import BinaryIO, NamedTuple

from reprobuild.errors import ImageError

BUFFER = 1 << 20
ZEROS = bytes(BUFFER)


class Piece(NamedTuple):
    """``length`` bytes of the file at ``offset``; a hole of zeros when ``offset`` is None."""

    offset: int | None
    length: int


@dataclass(frozen=True, slots=True, init=False)
class FileRegion:
    """A regular file's bytes: the concatenation of ``pieces`` of the file at ``path``."""

    path: bytes
    pieces: tuple[Piece, ...]

    def __init__(self, path: bytes, pieces: tuple[Piece, ...]) -> None:
        # Through the slots' descriptors, as Entry does (one region per tar member).
        _set_path(self, path)
        _set_pieces(self, pieces)

    @property
    def size(self) -> int:
        return sum(piece.length for piece in self.pieces)

    def open(self) -> BinaryIO:
        return io.BufferedReader(_RegionReader(self.path, self.pieces), BUFFER)


_set_path, _set_pieces = (FileRegion.__dict__[name].__set__ for name in ("path", "pieces"))


def file_region(path: bytes | str, pieces: Iterable[tuple[int | None, int]], *,
                file_size: int, what: str) -> FileRegion:
    """A region of ``path`` (``file_size`` bytes long), every piece checked to lie inside.

    ``what`` names the thing the bytes belong to in the error (an image path and a file).
    Empty pieces are dropped; adjacent pieces are not merged (their order is the data's).
    """
    if isinstance(pieces, tuple) and len(pieces) == 1:
        offset, length = pieces[0]
        if offset is not None and offset >= 0 and length > 0 and \
                offset + length <= file_size:
            return FileRegion(os.fsencode(path), (Piece(offset, length),))
    checked: list[Piece] = []
    for offset, length in pieces:
        if length < 0 or (offset is not None and offset < 0):
            raise ImageError(f"{what}: a negative offset or length ({offset}, {length})",
                             hint="the image or archive is damaged")
        if offset is not None and offset + length > file_size:
            raise ImageError(f"{what}: {length} bytes at offset {offset} lie past the end "
                             f"of the file ({file_size} bytes)",
                             hint="the image or archive is truncated or damaged")
        if length:
            checked.append(Piece(offset, length))
    return FileRegion(os.fsencode(path), tuple(checked))


class _RegionReader(io.RawIOBase):
    """The pieces of a region, read in order with ``pread``; holes read as zeros."""

    def __init__(self, path: bytes, pieces: tuple[Piece, ...]) -> None:
        super().__init__()
        self._path = path
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self._pieces = pieces
        self._index = 0
        self._done = 0  # bytes of the current piece already read

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        while self._index < len(self._pieces) and \
                self._done == self._pieces[self._index].length:
            self._index += 1
            self._done = 0
        if self._index == len(self._pieces):
            return 0
        piece = self._pieces[self._index]
        view = memoryview(buffer).cast("B")
        want = min(len(view), piece.length - self._done, BUFFER)
        if piece.offset is None:
            view[:want] = ZEROS[:want]
            got = want
        else:
            got = os.preadv(self._fd, [view[:want]], piece.offset + self._done)
            if got == 0:
                shown = self._path.decode("utf-8", "backslashreplace")
                raise ImageError(f"{shown} ended inside a file's bytes (at offset "
                                 f"{piece.offset + self._done})",
                                 hint="the image or archive changed or was truncated")
        self._done += got
        return got

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
        super().close()


class EntryBudget:
    """How many directory entries a reader may still accept from an image.

    Every entry of a real image takes at least a byte of it (compressed directory
    listings too), so more entries than the image has bytes means directory blocks are
    shared or looped; the bound keeps a damaged image from filling memory.
    """

    def __init__(self, image_size: int, path: bytes) -> None:
        self.left = max(image_size, 1024)
        self.path = path

    def take(self, count: int) -> None:
        self.left -= count
        if self.left < 0:
            shown = self.path.decode("utf-8", "backslashreplace")
            raise ImageError(f"{shown}: more directory entries than the image has bytes",
                             hint="the image is damaged (directory blocks shared or looped)")
