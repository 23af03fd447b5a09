"""Read a tar archive (ustar, GNU, pax; plain, gzip, xz, zstd or bzip2) into a Tree.

What is kept: numeric owners (user and group *names* are ignored), permission bits
including setuid/setgid/sticky, mtimes to the nanosecond (exact pax ``mtime`` records),
device numbers, fifos, symlink targets as given, hardlinks, and xattrs from pax
``SCHILY.xattr.NAME`` records (raw value), ``LIBARCHIVE.xattr.NAME`` records
(URL-encoded name, base64 value) and text ACLs (``SCHILY.acl.*``, numeric ids only).
GNU sparse members (old GNU and pax 0.0/0.1/1.0) are expanded: holes become zero bytes
of content. Pax records become values in :mod:`~reprobuild.trees.tar_pax`.

How headers are read: for an uncompressed tar file, by
:mod:`~reprobuild.trees.tar_headers` (no per-member ``TarInfo``), which hands the archive
to ``tarfile`` from the first member it does not take plainly; compressed streams go to
``tarfile`` whole. Either way a member gives the same entry.

Where the bytes live: for an uncompressed tar file, regular members are read in place
(a :class:`~reprobuild.trees.region.FileRegion` of the archive, nothing copied); members of
a compressed tar, and sparse members, are copied once into a content-addressed
:class:`Spool` directory (file name = blake3 of the bytes, identical files stored once),
never held whole in memory. The archive and the spool must outlive the tree.

Hostile input is refused with an :class:`ImageError` that names the member, before any
image is written: absolute or ``..`` names, a member under a symlink (or a file), a path
given twice, a hardlink to a missing or later member, unknown member types.
Missing parent directories are created root:root 0755 with mtime ``implied_mtime_ns``.
"""

from __future__ import annotations

import atexit
import bz2
import contextlib
import gzip
import lzma
import os
import shutil
import tarfile
import tempfile
import zlib
from collections.abc import Iterator
from typing import IO, BinaryIO, NamedTuple, cast

import blake3
import zstandard

from reprobuild import native
from reprobuild.errors import ImageError
from reprobuild.trees.builder import TreeBuilder
from reprobuild.trees.region import FileRegion, Piece, file_region
from reprobuild.trees.tar_headers import BLOCK, Blocks, GiveUp, Header, next_header
from reprobuild.trees.tar_pax import TarHeader, member_xattrs, parse_pax_time
from reprobuild.trees.tree import (
    CHUNK,
    Content,
    Entry,
    EntryType,
    FileSource,
    Tree,
    canonical_relative_path,
    check_relative_path,
    sort_key,
)

COMPRESSION_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x1f\x8b", "gzip"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"BZh", "bzip2"),
)

# The compiled scan of plain members (_tarscan.c), None for the pure Python path.
_TARSCAN = native.load("reprobuild.trees._tarscan")
SCAN_READ_SIZE = 1 << 20  # headers read at once for the scan (small members between them)

_TYPES: dict[bytes, EntryType] = {
    tarfile.REGTYPE: EntryType.REGULAR,
    tarfile.AREGTYPE: EntryType.REGULAR,
    tarfile.CONTTYPE: EntryType.REGULAR,
    tarfile.GNUTYPE_SPARSE: EntryType.REGULAR,
    tarfile.DIRTYPE: EntryType.DIRECTORY,
    tarfile.SYMTYPE: EntryType.SYMLINK,
    tarfile.LNKTYPE: EntryType.HARDLINK,
    tarfile.CHRTYPE: EntryType.CHAR,
    tarfile.BLKTYPE: EntryType.BLOCK,
    tarfile.FIFOTYPE: EntryType.FIFO,
}

def detect_compression(head: bytes) -> str | None:
    """The compression of a stream from its first bytes (None: not compressed)."""
    for magic, name in COMPRESSION_MAGIC:
        if head.startswith(magic):
            return name
    return None


def open_decompressed(raw: BinaryIO, compression: str | None) -> BinaryIO:
    """Wrap ``raw`` in a streaming decompressor (the identity for ``None``)."""
    if compression is None:
        return raw
    if compression == "gzip":
        return cast(BinaryIO, gzip.GzipFile(fileobj=raw, mode="rb"))
    if compression == "xz":
        return cast(BinaryIO, lzma.LZMAFile(raw, "rb"))
    if compression == "bzip2":
        return cast(BinaryIO, bz2.BZ2File(raw, "rb"))
    if compression == "zstd":
        reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
        return cast(BinaryIO, reader)
    raise ImageError(f"unknown compression {compression!r}")


# -- where member bytes come from ------------------------------------------------------
class _Clamped:
    """A file whose ``read(n)`` never asks for more than is left in it.

    tarfile reads a pax or GNU long-name header's claimed size in one call, and a
    buffered read allocates what it is asked for first: a damaged size field of 8 GiB
    must not become an 8 GiB allocation. (The streaming mode used for compressed
    archives reads in small blocks already.)
    """

    def __init__(self, raw: BinaryIO, size: int) -> None:
        self._raw = raw
        self._size = size

    def read(self, n: int | None = -1) -> bytes:
        left = max(0, self._size - self._raw.tell())
        return self._raw.read(left if n is None or n < 0 else min(n, left))

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self._raw.seek(offset, whence)

    def tell(self) -> int:
        return self._raw.tell()


_ZEROS = bytes(CHUNK)
# What a damaged compressed stream raises while it is read through open_decompressed.
DECOMPRESS_ERRORS: tuple[type[Exception], ...] = (EOFError, OSError, zlib.error,
                                                  lzma.LZMAError, zstandard.ZstdError)


class Spool:
    """A content-addressed directory of file bytes (name = blake3 hex of the bytes)."""

    def __init__(self, directory: str | bytes | os.PathLike[str]) -> None:
        self.directory = os.fsencode(directory)
        os.makedirs(self.directory, exist_ok=True)

    def store(self, stream: IO[bytes], size: int | None, what: str) -> Content:
        """Copy ``size`` bytes (None: all) of ``stream`` into the spool; their Content."""
        hasher = blake3.blake3()
        try:
            fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=b".part-")
        except OSError as exc:
            raise self._error(exc) from None
        try:
            copied = 0
            with os.fdopen(fd, "wb") as out:
                while size is None or copied < size:
                    want = CHUNK if size is None else min(CHUNK, size - copied)
                    chunk = stream.read(want)
                    if not chunk:
                        if size is None:
                            break
                        raise ImageError(f"{what}: archive ended inside the member")
                    hasher.update(chunk)
                    try:
                        # Zero runs (a sparse member's holes) stay holes: a tar that
                        # claims terabytes of them must not fill the spool's disk.
                        if chunk == _ZEROS[:len(chunk)]:
                            out.seek(len(chunk), os.SEEK_CUR)
                        else:
                            out.write(chunk)
                    except OSError as exc:
                        raise self._error(exc) from None
                    copied += len(chunk)
                try:
                    out.truncate(copied)  # a trailing hole
                except OSError as exc:
                    raise self._error(exc) from None
            digest = hasher.digest()
            final = self.directory + b"/" + digest.hex().encode()
            if os.path.exists(final):
                os.unlink(tmp)
            else:
                os.replace(tmp, final)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return Content(copied, FileSource(final), digest)

    def _error(self, exc: OSError) -> ImageError:
        shown = self.directory.decode("utf-8", "backslashreplace")
        return ImageError(f"cannot spool archive contents into {shown}: {exc.strerror}",
                          hint="give the spool (TMPDIR) a writable place with enough room")


_default_spool: Spool | None = None


def default_spool() -> Spool:
    """A process-wide spool in a temporary directory, removed when the process exits."""
    global _default_spool
    if _default_spool is None:
        directory = tempfile.mkdtemp(prefix="reprobuild-spool-")
        atexit.register(shutil.rmtree, directory, True)
        _default_spool = Spool(directory)
    return _default_spool


# -- members ---------------------------------------------------------------------------
class Member(NamedTuple):
    """One archive member as a tree entry; for hardlinks ``link_target`` is the path."""

    name: str  # as written in the archive, for messages
    entry: Entry
    link_target: bytes | None = None


def _raw(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def _entry_of(info: TarHeader, path: bytes, kind: EntryType, what: str,
              content: Content | None = None) -> Entry:
    mtime_ns = (parse_pax_time(info.pax_headers["mtime"], what) if "mtime" in info.pax_headers
                else int(info.mtime) * 1_000_000_000)
    target = _raw(info.linkname) if kind is EntryType.SYMLINK else None
    if kind is EntryType.SYMLINK and not target:
        raise ImageError(f"{what}: symlink with an empty target")
    devices = kind in (EntryType.CHAR, EntryType.BLOCK)
    return Entry(
        path, kind, info.mode & 0o7777, int(info.uid), int(info.gid), mtime_ns,
        member_xattrs(info, what) if info.pax_headers else (), target=target,
        rdev_major=int(info.devmajor) if devices else 0,
        rdev_minor=int(info.devminor) if devices else 0, content=content)


def iter_members(path: bytes | str, *, what: str | None = None,
                 spool: Spool | None = None) -> Iterator[Member]:
    """The members of a tar file (any supported compression), in archive order.

    A regular member's bytes stay in place for an uncompressed archive, otherwise they
    are spooled before the member is yielded.
    """
    path = os.fsencode(path)
    what = what or path.decode("utf-8", "backslashreplace")
    with open(path, "rb") as raw:
        compression = detect_compression(raw.read(6))
        raw.seek(0)
        file_size = os.fstat(raw.fileno()).st_size
        taken = 0
        if compression is None:
            try:
                for member in _fast_members(raw.fileno(), path, what, file_size, spool):
                    taken += 1
                    yield member
                return
            except (GiveUp, OSError):
                pass  # tarfile decides, from the first member not yet taken
        try:
            stream = open_decompressed(raw, compression) if compression is not None \
                else cast(BinaryIO, _Clamped(raw, file_size))
            mode = "r:" if compression is None else "r|"
            with tarfile.open(fileobj=stream, mode=mode, encoding="utf-8",  # type: ignore[call-overload]
                              errors="surrogateescape") as archive:
                for index, info in enumerate(archive):
                    if index >= taken:
                        yield _member(archive, info, path, what,
                                      file_size if compression is None else None, spool)
        except (tarfile.TarError, EOFError, OSError, ValueError, zlib.error, lzma.LZMAError,
                zstandard.ZstdError) as exc:
            raise ImageError(f"{what}: not a readable tar archive ({exc})",
                             hint="give a tar file (plain, gzip, xz, zstd or bzip2)") from None


def _fast_members(fd: int, path: bytes, what: str, file_size: int,
                  spool: Spool | None) -> Iterator[Member]:
    """The members of the fast header parser (:class:`GiveUp` before a member it cannot
    read); runs of plain members (files and directories with no pax record) come from
    the compiled ``_tarscan.scan`` when it is built, the same members in fewer steps."""
    scan = _TARSCAN.scan if _TARSCAN is not None else None
    blocks = Blocks(fd, file_size, SCAN_READ_SIZE)
    offset = 0
    while True:
        if scan is not None and offset + BLOCK <= file_size:
            blocks.read(offset, BLOCK)  # the buffer holds this header
            rows, offset = scan(blocks.buffer, blocks.start, offset, file_size)
            if rows:
                yield from _scanned_members(rows, path, what, file_size, spool)
                continue
        found = next_header(blocks, offset)  # what the scan leaves: pax, links, the end
        if found is None:
            return
        header, offset = found
        yield _plain_member(header, path, what, file_size, spool)


def _scanned_members(rows: list[tuple[bytes, bool, int, int, int, int, int, int]],
                     path: bytes, what: str, file_size: int,
                     spool: Spool | None) -> Iterator[Member]:
    """:func:`_plain_member` of the headers ``_tarscan.scan`` read."""
    directory, regular = _DIRECTORY, _REGULAR
    for name, is_directory, mode, uid, gid, mtime, size, offset_data in rows:
        rel = canonical_relative_path(name)
        text = name.decode("utf-8", "surrogateescape")
        if rel is None:  # the root, or a name to check
            yield _member(None, Header(text, b"5" if is_directory else b"0", mode, uid, gid,
                                       mtime, size, "", 0, 0, {}, offset_data),
                          path, what, file_size, spool)
        elif is_directory:
            yield Member(text, Entry(rel, directory, mode & 0o7777, uid, gid,
                                     mtime * 1_000_000_000))
        else:
            yield Member(text, Entry(rel, regular, mode & 0o7777, uid, gid,
                                     mtime * 1_000_000_000, (),
                                     Content(size, FileRegion(path, (Piece(offset_data, size),)))))


def _plain_member(header: Header, path: bytes, what: str, file_size: int,
                  spool: Spool | None) -> Member:
    """:func:`_member` of a header the fast parser read, with the common members (a
    file or directory with no pax record) made here: the same entry, in fewer steps."""
    kind = _TYPES.get(header.type)
    if not header.pax_headers and (kind is _REGULAR or kind is _DIRECTORY):
        rel = canonical_relative_path(header.name.encode("utf-8", "surrogateescape"))
        if rel is not None:
            if kind is _DIRECTORY:
                return Member(header.name, Entry(rel, kind, header.mode & 0o7777, header.uid,
                                                 header.gid, header.mtime * 1_000_000_000))
            offset, size = header.offset_data, header.size
            if size > 0 and offset + size <= file_size:
                return Member(header.name, Entry(
                    rel, kind, header.mode & 0o7777, header.uid, header.gid,
                    header.mtime * 1_000_000_000, (),
                    Content(size, FileRegion(path, (Piece(offset, size),)))))
    return _member(None, header, path, what, file_size, spool)


_REGULAR, _DIRECTORY = EntryType.REGULAR, EntryType.DIRECTORY


def _member(archive: tarfile.TarFile | None, info: TarHeader, path: bytes, what: str,
            in_place_size: int | None, spool: Spool | None) -> Member:
    """``info`` as a member; a regular member's bytes stay in place when
    ``in_place_size`` (the size of the uncompressed archive) is given."""
    kind = _TYPES.get(info.type)
    raw_name = _raw(info.name)
    rel = canonical_relative_path(raw_name)
    if kind is None or rel is None or kind is EntryType.HARDLINK:
        return _checked_member(archive, info, path, what, in_place_size, spool)
    content = None
    if kind is EntryType.REGULAR:
        offset, size = info.offset_data, info.size
        if in_place_size is None or info.issparse() or size <= 0 or \
                offset + size > in_place_size:
            return _checked_member(archive, info, path, what, in_place_size, spool)
        content = Content(size, FileRegion(path, (Piece(offset, size),)))
    if not info.pax_headers and kind is not EntryType.SYMLINK:
        devices = kind is EntryType.CHAR or kind is EntryType.BLOCK
        return Member(info.name, Entry(
            rel, kind, info.mode & 0o7777, int(info.uid), int(info.gid),
            int(info.mtime) * 1_000_000_000, (), content, None,
            int(info.devmajor) if devices else 0, int(info.devminor) if devices else 0))
    label = f"{what}: member {info.name!r}"
    return Member(info.name, _entry_of(info, rel, kind, label, content))


def _checked_member(archive: tarfile.TarFile | None, info: TarHeader, path: bytes, what: str,
                    in_place_size: int | None, spool: Spool | None) -> Member:
    """:func:`_member` for every case, with the checks that name the member."""
    label = f"{what}: member {info.name!r}"
    kind = _TYPES.get(info.type)
    if kind is None:
        raise ImageError(f"{label} has an unsupported type {info.type!r}",
                         hint="only files, directories, links, devices and fifos are accepted")
    rel = check_relative_path(_raw(info.name), label)
    if kind is EntryType.HARDLINK:
        target = check_relative_path(_raw(info.linkname), label)
        return Member(info.name, _entry_of(info, rel, kind, label), target)
    content = None
    if kind is EntryType.REGULAR:
        if in_place_size is not None and not info.issparse():
            content = Content(info.size, file_region(
                path, ((info.offset_data, info.size),), file_size=in_place_size, what=label))
        else:
            assert archive is not None and isinstance(info, tarfile.TarInfo)
            data = archive.extractfile(info)
            assert data is not None
            with data:
                content = (spool or default_spool()).store(data, info.size, label)
    return Member(info.name, _entry_of(info, rel, kind, label, content))


def tree_from_tar(path: bytes | str, *, implied_mtime_ns: int = 0,
                  spool: Spool | None = None, what: str | None = None,
                  epoch: int | None = None) -> Tree:
    """The tree a tar file describes; with ``epoch``, normalised for it (as
    :func:`reprobuild.trees.load.load_tree` wants), else as the archive gives it.

    Raises :class:`ImageError` naming the member for hostile or unreadable input.
    """
    path = os.fsencode(path)
    what = what or path.decode("utf-8", "backslashreplace")
    members = list(iter_members(path, what=what, spool=spool))
    # The common tar (GNU tar --sort=name, ours, mmdebstrap's) is canonical already:
    # its entries make the tree as they are. Anything else takes the builder.
    clamp_ns = None if epoch is None else epoch * 1_000_000_000
    tree = _canonical_tree(members, implied_mtime_ns, clamp_ns)
    if tree is None:
        tree = _built_tree(members, what, implied_mtime_ns)
        if epoch is not None and not tree.is_normal(epoch=epoch):
            tree = tree.normalized(epoch=epoch)
    return tree


def _canonical_tree(members: list[Member], implied_mtime_ns: int,
                    clamp_ns: int | None) -> Tree | None:
    """The tree of ``members`` when each is an entry the tree keeps as it is: no path
    twice, every parent directory listed, a hardlink after the file it names; in
    canonical order, or put in it (mmdebstrap lists ``dev/`` before the root). None
    for the builder to decide (see :meth:`Tree.try_canonical`)."""
    root: Entry | None = None
    entries: list[Entry] = []
    append = entries.append
    by_path: dict[bytes, Entry] | None = None  # made at the first hardlink
    for member in members:
        entry = member.entry
        if member.link_target is not None:
            # The entry the builder makes: the metadata of the file the link names,
            # pointing at that file (a link to a link: at the file), an earlier member.
            if by_path is None:
                by_path = {e.path: e for e in entries}
            inode = by_path.get(member.link_target)
            if inode is not None and inode.type is EntryType.HARDLINK:
                inode = by_path.get(inode.target or b"")
            if inode is None or inode.type is not EntryType.REGULAR or not entry.path:
                return None
            entry = Entry(entry.path, EntryType.HARDLINK, inode.mode, inode.uid, inode.gid,
                          inode.mtime_ns, inode.xattrs, target=inode.path)
        if by_path is not None:
            by_path[entry.path] = entry
        if not entry.path:
            if root is not None or entry.type is not EntryType.DIRECTORY:
                return None
            root = entry
            continue
        append(entry)
    if root is None:
        root = Entry(b"", EntryType.DIRECTORY, 0o755, mtime_ns=implied_mtime_ns)
    tree = Tree.try_canonical(root, entries, clamp_ns=clamp_ns)
    if tree is None:  # perhaps only out of order: sorted, the builder's tree, or None
        entries.sort(key=_sort_key)
        tree = Tree.try_canonical(root, entries, clamp_ns=clamp_ns)
    return tree


def _sort_key(entry: Entry) -> bytes:
    return sort_key(entry.path)


def _built_tree(members: list[Member], what: str, implied_mtime_ns: int) -> Tree:
    builder = TreeBuilder(what=what, implied_mtime_ns=implied_mtime_ns)
    for member in members:
        if member.link_target is not None:
            builder.link(member.entry.path, member.link_target, member.name,
                         replace_existing=False)
        else:
            builder.add(member.entry, member.name)
    return builder.build()
