"""The writers' fast paths give the bytes of their general paths.

The EROFS, squashfs, cpio and tar writers read file bytes through
:class:`~reprobuild.images.contents.ContentStreamer` (one call per small file, one kept
descriptor per archive) and format common headers in one step. Each test here builds the
same image along both paths - contents from files, from a tar read in place, from
memory, and from a source only ``Content.chunks()`` knows; headers through the fast
formatter and through the general one - and asks for identical bytes.
"""

from __future__ import annotations

import gc
import io
import os
import random
import struct
from pathlib import Path
from typing import BinaryIO

import crc32c
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from reprobuild.errors import ImageError
from reprobuild.images import cpio, tar
from reprobuild.images.contents import ContentStreamer
from reprobuild.images.erofs import image as erofs
from reprobuild.images.erofs.layout import plan as erofs_plan
from reprobuild.images.erofs.metaarea import MetaArea
from reprobuild.images.erofs.ondisk import superblock_crc32c
from reprobuild.images.registry import ImageOptions
from reprobuild.images.squashfs import image as squashfs
from reprobuild.trees.region import file_region
from reprobuild.trees.tree import (
    BytesSource,
    Content,
    ContentSource,
    Entry,
    EntryType,
    FileSource,
    Tree,
)

EPOCH = 1_700_000_000
NS = EPOCH * 1_000_000_000
OPTIONS = {"erofs": ImageOptions(epoch=EPOCH, uuid="6a7e0c52-61d4-4f0e-9c3b-2f0a8f5d1e42"),
           "tar": ImageOptions(epoch=EPOCH), "cpio": ImageOptions(epoch=EPOCH),
           "squashfs": ImageOptions(epoch=EPOCH, compress="zstd", block_size=4096,
                                    extra=(("threads", 2),))}
WRITERS = {"erofs": erofs.write, "tar": tar.write, "cpio": cpio.write,
           "squashfs": squashfs.write}
READERS = {"erofs": erofs.read, "tar": tar.read, "cpio": cpio.read, "squashfs": squashfs.read}


class OpaqueSource:
    """Bytes only ``Content.chunks()`` can read (the general path), a few at a time."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def open(self) -> BinaryIO:
        return io.BufferedReader(io.BytesIO(self.data), 7)  # type: ignore[arg-type]


def file_bytes() -> dict[bytes, bytes]:
    """Files around every boundary: empty, inline tails, whole 4 KiB blocks, tar's and
    cpio's small-file limit (256 KiB), a 1 MiB read chunk, zero blocks."""
    rng = random.Random(13)
    sizes = [0, 1, 3, 100, 4095, 4096, 4097, 8192 + 5, (1 << 18) - 1, 1 << 18,
             (1 << 18) + 1, (1 << 20) + 3000]
    files = {b"d/f%02d" % i: rng.randbytes(size) for i, size in enumerate(sizes)}
    files[b"zeros"] = bytes(3 * 4096 + 10)
    files[b"d/same-as-f03"] = files[b"d/f03"]  # squashfs: a duplicate
    return files


def tree_of(contents: dict[bytes, Content]) -> Tree:
    """One tree shape, whatever the contents' sources: files, a hardlink, a symlink, a
    device, a long name (tar's pax path), an owner only extended EROFS inodes hold."""
    tree = Tree(Entry(b"", EntryType.DIRECTORY, 0o755, mtime_ns=NS))
    tree.add(Entry(b"d", EntryType.DIRECTORY, 0o755, mtime_ns=NS))
    for path in sorted(contents):
        uid = 70_000 if path == b"d/f02" else 0
        tree.add(Entry(path, EntryType.REGULAR, 0o644, uid, uid, NS, content=contents[path]))
    tree.add(Entry(b"d/link", EntryType.HARDLINK, 0o644, mtime_ns=NS, target=b"d/f04"))
    tree.add(Entry(b"d/sym", EntryType.SYMLINK, 0o777, mtime_ns=NS, target=b"f03"))
    tree.add(Entry(b"d/null", EntryType.CHAR, 0o666, mtime_ns=NS, rdev_major=1,
                   rdev_minor=3))
    tree.add(Entry(b"d/" + b"n" * 120, EntryType.REGULAR, 0o600, mtime_ns=NS,
                   content=Content.from_bytes(b"long name")))
    return tree


def contents_from(kind: str, files: dict[bytes, bytes], tmp_path: Path
                  ) -> dict[bytes, Content]:
    if kind == "bytes":
        return {p: Content(len(d), BytesSource(d)) for p, d in files.items()}
    if kind == "opaque":
        return {p: Content(len(d), OpaqueSource(d)) for p, d in files.items()}
    if kind == "files":
        found = {}
        for path, data in files.items():
            on_disk = tmp_path / "files" / path.decode()
            on_disk.parent.mkdir(parents=True, exist_ok=True)
            on_disk.write_bytes(data)
            found[path] = Content(len(data), FileSource(os.fsencode(on_disk)))
        return found
    assert kind == "tar"  # members read in place: FileRegion contents
    archive = tmp_path / "contents.tar"
    with archive.open("wb") as output:
        tar.write(tree_of(contents_from("bytes", files, tmp_path)), output,
                  ImageOptions(epoch=EPOCH))
    from_tar = tar.read(str(archive))
    found = {}
    for path in files:
        entry = from_tar.get(path)
        assert entry is not None and entry.content is not None
        assert type(entry.content.source).__name__ == "FileRegion"
        found[path] = entry.content
    return found


def image(fmt: str, tree: Tree) -> bytes:
    out = io.BytesIO()
    WRITERS[fmt](tree, out, OPTIONS[fmt])
    return out.getvalue()


@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_every_content_source_gives_the_same_image(fmt: str, tmp_path: Path) -> None:
    files = file_bytes()
    general = image(fmt, tree_of(contents_from("opaque", files, tmp_path)))
    for kind in ("bytes", "files", "tar"):
        assert image(fmt, tree_of(contents_from(kind, files, tmp_path))) == general, kind
    written = tmp_path / f"image.{fmt}"
    written.write_bytes(general)
    back = READERS[fmt](str(written))
    for path, data in files.items():
        entry = back.get(path)
        assert entry is not None and entry.content is not None
        assert entry.content.read() == data, path


@pytest.mark.parametrize("fmt", ["cpio", "tar"])
def test_large_files_copied_by_the_kernel_give_the_same_archive(
        fmt: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Into a plain file, files over the small-file limit go by copy_file_range (from
    files and from a tar in place); into a compressor or memory they stream."""
    files = file_bytes()
    general = image(fmt, tree_of(contents_from("opaque", files, tmp_path)))
    copies: list[int] = []
    copy_file_range = os.copy_file_range

    def counted(src: int, dst: int, count: int, offset_src: int | None = None) -> int:
        copies.append(count)
        return copy_file_range(src, dst, count, offset_src)

    monkeypatch.setattr(os, "copy_file_range", counted)
    for kind in ("files", "tar"):
        out = tmp_path / f"out-{kind}.{fmt}"
        with out.open("w+b") as output:
            WRITERS[fmt](tree_of(contents_from(kind, files, tmp_path)), output, OPTIONS[fmt])
            assert output.tell() == len(general)  # the buffered file knows where it is
        assert out.read_bytes() == general, kind
    assert len(copies) >= 4  # two files over the limit, from each source
    copies.clear()
    compressed = tmp_path / f"out.{fmt}.zst"
    with compressed.open("wb") as output:
        WRITERS[fmt](tree_of(contents_from("files", files, tmp_path)), output,
                     ImageOptions(epoch=EPOCH, compress="zstd"))
    assert zstandard.ZstdDecompressor().decompressobj().decompress(
        compressed.read_bytes()) == general
    assert copies == []  # never past the compressor


@pytest.mark.parametrize("fmt", ["cpio", "tar"])
@pytest.mark.parametrize("change", [-1, +1])
def test_a_large_file_that_changed_size_is_refused_when_copied(fmt: str, change: int,
                                                               tmp_path: Path) -> None:
    size = (1 << 18) + 10
    path = tmp_path / "f"
    path.write_bytes(b"x" * size)
    tree = Tree(Entry(b"", EntryType.DIRECTORY, 0o755, mtime_ns=NS))
    tree.add(Entry(b"f", EntryType.REGULAR, 0o644, mtime_ns=NS,
                   content=Content(size - change, FileSource(os.fsencode(path)))))
    with (tmp_path / "out").open("wb") as output, pytest.raises(ImageError, match="/f"):
        WRITERS[fmt](tree, output, OPTIONS[fmt])


def test_erofs_lz4_from_files_equals_the_general_path(tmp_path: Path) -> None:
    files = file_bytes()
    options = ImageOptions(epoch=EPOCH, compress="lz4")
    images = []
    for kind in ("opaque", "files"):
        out = io.BytesIO()
        erofs.write(tree_of(contents_from(kind, files, tmp_path)), out, options)
        images.append(out.getvalue())
    assert images[0] == images[1]


@pytest.mark.parametrize("fmt", sorted(WRITERS))
@pytest.mark.parametrize("change", [-1, +1])
def test_a_file_that_changed_size_is_refused(fmt: str, change: int, tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * 100)
    tree = Tree(Entry(b"", EntryType.DIRECTORY, 0o755, mtime_ns=NS))
    tree.add(Entry(b"f", EntryType.REGULAR, 0o644, mtime_ns=NS,
                   content=Content(100 - change, FileSource(os.fsencode(path)))))
    with pytest.raises(ImageError, match="/f"):
        image(fmt, tree)


def test_erofs_inodes_are_the_general_formatters(tmp_path: Path) -> None:
    """Compact inodes without xattrs are packed inline in the writer's loop; every inode
    in the image must be what the general ``_inode_header`` makes of its plan."""
    tree = tree_of(contents_from("files", file_bytes(), tmp_path))
    data = image("erofs", tree)
    layout = erofs_plan(tree, EPOCH)
    compact = [inode for inode in layout.inodes if not inode.extended]
    assert len(compact) > 10 and any(inode.extended for inode in layout.inodes)
    for inode in layout.inodes:
        record = erofs._inode_header(inode) + inode.xattr_ibody
        assert data[inode.offset:inode.offset + len(record)] == record, inode.entry.path


# -- the streamer itself ------------------------------------------------------------------
def streamed(reader: ContentStreamer, content: Content) -> bytes:
    chunks = list(reader.chunks(content))
    assert all(chunks) and all(len(c) <= reader.chunk_size for c in chunks)
    return b"".join(chunks)


def test_streamer_reads_regions_with_holes_in_order(tmp_path: Path) -> None:
    backing = tmp_path / "image"
    data = bytes(range(256)) * 64
    backing.write_bytes(data)
    pieces = [(4000, 3000), (None, 5000), (0, 10), (None, 1), (16000, 384)]
    expected = data[4000:7000] + bytes(5000) + data[:10] + bytes(1) + data[16000:]
    region = file_region(str(backing), pieces, file_size=len(data), what="t")
    content = Content(len(expected), region)
    assert content.read() == expected
    with ContentStreamer(1024) as reader:
        assert streamed(reader, content) == expected
        assert reader.whole(content) == expected
        single = Content(10, file_region(str(backing), [(20, 10)], file_size=len(data), what="t"))
        assert reader.whole(single) == data[20:30]
        assert len(reader._fds) == 1  # one descriptor for every region of the file


def test_streamer_refuses_a_truncated_backing_file(tmp_path: Path) -> None:
    backing = tmp_path / "image"
    backing.write_bytes(bytes(1000))
    content = Content(500, file_region(str(backing), [(600, 400)], file_size=1000, what="t"))
    backing.write_bytes(bytes(700))
    with ContentStreamer() as reader, pytest.raises(ImageError, match="ended inside"):
        streamed(reader, content)


@pytest.mark.parametrize("size", [0, 1, 4096, 100_000])
def test_streamer_reads_files_and_bytes_as_chunks_do(size: int, tmp_path: Path) -> None:
    data = random.Random(size).randbytes(size)
    path = tmp_path / "f"
    path.write_bytes(data)
    sources: list[ContentSource] = [FileSource(os.fsencode(path)), BytesSource(data),
                                    OpaqueSource(data)]
    with ContentStreamer(4096) as reader:
        for source in sources:
            content = Content(size, source)
            assert streamed(reader, content) == data == reader.whole(content)


def test_streamer_whole_shows_a_grown_file(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"y" * 50)
    with ContentStreamer() as reader:  # planned 40 bytes: more come back, never exactly 40
        assert len(reader.whole(Content(40, FileSource(os.fsencode(path))))) > 40


# -- headers ------------------------------------------------------------------------------
NAMES = st.binary(min_size=1, max_size=100).filter(lambda n: b"\0" not in n)


@settings(max_examples=300, deadline=None)
@given(name=NAMES, linkname=st.binary(max_size=100).filter(lambda n: b"\0" not in n),
       mode=st.integers(0, 0o7777), uid=st.integers(0, tar.MAX_ID),
       gid=st.integers(0, tar.MAX_ID), size=st.integers(0, tar.MAX_SIZE),
       mtime=st.integers(0, tar.MAX_MTIME), typeflag=st.sampled_from(b"0123456"),
       devmajor=st.integers(0, tar.MAX_ID), devminor=st.integers(0, tar.MAX_ID))
def test_tar_header_maker_equals_ustar_header(name: bytes, linkname: bytes, mode: int,
                                              uid: int, gid: int, size: int, mtime: int,
                                              typeflag: int, devmajor: int,
                                              devminor: int) -> None:
    fields = {"name": name, "mode": mode, "uid": uid, "gid": gid, "size": size,
              "mtime": mtime, "typeflag": bytes([typeflag]), "linkname": linkname,
              "devmajor": devmajor, "devminor": devminor}
    maker = tar.HeaderMaker()
    first = maker.header(**fields)  # type: ignore[arg-type]
    assert first == tar.ustar_header(**fields)  # type: ignore[arg-type]
    assert maker.header(**fields) == first  # type: ignore[arg-type]  # cached fields


def test_tar_plan_fast_and_general_members_agree() -> None:
    tree = tree_of(contents_from("bytes", {b"d/a": b"abc", b"d/f04": b"linked"}, Path()))
    entries = list(tree)
    maker = tar.HeaderMaker()
    for entry in entries:
        inode = tree.resolve(entry)
        link_to = entry.target if entry.type is EntryType.HARDLINK else None
        fast = tar.plan_member(entry, inode, epoch=EPOCH, link_to=link_to, headers=maker)
        general = tar.plan_member(entry, inode, epoch=EPOCH, link_to=link_to)
        assert fast.header == general.header, entry.path


def test_tar_plan_inline_members_equal_plan_member() -> None:
    """plan() makes the common member inline; every header is plan_member's."""
    tree = tree_of(contents_from("bytes", file_bytes(), Path()))
    tree.add(Entry(b"d/late", EntryType.REGULAR, 0o4755, 7, 8, NS + 10**9,  # clamped
                   content=Content.from_bytes(b"x")))
    tree.add(Entry(b"d/half", EntryType.REGULAR, 0o644, mtime_ns=NS - 5,  # a fraction
                   content=Content.from_bytes(b"y")))
    tree.add(Entry(b"d/xattr", EntryType.DIRECTORY, 0o755, xattrs=((b"user.a", b"1"),)))
    tree.add(Entry("d/é".encode(), EntryType.DIRECTORY, 0o700))  # not ASCII: pax path
    planned = tar.plan(tree, OPTIONS["tar"])
    general = [tar.plan_member(e, tree.resolve(e), epoch=EPOCH,
                               link_to=e.target if e.type is EntryType.HARDLINK else None)
               for e in tree]
    assert [m.header for m in planned] == [m.header for m in general]
    assert [m.content for m in planned] == [m.content for m in general]


@pytest.mark.parametrize("order", ["forward", "backward", "shuffled", "strided"])
def test_streamer_window_gives_each_piece_in_any_order(order: str, tmp_path: Path) -> None:
    """Pieces read in place through the read-ahead window are the file's bytes, in
    whatever order they are asked for, up to the file's very end."""
    data = random.Random(5).randbytes(3 * (1 << 18) + 77)
    path = tmp_path / "archive"
    path.write_bytes(data)
    pieces = [(offset, 1 + offset % 700) for offset in range(0, len(data) - 700, 611)]
    pieces.append((len(data) - 5, 5))
    if order == "backward":
        pieces.reverse()
    elif order == "shuffled":
        random.Random(6).shuffle(pieces)
    elif order == "strided":
        pieces = pieces[::3] + pieces[1::3] + pieces[2::3]
    with ContentStreamer() as reader:
        for offset, length in pieces:
            region = file_region(os.fsencode(path), ((offset, length),),
                                 file_size=len(data), what="test")
            assert reader.whole(Content(length, region)) == data[offset:offset + length]
    past_end = file_region(os.fsencode(path), ((len(data) - 5, 5),), file_size=len(data),
                           what="test")
    path.write_bytes(data[:-3])  # truncated since: the window must not hide it
    with ContentStreamer() as reader, pytest.raises(ImageError, match="ended inside"):
        reader.whole(Content(5, past_end))


def _reference_newc(name: bytes, fields: tuple[int, ...]) -> bytes:
    """newc as cpio(5) lays it out, field by field."""
    header = struct.pack("6s" + "8s" * 13, b"070701", *(b"%08X" % v for v in fields))
    header += name + b"\0"
    return header + bytes(-len(header) % 4)


@settings(max_examples=300, deadline=None)
@given(name=st.binary(min_size=1, max_size=300),
       values=st.lists(st.integers(0, 0xFFFFFFFF), min_size=9, max_size=9))
def test_newc_header_equals_the_field_by_field_layout(name: bytes, values: list[int]) -> None:
    ino, mode, uid, gid, nlink, mtime, size, major, minor = values
    made = cpio.newc_header(name, ino=ino, mode=mode, uid=uid, gid=gid, nlink=nlink,
                            mtime=mtime, filesize=size, rdevmajor=major, rdevminor=minor)
    assert made == _reference_newc(name, (ino, mode, uid, gid, nlink, mtime, size, 0, 0,
                                          major, minor, len(name) + 1, 0))


def test_newc_header_refuses_values_over_32_bits() -> None:
    with pytest.raises(ImageError, match="32 bits"):
        cpio.newc_header(b"x", ino=1, mode=0, uid=1 << 32, gid=0, nlink=1, mtime=0,
                         filesize=0)



@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=5000))
def test_erofs_superblock_checksum_is_the_crc32c_library_s(data: bytes) -> None:
    assert superblock_crc32c(data) == crc32c.crc32c(data)


def many_small_files(count: int = 3000) -> Tree:
    """Enough tail-packed files for a metadata area of ~100 blocks, some with xattrs
    (shared and inline), some compressible for lz4, one large."""
    rng = random.Random(7)
    tree = Tree(Entry(b"", EntryType.DIRECTORY, 0o755, mtime_ns=NS))
    for d in range(30):
        tree.add(Entry(b"d%02d" % d, EntryType.DIRECTORY, 0o755, mtime_ns=NS))
    for i in range(count):
        data = rng.randbytes(rng.randrange(1, 400)) if i % 3 else b"text " * (i % 2000)
        xattrs = ((b"user.shared", b"1"),) if i % 50 == 0 else (
            ((b"user.own%d" % i, b"v" * (i % 90)),) if i % 77 == 0 else ())
        tree.add(Entry(b"d%02d/f%05d" % (i % 30, i), EntryType.REGULAR, 0o644,
                       mtime_ns=NS if i % 11 else NS - 5, xattrs=xattrs,
                       content=Content.from_bytes(data)))
    return tree


@pytest.mark.parametrize("options", [
    ImageOptions(epoch=EPOCH, uuid="6a7e0c52-61d4-4f0e-9c3b-2f0a8f5d1e42"),
    ImageOptions(epoch=EPOCH),
    ImageOptions(epoch=EPOCH, compress="lz4"),
    ImageOptions(epoch=EPOCH, size=64 << 20, label="x"),
], ids=["given-uuid", "derived-uuid", "lz4", "sized"])
def test_erofs_metadata_written_as_blocks_complete(options: ImageOptions, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """To a file, the metadata area goes out a block at a time and few blocks are held;
    the image equals the one assembled whole in memory."""
    tree = many_small_files()
    in_memory = io.BytesIO()
    erofs.write(tree, in_memory, options)
    held: list[int] = []
    original = MetaArea.written

    def spy(self: MetaArea, index: int) -> None:
        original(self, index)
        held.append(len(self.blocks))

    monkeypatch.setattr(MetaArea, "written", spy)
    path = tmp_path / "image.erofs"
    with path.open("wb") as output:
        erofs.write(tree, output, options)
    assert path.read_bytes() == in_memory.getvalue()
    blocks = erofs_plan(tree, EPOCH, compress=options.compress == "lz4").data_blkaddr
    assert blocks > 50
    if options.compress is None:
        assert max(held) < blocks // 4


@pytest.mark.parametrize("fmt", ["erofs", "tar", "cpio"])
def test_writers_pause_the_collector_and_restore_it(fmt: str, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    states: list[bool] = []
    original = ContentStreamer.whole

    def spy(self: ContentStreamer, content: Content) -> bytes:
        states.append(gc.isenabled())
        return original(self, content)

    monkeypatch.setattr(ContentStreamer, "whole", spy)
    assert gc.isenabled()
    image(fmt, tree_of(contents_from("files", file_bytes(), tmp_path)))
    assert states and not any(states) and gc.isenabled()
    shrunk = tmp_path / "shrunk"
    shrunk.write_bytes(b"z" * 10)
    tree = Tree(Entry(b"", EntryType.DIRECTORY, 0o755, mtime_ns=NS))
    tree.add(Entry(b"f", EntryType.REGULAR, 0o644, mtime_ns=NS,
                   content=Content(20, FileSource(os.fsencode(shrunk)))))
    with pytest.raises(ImageError):
        image(fmt, tree)
    assert gc.isenabled()
