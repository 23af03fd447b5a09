"""The fast tar header parser gives exactly what tarfile gives, and hands over to it.

Every archive is read twice: as the reader does (fast headers, tarfile from the first
member they cannot take) and with tarfile alone. The members, their entries and the
errors must be the same, for plain archives, for every kind of member the fast parser
gives up on (at the start, in the middle), and for damaged headers.
"""

from __future__ import annotations

import os
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reprobuild.errors import ImageError
from reprobuild.trees import tar_reader
from reprobuild.trees.tar_headers import GiveUp, fast_headers, header_checksum
from reprobuild.trees.tar_reader import Member, iter_members
from tests.archive_helpers import M, dir_, file, hardlink, symlink, tar_bytes


def _tarfile_only(*args: object) -> Iterator[object]:
    raise GiveUp
    yield  # a generator, like tar_reader._fast_members


def _view(member: Member) -> tuple[object, ...]:
    entry = member.entry
    content = None
    if entry.content is not None:
        content = (entry.content.size, entry.content.read())
    return (member.name, member.link_target, entry.path, entry.type, entry.mode, entry.uid,
            entry.gid, entry.mtime_ns, entry.xattrs, entry.target, entry.rdev_major,
            entry.rdev_minor, content)


def read_both(path: Path) -> tuple[object, object]:
    """(members or error) read as the reader does, and with tarfile alone."""
    def read() -> object:
        try:
            return [_view(m) for m in iter_members(path)]
        except ImageError as exc:
            return ("error", str(exc))

    fast = read()
    with mock.patch.object(tar_reader, "_fast_members", _tarfile_only):
        slow = read()
    return fast, slow


def fast_count(path: Path) -> int:
    """How many members the fast parser takes before giving up (or all of them)."""
    fd = os.open(path, os.O_RDONLY)
    count = 0
    try:
        for _ in fast_headers(fd, os.fstat(fd).st_size):
            count += 1
    except GiveUp:
        pass
    finally:
        os.close(fd)
    return count


def members() -> list[M]:
    # 123 bytes: a pax path, a GNU long name, or a ustar prefix and name.
    deep = "d/" + "x" * 90 + "/" + "y" * 30
    return [dir_("./"), dir_("d"), file("d/a", b"alpha\n", mode=0o4755, uid=7, gid=8),
            file("d/empty"), symlink("d/s", "a"), hardlink("d/h", "d/a"),
            M("d/c", tarfile.CHRTYPE, mode=0o600, major=5, minor=1),
            dir_("d/" + "x" * 90), file(deep, b"x" * 5000, pax={"mtime": "1600000000.5",
                                         "SCHILY.xattr.user.k": "v"}),
            file("d/z", b"\0" * 4096)]


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT,
                                 tarfile.GNU_FORMAT])
def test_plain_archives_read_the_same(tmp_path: Path, fmt: int) -> None:
    entries = members()
    if fmt != tarfile.PAX_FORMAT:
        entries[8].pax = {}
    path = tmp_path / "t.tar"
    path.write_bytes(tar_bytes(entries, fmt))
    fast, slow = read_both(path)
    assert fast == slow
    assert isinstance(fast, list) and len(fast) == len(entries)
    # GNU long names are tarfile's; everything before them is the fast parser's.
    assert fast_count(path) == (8 if fmt == tarfile.GNU_FORMAT else len(entries))


def _patched(data: bytes, offset: int, field: slice, value: bytes, *,
             fix_checksum: bool = True) -> bytes:
    raw = bytearray(data)
    raw[offset + field.start: offset + field.start + len(value)] = value
    if fix_checksum:
        raw[offset + 148: offset + 156] = b" " * 8
        raw[offset + 148: offset + 156] = b"%06o\0 " % sum(raw[offset: offset + 512])
    return bytes(raw)


def _header_offsets(data: bytes) -> list[int]:
    offsets, offset = [], 0
    while offset + 512 <= len(data) and data[offset: offset + 512] != bytes(512):
        offsets.append(offset)
        size = int(data[offset + 124: offset + 136].split(b"\0")[0].strip() or b"0", 8)
        skip = data[offset + 156: offset + 157] in (b"0", b"\0", b"7", b"x", b"g", b"L")
        offset += 512 + (-(-size // 512) * 512 if skip else 0)
    return offsets


DAMAGE = {
    "bad checksum": (slice(148, 156), b"0000001\0", False),
    "base-256 uid": (slice(108, 116), b"\x80" + bytes(6) + b"\x07", True),
    "octal digit 9": (slice(100, 108), b"0000649\0", True),
    "unknown type": (slice(156, 157), b"V", True),
    "global header": (slice(156, 157), b"g", True),
    "leading spaces": (slice(100, 108), b"   0644\0", True),
    "dot-dot name": (slice(0, 100), b"../escape\0", True),
    "absolute name": (slice(0, 100), b"/etc/x\0", True),
    "v7 directory": (slice(0, 101), b"d/olddir/\0" + bytes(90) + b"\0", True),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
@pytest.mark.parametrize("where", [0, 3, -1])
def test_unusual_headers_are_tarfiles_to_judge(tmp_path: Path, damage: str,
                                               where: int) -> None:
    data = tar_bytes(members())
    offsets = _header_offsets(data)
    field, value, fix = DAMAGE[damage]
    path = tmp_path / "t.tar"
    path.write_bytes(_patched(data, offsets[where], field, value, fix_checksum=fix))
    fast, slow = read_both(path)
    assert fast == slow


def test_truncated_archive_and_member_past_the_end(tmp_path: Path) -> None:
    data = tar_bytes(members())
    path = tmp_path / "t.tar"
    for cut in (len(data) - 1024, _header_offsets(data)[7] + 700, 511, 0):
        path.write_bytes(data[:cut])
        fast, slow = read_both(path)
        assert fast == slow, cut


def test_pax_records_the_fast_parser_leaves_to_tarfile(tmp_path: Path) -> None:
    path = tmp_path / "t.tar"
    for pax in ({"hdrcharset": "BINARY", "path": "d/bin"}, {"size": "12x"},
                {"uid": "seven"}, {"GNU.sparse.name": "d/sp"}, {"path": "d/p/"},
                {"linkpath": "d/a", "comment": "\u00e9t\u00e9"}):
        entries = [dir_("d"), file("d/a", b"a"), file("d/q", b"q", pax=dict(pax))]
        path.write_bytes(tar_bytes(entries))
        fast, slow = read_both(path)
        assert fast == slow, pax


NAMES = st.text(alphabet="ab.-_\u00e9", min_size=1, max_size=12).filter(
    lambda n: n not in (".", ".."))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(["file", "dir", "symlink", "link", "fifo"]),
                          st.lists(NAMES, min_size=1, max_size=3),
                          st.integers(0, 9000), st.booleans()),
                max_size=12),
       st.sampled_from([tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT]))
def test_generated_archives_read_the_same(spec: list[tuple[str, list[str], int, bool]],
                                          fmt: int) -> None:
    entries: list[M] = []
    files: list[str] = []
    for kind, parts, size, pax in spec:
        name = "/".join(parts)
        extra = {"pax": {"mtime": f"{1_600_000_000 + size}.25"}} if pax else {}
        if kind == "file":
            entries.append(file(name, bytes([size % 251]) * size, mode=0o640 + size % 8,
                                uid=size, **extra))  # type: ignore[arg-type]
            files.append(name)
        elif kind == "dir":
            entries.append(dir_(name, **extra))  # type: ignore[arg-type]
        elif kind == "symlink":
            entries.append(symlink(name, "t" * (1 + size % 150)))
        elif kind == "link" and files:
            entries.append(hardlink(name, files[size % len(files)]))
        else:
            entries.append(M(name, tarfile.FIFOTYPE))
    try:
        data = tar_bytes(entries, fmt)
    except ValueError:
        return  # a name or number this format cannot hold
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "t.tar"
        path.write_bytes(data)
        fast, slow = read_both(path)
    assert fast == slow


@settings(max_examples=300, deadline=None)
@given(block=st.binary(min_size=512, max_size=512))
def test_header_checksum_is_the_byte_sum_with_the_field_as_spaces(block: bytes) -> None:
    assert header_checksum(block) == sum(block[:148]) + 8 * 0x20 + sum(block[156:])
    assert header_checksum(b"\xff" * 512) == 255 * 504 + 256  # the largest sums stay exact
