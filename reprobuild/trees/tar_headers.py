"""The headers of an uncompressed tar file, parsed without ``tarfile``'s per-member cost.

``tarfile`` builds a ``TarInfo`` per member, decodes every field, keeps every member in a
list and seeks and reads per header; on a tar of 100,000 small files that is most of the
time spent reading it. :func:`fast_headers` reads the file in large blocks and yields one
:class:`Header` per member (ustar and pax ``x`` records), with exactly the values
``tarfile`` (encoding utf-8, errors surrogateescape) would give for them.

It covers the well-formed common case only. Anything else - a bad checksum, base-256
numbers, GNU long names, global or sparse pax records, ``hdrcharset``, unknown member
types, a member that runs past the end of the file, a damaged pax record - raises
:class:`GiveUp` *before* that member is yielded, and the caller hands the archive to
``tarfile``, which decides (skipping the members already taken). So hostile input gets
the one careful path, and the result never depends on which parser read a member.
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Iterator
from typing import NamedTuple
from zlib import adler32

BLOCK = 512
READ_SIZE = 64 << 10  # headers of small members come many to a read
# name, mode, uid, gid, size, mtime, chksum, typeflag, linkname, magic+version, uname,
# gname, devmajor, devminor, prefix (POSIX.1-1988 ustar header, tar.h)
USTAR_HEADER = struct.Struct("100s8s8s8s12s12s8sc100s8s32s32s8s8s155s")
_ZERO_BLOCK = bytes(BLOCK)
_REGULAR = (b"0", b"\0", b"7")
_ACCEPTED = (b"0", b"\0", b"7", b"1", b"2", b"3", b"4", b"5", b"6")
_PAX_RECORD = re.compile(rb"([0-9]{1,20}) ")
_PAX_REFUSED = (b"hdrcharset", b"GNU.sparse.")


class GiveUp(Exception):
    """This member needs ``tarfile``; nothing about it has been yielded."""


class Header(NamedTuple):
    """The fields of one member that the tar reader uses, named as ``TarInfo`` names them."""

    name: str
    type: bytes
    mode: int
    uid: int
    gid: int
    mtime: int
    size: int
    linkname: str
    devmajor: int
    devminor: int
    pax_headers: dict[str, str]
    offset_data: int

    def issparse(self) -> bool:
        return False


def header_checksum(block: bytes) -> int:
    """The ustar checksum of a 512-byte header: its byte sum, the chksum field (148-155)
    counted as eight spaces.

    ``zlib.adler32`` keeps 1 + the byte sum modulo 65521 in its low 16 bits; a 256-byte
    half sums to at most 65280, so each half's sum is exact, and two calls cost a
    sixth of ``sum(block)``.
    """
    return ((adler32(block[:256]) & 0xFFFF) + (adler32(block[256:]) & 0xFFFF) - 2
            - sum(block[148:156]) + 8 * 0x20)


def _text(field: bytes) -> str:
    """``tarfile.nts``: up to the first NUL, decoded utf-8 with surrogateescape."""
    end = field.find(b"\0")
    return (field if end < 0 else field[:end]).decode("utf-8", "surrogateescape")


_NUMBERS: dict[bytes, int] = {}
_NUMBERS_MAX = 1 << 16  # distinct field values remembered (modes, owners, sizes, times)


def _number(field: bytes) -> int:
    """``tarfile.nti`` for octal fields; base-256 and anything odd give up."""
    known = _NUMBERS.get(field)
    if known is not None:
        return known
    if field[0] in (0o200, 0o377):
        raise GiveUp
    end = field.find(b"\0")
    digits = (field if end < 0 else field[:end]).strip()
    if digits and (not digits.isdigit() or b"8" in digits or b"9" in digits):
        raise GiveUp
    value = int(digits, 8) if digits else 0
    if len(_NUMBERS) < _NUMBERS_MAX:
        _NUMBERS[field] = value
    return value


class Blocks:
    """Sequential reads of an open file through one large buffer."""

    def __init__(self, fd: int, size: int, read_size: int = READ_SIZE) -> None:
        self.fd = fd
        self.file_size = size
        self.read_size = read_size
        self.buffer = b""
        self.start = 0  # file offset of buffer[0]

    def read(self, offset: int, length: int) -> bytes:
        end = offset + length
        if offset < self.start or end > self.start + len(self.buffer):
            want = max(length, self.read_size)
            self.buffer = os.pread(self.fd, want, offset)
            self.start = offset
            if len(self.buffer) < length:
                raise GiveUp
        return self.buffer[offset - self.start: end - self.start]


def _parse_pax(data: bytes) -> dict[str, str]:
    """pax ``x`` records, as tarfile decodes them; anything unusual gives up."""
    records: dict[str, str] = {}
    pos = 0
    while pos < len(data) and data[pos] != 0:
        match = _PAX_RECORD.match(data, pos)
        if match is None:
            raise GiveUp
        length = int(match.group(1))
        end = pos + length - 1
        if length < 5 or pos + length > len(data) or data[end] != 0x0A:
            raise GiveUp
        keyword, equals, value = data[match.end(1) + 1: end].partition(b"=")
        if not keyword or not equals or keyword.startswith(_PAX_REFUSED):
            raise GiveUp
        try:
            records[keyword.decode("utf-8")] = value.decode("utf-8")
        except UnicodeDecodeError:
            raise GiveUp from None
        pos += length
    return records


def _header(blocks: Blocks, offset: int) -> tuple[tuple[bytes, ...], bytes] | None:
    """The unpacked fields at ``offset`` (None at the end-of-archive block)."""
    if offset + BLOCK > blocks.file_size:
        raise GiveUp
    raw = blocks.read(offset, BLOCK)
    if raw == _ZERO_BLOCK:
        if offset == 0:
            raise GiveUp
        return None
    if _number(raw[148:156]) != header_checksum(raw):
        raise GiveUp
    return USTAR_HEADER.unpack_from(raw), raw


def fast_headers(fd: int, file_size: int) -> Iterator[Header]:
    """The members of the uncompressed tar open at ``fd``; :class:`GiveUp` when
    ``tarfile`` must take over (see the module docstring)."""
    blocks = Blocks(fd, file_size)
    offset = 0
    while (found := next_header(blocks, offset)) is not None:
        header, offset = found
        yield header


def next_header(blocks: Blocks, offset: int) -> tuple[Header, int] | None:
    """The member whose header is at ``offset`` and the offset of the next header; None
    at the end of the archive, :class:`GiveUp` as for :func:`fast_headers`."""
    found = _header(blocks, offset)
    if found is None:
        return None
    fields, _ = found
    pax: dict[str, str] = {}
    if fields[7] == b"x":
        size = _check_numbers(fields)
        if offset + BLOCK + size > blocks.file_size:
            raise GiveUp
        pax = _parse_pax(blocks.read(offset + BLOCK, size))
        offset += BLOCK + -(-size // BLOCK) * BLOCK
        found = _header(blocks, offset)
        if found is None:
            raise GiveUp
        fields, _ = found
    header = _member(fields, pax, offset + BLOCK)
    end = header.offset_data
    if header.type in _REGULAR:
        end += -(-header.size // BLOCK) * BLOCK
        if header.offset_data + header.size > blocks.file_size:
            raise GiveUp
    return header, end


def _check_numbers(fields: tuple[bytes, ...]) -> int:
    """The size field of a pax header, its other numbers checked as tarfile does."""
    for index in (1, 2, 3, 5, 12, 13):
        _number(fields[index])
    return _number(fields[4])


def _member(fields: tuple[bytes, ...], pax: dict[str, str], offset_data: int) -> Header:
    (name_f, mode_f, uid_f, gid_f, size_f, mtime_f, _, type_, link_f, _, _, _, major_f,
     minor_f, prefix_f) = fields
    if type_ not in _ACCEPTED:
        raise GiveUp
    name = _text(name_f)
    if type_ == b"\0" and name.endswith("/"):
        type_ = b"5"
    if type_ == b"5":
        name = name.rstrip("/")
    if prefix_f[0]:
        name = _text(prefix_f) + "/" + name
    # Only links use linkname (tarfile decodes it for every member; that cannot fail).
    linkname = _text(link_f) if type_ in (b"1", b"2") else ""
    numbers = _NUMBERS
    mode, uid, gid, mtime, size, major, minor = (
        numbers.get(mode_f), numbers.get(uid_f), numbers.get(gid_f), numbers.get(mtime_f),
        numbers.get(size_f), numbers.get(major_f), numbers.get(minor_f))
    if mode is None or uid is None or gid is None or mtime is None or size is None or \
            major is None or minor is None:  # a value not met before: parse (or give up)
        mode, uid, gid, mtime, size, major, minor = (
            _number(mode_f), _number(uid_f), _number(gid_f), _number(mtime_f),
            _number(size_f), _number(major_f), _number(minor_f))
    if pax:
        try:
            if "path" in pax:
                name = pax["path"].rstrip("/")
            if "linkpath" in pax:
                linkname = pax["linkpath"]
            if "size" in pax:
                size = int(pax["size"])
            if "uid" in pax:
                uid = int(pax["uid"])
            if "gid" in pax:
                gid = int(pax["gid"])
            if "mtime" in pax:
                float(pax["mtime"])
        except ValueError:
            raise GiveUp from None
    return Header(name, type_, mode, uid, gid, mtime, size, linkname, major, minor, pax,
                  offset_data)
