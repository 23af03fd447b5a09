"""Byte differences: where two streams first differ, with a hexdump of both around it."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any, BinaryIO

from reprobuild.trees.tree import Entry

HEX_WIDTH = 16
HEX_LINES = 4


@dataclass(frozen=True)
class ByteDifference:
    """The first differing byte of two streams and a hexdump of both around it."""

    offset: int
    size_a: int
    size_b: int
    dump_a: tuple[str, ...]
    dump_b: tuple[str, ...]
    hint: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"offset": self.offset, "size_a": self.size_a, "size_b": self.size_b,
                "hexdump_a": list(self.dump_a), "hexdump_b": list(self.dump_b),
                "hint": self.hint}

    def render(self, indent: str = "  ") -> list[str]:
        lines = [f"{indent}first differing byte at offset {self.offset} (0x{self.offset:x});"
                 f" sizes {self.size_a} vs {self.size_b} bytes"]
        if self.hint:
            lines.append(f"{indent}{self.hint}")
        for la, lb in zip(self.dump_a, self.dump_b, strict=True):
            if la.endswith("(end)") and lb.endswith("(end)"):
                lines.append(f"{indent}  {la}")
                break
            if la == lb:
                lines.append(f"{indent}  {la}")
            else:
                lines.append(f"{indent}- {la}")
                lines.append(f"{indent}+ {lb}")
        return lines


def hexdump_line(offset: int, data: bytes) -> str:
    """One ``hexdump -C`` style line: offset, 16 hex bytes, printable characters."""
    if not data:
        return f"{offset:08x}  (end)"
    hexes = " ".join(f"{b:02x}" for b in data).ljust(HEX_WIDTH * 3 - 1)
    text = "".join(chr(b) if 0x20 <= b < 0x7F else "." for b in data)
    return f"{offset:08x}  {hexes}  |{text}|"


def _dump(stream: BinaryIO, start: int, lines: int) -> tuple[str, ...]:
    stream.seek(start)
    data = stream.read(HEX_WIDTH * lines)
    # Lines past the end of both streams are dropped by render(); one "(end)" stays.
    return tuple(hexdump_line(start + i, data[i:i + HEX_WIDTH])
                 for i in range(0, HEX_WIDTH * lines, HEX_WIDTH))


def _first_offset(fa: BinaryIO, fb: BinaryIO) -> int | None:
    offset = 0
    while True:
        ca, cb = fa.read(1 << 20), fb.read(1 << 20)
        if ca != cb:
            n = min(len(ca), len(cb))
            for i in range(n):
                if ca[i] != cb[i]:
                    return offset + i
            return offset + n
        if not ca:
            return None
        offset += len(ca)


def compare_bytes(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> ByteDifference | None:
    """None when the files are identical; else where they first differ, with hexdumps."""
    with open(a, "rb") as fa, open(b, "rb") as fb:
        found = compare_streams(fa, fb)
        if found is not None and max(found.size_a, found.size_b) <= ORDER_HINT_LIMIT:
            fa.seek(0)
            fb.seek(0)
            found = replace(found, hint=order_hint(fa.read(), fb.read()))
        return found


ORDER_HINT_LIMIT = 1 << 20


def order_hint(a: bytes, b: bytes) -> str | None:
    """A hint when two contents hold the same lines in another order."""
    if a != b and b"\n" in a and sorted(a.splitlines()) == sorted(b.splitlines()):
        return ("the same lines in another order: directory listing (readdir) or hash "
                "order leaks into the output")
    return None


def compare_streams(fa: BinaryIO, fb: BinaryIO) -> ByteDifference | None:
    offset = _first_offset(fa, fb)
    if offset is None:
        return None
    size_a, size_b = fa.seek(0, os.SEEK_END), fb.seek(0, os.SEEK_END)
    start = max(0, (offset // HEX_WIDTH - 1) * HEX_WIDTH)
    return ByteDifference(offset, size_a, size_b, _dump(fa, start, HEX_LINES),
                          _dump(fb, start, HEX_LINES))


class ChunkStream:
    """A minimal seekable reader over a file content's chunks (for hexdumps in trees)."""

    def __init__(self, entry: Entry) -> None:
        assert entry.content is not None
        self._content = entry.content
        self._data: bytes | None = None
        self._pos = 0

    def _bytes(self) -> bytes:
        if self._data is None:
            self._data = self._content.read()
        return self._data

    def all(self) -> bytes:
        return self._bytes()

    def read(self, n: int = -1) -> bytes:
        data = self._bytes()
        end = len(data) if n < 0 else self._pos + n
        chunk = data[self._pos:end]
        self._pos += len(chunk)
        return chunk

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        self._pos = len(self._bytes()) + offset if whence == os.SEEK_END else offset
        return self._pos


