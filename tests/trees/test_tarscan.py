"""The compiled tar scan (reprobuild/trees/_tarscan.c) reads the members the pure Python
fast parser reads, the same way: every archive is read three ways (with the scan,
without it, with tarfile alone) and the members, entries and errors must agree."""

from __future__ import annotations

import io
import tarfile
import tempfile
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reprobuild import native
from reprobuild.errors import ImageError
from reprobuild.images import tar
from reprobuild.images.registry import ImageOptions
from reprobuild.trees import tar_reader
from reprobuild.trees.tar_reader import iter_members
from tests.archive_helpers import M, dir_, file, hardlink, symlink, tar_bytes
from tests.images.archive_trees import EPOCH, sample_tree
from tests.trees.test_tar_headers import (
    DAMAGE,
    _header_offsets,
    _patched,
    _tarfile_only,
    _view,
    members,
)

TARSCAN = native.load("reprobuild.trees._tarscan")
# Without the extension only the test that it is built fails; the others compare it.
compiled = pytest.mark.skipif(TARSCAN is None, reason="_tarscan.c not built (see above)")


def read_three(path: Path, *, read_size: int = tar_reader.SCAN_READ_SIZE) -> list[object]:
    """The members (or the error) read with the scan, without it, with tarfile alone."""
    def read() -> object:
        try:
            return [_view(m) for m in iter_members(str(path))]
        except ImageError as exc:
            return ("error", str(exc))

    assert tar_reader._TARSCAN is not None
    with mock.patch.object(tar_reader, "SCAN_READ_SIZE", read_size):
        scanned = read()
    with mock.patch.object(tar_reader, "_TARSCAN", None):
        python = read()
    with mock.patch.object(tar_reader, "_fast_members", _tarfile_only):
        slow = read()
    return [scanned, python, slow]


def test_the_extension_is_built_in_the_test_environment() -> None:
    assert TARSCAN is not None, "reprobuild/trees/_tarscan.c was not built: run setup.sh"
    assert tar_reader._TARSCAN is TARSCAN


@compiled
@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT,
                                 tarfile.GNU_FORMAT])
@pytest.mark.parametrize("read_size", [512, 1536, tar_reader.SCAN_READ_SIZE])
def test_plain_archives_read_the_same(tmp_path: Path, fmt: int, read_size: int) -> None:
    entries = members()
    if fmt != tarfile.PAX_FORMAT:
        entries[8].pax = {}
    path = tmp_path / "t.tar"
    path.write_bytes(tar_bytes(entries, fmt))
    scanned, python, slow = read_three(path, read_size=read_size)
    assert scanned == python == slow
    assert isinstance(scanned, list) and len(scanned) == len(entries)


@compiled
def test_our_own_archives_read_the_same(tmp_path: Path) -> None:
    out = io.BytesIO()
    tar.write(sample_tree(), out, ImageOptions(epoch=EPOCH))
    path = tmp_path / "t.tar"
    path.write_bytes(out.getvalue())
    for read_size in (512, 4096, tar_reader.SCAN_READ_SIZE):
        scanned, python, slow = read_three(path, read_size=read_size)
        assert scanned == python == slow
        assert isinstance(scanned, list) and len(scanned) > 20


@compiled
@pytest.mark.parametrize("damage", sorted(DAMAGE))
@pytest.mark.parametrize("where", [0, 3, -1])
def test_unusual_headers_read_the_same(tmp_path: Path, damage: str, where: int) -> None:
    data = tar_bytes(members())
    field, value, fix = DAMAGE[damage]
    path = tmp_path / "t.tar"
    path.write_bytes(_patched(data, _header_offsets(data)[where], field, value,
                              fix_checksum=fix))
    scanned, python, slow = read_three(path)
    assert scanned == python == slow


@compiled
@pytest.mark.parametrize(("field", "value"), [
    (slice(124, 136), b"   0000012 \0"), (slice(124, 136), b"\0" * 12),  # spaces; empty
    (slice(136, 148), b"0000000001a\0"), (slice(345, 346), b"p"),  # bad digit; a prefix
    (slice(156, 157), b"7"), (slice(156, 157), b"\0"),  # contiguous; old regular
    (slice(0, 100), b"./d/a\0"), (slice(0, 100), b"d//a\0"),
    (slice(0, 100), b"\xff\xfe/\xc3\0")])
def test_edge_fields_read_the_same(tmp_path: Path, field: slice, value: bytes) -> None:
    entries = [dir_("d"), file("d/a", b"alpha" * 3), file("d/b", b"b" * 700), dir_("d/e")]
    data = tar_bytes(entries, tarfile.USTAR_FORMAT)
    path = tmp_path / "t.tar"
    for offset in _header_offsets(data):
        path.write_bytes(_patched(data, offset, field, value))
        scanned, python, slow = read_three(path)
        assert scanned == python == slow, offset


@compiled
def test_truncated_archives_read_the_same(tmp_path: Path) -> None:
    data = tar_bytes(members())
    path = tmp_path / "t.tar"
    for cut in (len(data) - 1024, _header_offsets(data)[7] + 700, 1024, 512, 511, 0):
        path.write_bytes(data[:cut])
        scanned, python, slow = read_three(path)
        assert scanned == python == slow, cut


NAMES = st.binary(min_size=1, max_size=12).filter(
    lambda n: n not in (b".", b"..") and b"/" not in n and b"\0" not in n)


@compiled
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(["file", "dir", "symlink", "link"]),
                          st.lists(NAMES, min_size=1, max_size=3),
                          st.integers(0, 3000)), max_size=12),
       st.sampled_from([tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT]),
       st.sampled_from([512, 2048, 1 << 20]))
def test_generated_archives_read_the_same(spec: list[tuple[str, list[bytes], int]],
                                          fmt: int, read_size: int) -> None:
    entries: list[M] = []
    files: list[str] = []
    for kind, parts, size in spec:
        name = b"/".join(parts).decode("utf-8", "surrogateescape")
        if kind == "file":
            entries.append(file(name, bytes([size % 251]) * size, mode=0o640 + size % 8,
                                uid=size, gid=size * 7, mtime=size * 99_999))
            files.append(name)
        elif kind == "dir":
            entries.append(dir_(name + "/" * (size % 2)))
        elif kind == "symlink":
            entries.append(symlink(name, "t" * (1 + size % 150)))
        elif files:
            entries.append(hardlink(name, files[size % len(files)]))
    try:
        data = tar_bytes(entries, fmt)
    except (ValueError, UnicodeEncodeError):
        return  # a name or number this format cannot hold
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "t.tar"
        path.write_bytes(data)
        scanned, python, slow = read_three(path, read_size=read_size)
    assert scanned == python == slow


@compiled
def test_scan_rows_and_where_it_stops() -> None:
    assert TARSCAN is not None
    data = tar_bytes([dir_("d/"), file("d/a", b"x" * 600, mode=0o4755, uid=3, gid=4,
                                       mtime=5), symlink("d/s", "a"), file("d/b", b"b")],
                     tarfile.USTAR_FORMAT)
    rows, at = TARSCAN.scan(data, 0, 0, len(data))
    assert rows == [(b"d", True, 0o755, 0, 0, 1_600_000_000, 0, 512),
                    (b"d/a", False, 0o4755, 3, 4, 5, 600, 1024)]
    assert at == 1024 + 1024  # the symlink is the Python reader's
    rows, at = TARSCAN.scan(data, 0, at + 512, len(data))
    assert [row[0] for row in rows] == [b"d/b"] and at == 3584  # then the end block
    assert TARSCAN.scan(data, 0, at, len(data)) == ([], at)
    # A header outside the buffer, or past the file's end, is not read.
    assert TARSCAN.scan(data[:511], 0, 0, len(data)) == ([], 0)
    assert TARSCAN.scan(data, 512, 0, len(data)) == ([], 0)
    assert TARSCAN.scan(data, 0, 0, 511) == ([], 0)
    assert TARSCAN.scan(data[512:], 512, 512, len(data))[1] == 2048
    assert TARSCAN.scan(data, 0, 512, 1024 + 599) == ([], 512)  # its bytes past the end


@compiled
def test_scan_refuses_bad_arguments() -> None:
    assert TARSCAN is not None
    with pytest.raises(TypeError):
        TARSCAN.scan(bytearray(512), 0, 0, 512)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        TARSCAN.scan(b"", -1, 0, 0)
    with pytest.raises(TypeError):
        TARSCAN.scan(b"")  # type: ignore[call-arg]


@compiled
@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=0, max_size=2048), st.integers(0, 1500), st.integers(0, 4096))
def test_scan_of_any_bytes_stays_inside_them(data: bytes, offset: int,
                                             file_size: int) -> None:
    assert TARSCAN is not None
    rows, at = TARSCAN.scan(data, 0, offset, file_size)
    assert at >= offset
    for name, _, _, _, _, _, size, offset_data in rows:
        assert len(name) <= 100 and offset_data + size <= file_size
