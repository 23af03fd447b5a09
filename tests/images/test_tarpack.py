"""The compiled tar helpers (reprobuild/images/_tarpack.c) give the pure Python path's bytes."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reprobuild import native
from reprobuild.errors import ImageError
from reprobuild.images import tar
from reprobuild.images.registry import ImageOptions
from reprobuild.trees.tree import Content, Entry, EntryType, FileSource, Tree
from tests.conftest import REPO
from tests.images.archive_trees import EPOCH, NS, sample_tree

TARPACK = native.load("reprobuild.images._tarpack")
# Without the extension only the test that it is built fails; the others compare it.
compiled = pytest.mark.skipif(TARPACK is None, reason="_tarpack.c not built (see above)")
OPTIONS = ImageOptions(epoch=EPOCH)
# Sizes around the 512-byte block and the small-file limit (read whole into the buffer).
EDGE_SIZES = (0, 1, 511, 512, 513, 4096, tar.SMALL_FILE - 1, tar.SMALL_FILE,
              tar.SMALL_FILE + 1)


@pytest.fixture
def pure_python(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(tar, "_TARPACK", None)
    yield


def both_paths(make: object) -> tuple[bytes, bytes]:
    """What ``make()`` returns with the compiled helpers, then without them."""
    assert callable(make)
    assert tar._TARPACK is not None
    compiled = make()
    saved, tar._TARPACK = tar._TARPACK, None
    try:
        python = make()
    finally:
        tar._TARPACK = saved
    return compiled, python


def tar_of(tree: Tree) -> bytes:
    out = io.BytesIO()
    tar.write(tree, out, OPTIONS)
    return out.getvalue()


def disk_tree(root: Path) -> Tree:
    """:func:`sample_tree` (every kind of entry, pax records, hardlinks, long and non-UTF-8
    names) plus files on disk at the block and small-file edges, hardlinked too."""
    tree = sample_tree()
    tree.add(Entry(b"disk", EntryType.DIRECTORY, 0o755, mtime_ns=EPOCH * NS))
    names = []
    for size in EDGE_SIZES:
        path = root / f"f{size}"
        path.write_bytes(bytes((i * 7 + size) % 251 for i in range(size)))
        name = b"disk/" + b"n" * (size % 150 + 1) + b"\xff%d" % size
        names.append(name)
        tree.add(Entry(name, EntryType.REGULAR, 0o640, size % 3, 70_000_000 if size == 1
                       else 4, (EPOCH - size) * NS, content=Content(
                           size, FileSource(os.fsencode(path)))))
    tree.add(Entry(b"disk/" + b"h" * 300, EntryType.HARDLINK, 0o640, target=names[3]))
    tree.add(Entry(b"disk/" + b"l" * 300, EntryType.SYMLINK, 0o777, target=b"x" * 300))
    return tree


def test_the_extension_is_built_in_the_test_environment() -> None:
    """CI must run the compiled path: setup.sh builds it (gcc and python3-dev)."""
    assert TARPACK is not None, "reprobuild/images/_tarpack.c was not built: run setup.sh"
    assert tar._TARPACK is TARPACK


def test_pure_python_variable_turns_it_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(native.PURE_PYTHON_VARIABLE, "1")
    assert native.load("reprobuild.images._tarpack") is None
    monkeypatch.setenv(native.PURE_PYTHON_VARIABLE, "0")
    assert native.load("reprobuild.images._tarpack") is TARPACK
    assert native.load("reprobuild.images._no_such_helper") is None


def test_forced_python_path_uses_no_compiled_code(pure_python: None, tmp_path: Path) -> None:
    maker = tar.HeaderMaker()
    assert maker.pack == maker.pack_python
    data = tar_of(disk_tree(tmp_path))
    assert data[:2] == b"./" and len(data) % tar.RECORD == 0


@compiled
def test_same_archive_both_ways(tmp_path: Path) -> None:
    compiled, python = both_paths(lambda: tar_of(disk_tree(tmp_path)))
    assert compiled == python
    for size in EDGE_SIZES:  # and the files' bytes are in it
        assert (tmp_path / f"f{size}").read_bytes()[:600] in compiled


def test_same_archive_both_ways_from_a_subprocess(tmp_path: Path) -> None:
    """The environment variable reaches a command; both give the same bytes."""
    (tmp_path / "src").mkdir()
    for size in EDGE_SIZES:
        (tmp_path / "src" / f"{size:07d}").write_bytes(b"%d" % size * (size // 2 + 1))
    digests = []
    for pure in ("0", "1"):
        out = tmp_path / f"out{pure}.tar"
        subprocess.run([sys.executable, "-m", "reprobuild", "image", "--format", "tar",
                        "--epoch", str(EPOCH), str(tmp_path / "src"), str(out),
                        "--store", str(tmp_path / "store")],
                       check=True, cwd=REPO, env={**os.environ,
                                                  native.PURE_PYTHON_VARIABLE: pure})
        digests.append(out.read_bytes())
    assert digests[0] == digests[1] and len(digests[0]) > sum(EDGE_SIZES)


@compiled
def test_same_plan_at_the_octal_limits() -> None:
    """Sizes, owners and times at and past what octal fields hold (pax records past)."""
    tree = Tree(Entry(b"", EntryType.DIRECTORY, 0o755, mtime_ns=EPOCH * NS))
    for index, (size, owner, seconds) in enumerate((
            (tar.MAX_SIZE, tar.MAX_ID, tar.MAX_MTIME), (tar.MAX_SIZE + 1, tar.MAX_ID + 1, 0),
            (8**12, 2**32 - 1, -1), (0, 0, EPOCH))):
        tree.add(Entry(b"f%d" % index, EntryType.REGULAR, 0o7777, owner, owner,
                       seconds * NS, content=Content(size, FileSource(b"/nonexistent"))))
    tree.add(Entry(b"dev", EntryType.BLOCK, 0o600, rdev_major=tar.MAX_ID,
                   rdev_minor=tar.MAX_ID))
    options = ImageOptions(epoch=tar.MAX_MTIME)
    compiled, python = both_paths(lambda: b"".join(m.header for m in tar.plan(tree, options)))
    assert compiled == python
    assert b"%011o\0" % tar.MAX_SIZE in compiled and b" size=%d\n" % (tar.MAX_SIZE + 1) in compiled


@compiled
@settings(max_examples=300, deadline=None)
@given(name=st.binary(max_size=120), linkname=st.binary(max_size=120),
       mode=st.integers(0, 0o7777), owner=st.integers(0, tar.MAX_ID),
       size=st.integers(0, tar.MAX_SIZE), mtime=st.integers(0, tar.MAX_MTIME),
       typeflag=st.sampled_from(b"0123456"), device=st.integers(0, tar.MAX_ID))
def test_ustar_equals_header_maker(name: bytes, linkname: bytes, mode: int, owner: int,
                                   size: int, mtime: int, typeflag: int,
                                   device: int) -> None:
    assert TARPACK is not None
    fields = (name, linkname, bytes([typeflag]), mode, owner, owner ^ 5, size, mtime,
              device, device // 3)
    header = TARPACK.ustar(*fields)
    assert header == tar.HeaderMaker().pack_python(*fields)
    assert len(header) == tar.BLOCK


@compiled
@pytest.mark.parametrize(("index", "value"), [
    (3, -1), (3, 8**7), (4, 8**7), (5, 2**64), (6, 8**11), (7, 8**11), (8, 8**7), (9, -5)])
def test_ustar_refuses_values_that_do_not_fit(index: int, value: int) -> None:
    assert TARPACK is not None
    fields: list[object] = [b"a", b"", b"0", 0o644, 0, 0, 0, 0, 0, 0]
    fields[index] = value
    with pytest.raises((ValueError, OverflowError)):
        TARPACK.ustar(*fields)


@compiled
def test_ustar_refuses_wrong_types() -> None:
    assert TARPACK is not None
    with pytest.raises(TypeError):
        TARPACK.ustar("a", b"", b"0", 0, 0, 0, 0, 0, 0, 0)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        TARPACK.ustar(b"a", b"", b"00", 0, 0, 0, 0, 0, 0, 0)
    with pytest.raises(TypeError):
        TARPACK.ustar(b"a")  # type: ignore[call-arg]


def file_member(path: Path | bytes, size: int, header: bytes = b"H" * 512) -> tar.TarMember:
    return tar.TarMember(header, Content(size, FileSource(os.fsencode(path))), b"f")


def append(buffer: bytearray, members: list[tar.TarMember], start: int = 0,
           limit: int = 1 << 30) -> tuple[int, int]:
    """append_members at the end of ``buffer``, cut to what it filled: (index, changed)."""
    assert TARPACK is not None
    index, fill, changed = TARPACK.append_members(buffer, len(buffer), members, start, limit,
                                                  tar.SMALL_FILE, FileSource)
    assert fill <= len(buffer)
    del buffer[fill:]
    return index, changed


@compiled
@pytest.mark.parametrize("size", EDGE_SIZES)
def test_append_members_pads_each_file_to_the_block(tmp_path: Path, size: int) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"\xa5" * size)
    buffer = bytearray(b"head")
    if size > tar.SMALL_FILE:  # a large file is Python's to copy
        assert append(buffer, [file_member(path, size)]) == (0, -1)
        assert buffer == b"head"
        return
    assert append(buffer, [file_member(path, size)]) == (1, -1)
    assert buffer == b"head" + b"H" * 512 + b"\xa5" * size + bytes(-size % 512)
    # One byte more than planned says the file grew; fewer that it shrank.
    assert append(bytearray(), [file_member(path, size - 1)] * 2)[1] == \
        (size if size else -1)
    if size + 10 <= tar.SMALL_FILE:
        assert append(bytearray(), [file_member(path, size + 10)] * 2) == (0, size)


@compiled
def test_append_members_stops_where_python_takes_over(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for name in ("a/1", "a/2", "b/1", "c"):
        (tmp_path / name).write_bytes(name.encode())
    directory = tar.TarMember(b"D" * 512, None, b"d")
    in_memory = tar.TarMember(b"M" * 512, Content.from_bytes(b"m"), b"m")
    members = [directory, file_member(tmp_path / "a/1", 3), file_member(tmp_path / "b/1", 3),
               file_member(tmp_path / "a/2", 3), in_memory, file_member(tmp_path / "c", 1)]
    buffer = bytearray()
    assert append(buffer, members) == (4, -1)  # the bytes in memory are Python's
    assert buffer == b"".join([b"D" * 512, b"H" * 512, b"a/1".ljust(512, b"\0"), b"H" * 512,
                               b"b/1".ljust(512, b"\0"), b"H" * 512,
                               b"a/2".ljust(512, b"\0")])
    assert append(buffer, members, 5) == (6, -1) and buffer.endswith(b"c" + bytes(511))
    assert append(bytearray(), members, 0, limit=1) == (1, -1)  # full after one member
    assert append(bytearray(), members, 6) == (6, -1)


@compiled
def test_append_members_opens_relative_paths(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "rel").write_bytes(b"r")
    buffer = bytearray()
    assert append(buffer, [file_member(b"rel", 1)]) == (1, -1)
    assert buffer[512:513] == b"r"


@compiled
def test_append_members_errors_leave_the_fill(tmp_path: Path) -> None:
    assert TARPACK is not None
    buffer = bytearray(b"kept")

    def fails(member: tar.TarMember) -> None:
        assert TARPACK is not None
        TARPACK.append_members(buffer, 4, [member], 0, 1 << 20, tar.SMALL_FILE, FileSource)

    for missing in (tmp_path / "missing", tmp_path / "no-dir" / "f"):
        with pytest.raises(FileNotFoundError) as raised:
            fails(file_member(missing, 3))
        assert raised.value.filename == os.fsencode(missing)
    with pytest.raises(IsADirectoryError):
        fails(file_member(tmp_path, 3))
    with pytest.raises(ValueError, match="null byte"):
        fails(file_member(b"a\0b", 3))
    with pytest.raises(TypeError):
        TARPACK.append_members(b"x", 0, [], 0, 1, 1, FileSource)  # type: ignore[arg-type]
    for fill, start in ((0, -1), (-1, 0), (len(buffer) + 1, 0)):
        with pytest.raises(ValueError, match="negative"):
            TARPACK.append_members(buffer, fill, [], start, 1, 1, FileSource)
    assert buffer[:4] == b"kept"
    small = bytearray(b"k")
    view = memoryview(small)  # an exported buffer cannot grow
    with pytest.raises(BufferError):
        TARPACK.append_members(small, 1, [file_member(tmp_path / "missing", 3)], 0, 1 << 20,
                               tar.SMALL_FILE, FileSource)
    view.release()
    assert small == b"k"
    assert append(buffer, [("not", "a member")]) == (0, -1)  # type: ignore[list-item]


@compiled
def test_append_members_fills_in_place_and_never_shrinks(tmp_path: Path) -> None:
    assert TARPACK is not None
    (tmp_path / "f").write_bytes(b"data")
    buffer = bytearray(b"\xee" * 4096)
    member = file_member(tmp_path / "f", 4)
    assert TARPACK.append_members(buffer, 100, [member], 0, 1 << 20, tar.SMALL_FILE,
                                  FileSource) == (1, 100 + 1024, -1)
    assert len(buffer) == 4096  # room enough: not resized
    assert buffer[:100] == b"\xee" * 100 and buffer[100:612] == b"H" * 512
    assert buffer[612:1124] == b"data" + bytes(508) and buffer[1124:] == b"\xee" * 2972
    assert TARPACK.append_members(buffer, 4000, [member], 0, 1 << 20, tar.SMALL_FILE,
                                  FileSource)[1] == 5024
    assert len(buffer) >= 5024 and buffer[4512:4516] == b"data"


@pytest.mark.parametrize("compiled", [True, False])
def test_a_file_that_changed_is_named(tmp_path: Path, compiled: bool,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    if not compiled:
        monkeypatch.setattr(tar, "_TARPACK", None)
    path = tmp_path / "f"
    path.write_bytes(b"12345")
    for planned in (4, 6):
        tree = Tree(Entry(b"", EntryType.DIRECTORY, 0o755))
        tree.add(Entry(b"grew", EntryType.REGULAR, 0o644,
                       content=Content(planned, FileSource(os.fsencode(path)))))
        with pytest.raises(ImageError, match="/grew: content is 5 bytes, expected"):
            tar_of(tree)


@compiled
@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(
    st.binary(min_size=1, max_size=99).filter(lambda n: b"/" not in n and n not in (b".", b"..")),
    st.booleans(), st.integers(0, 0o177777), st.integers(0, tar.MAX_ID + 2),
    st.integers(0, 2**64), st.integers(-2 * NS, 2**64), st.integers(0, tar.MAX_SIZE + 2),
    st.sampled_from([(), ((b"user.a", b"1"),)])), max_size=8, unique_by=lambda t: t[0]),
    st.sampled_from([0, EPOCH, tar.MAX_MTIME, 2**63 // NS + 1]))
def test_plan_of_generated_entries_is_the_same(
        spec: list[tuple[bytes, bool, int, int, int, int, int, tuple[tuple[bytes, bytes], ...]]],
        epoch: int) -> None:
    """plan_common hands every entry it does not take to Python: the same headers."""
    tree = Tree(Entry(b"", EntryType.DIRECTORY, 0o755, mtime_ns=EPOCH * NS))
    for name, is_dir, mode, uid, gid, mtime_ns, size, xattrs in sorted(spec):
        tree.add(Entry(name, EntryType.DIRECTORY if is_dir else EntryType.REGULAR,
                       mode & 0o7777, uid, gid, mtime_ns, xattrs,
                       content=None if is_dir else Content(size, FileSource(b"/x"))))

    def headers() -> bytes:
        try:
            return b"".join(m.header + m.path for m in tar.plan(tree, ImageOptions(epoch=epoch)))
        except (ImageError, ValueError, OverflowError) as exc:
            return type(exc).__name__.encode()

    compiled, python = both_paths(headers)
    assert compiled == python


@compiled
def test_plan_common_refuses_bad_arguments() -> None:
    assert TARPACK is not None
    members: list[object] = []
    for member_type in (int, type("WithDict", (tuple,), {})):
        with pytest.raises(TypeError, match="named tuple"):
            TARPACK.plan_common([], 0, 0, 1, 2, {}, member_type, members)
    with pytest.raises(TypeError, match="lists"):
        TARPACK.plan_common((), 0, 0, 1, 2, {}, tar.TarMember, members)
    with pytest.raises(ValueError, match="negative"):
        TARPACK.plan_common([], -1, 0, 1, 2, {}, tar.TarMember, members)
    with pytest.raises(AttributeError):
        TARPACK.plan_common([object()], 0, 0, 1, 2, {}, tar.TarMember, members)
    other_kind = SimpleNamespace(path=b"x", type=3, xattrs=())
    assert TARPACK.plan_common([other_kind], 0, 0, 1, 2, {}, tar.TarMember, members) == 0
    assert members == []


@pytest.mark.parametrize("compiled_path", [True, False])
def test_a_negative_owner_is_refused_both_ways(compiled_path: bool,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A pax uid of "-5" reads as -5: an ImageError naming the entry, never a bad field."""
    if not compiled_path:
        monkeypatch.setattr(tar, "_TARPACK", None)
    for uid, gid in ((-5, 0), (0, -1)):
        tree = Tree(Entry(b"", EntryType.DIRECTORY, 0o755))
        tree.add(Entry(b"f", EntryType.REGULAR, 0o644, uid, gid,
                       content=Content.from_bytes(b"x")))
        with pytest.raises(ImageError, match="/f: negative owner"):
            tar.plan(tree, OPTIONS)
