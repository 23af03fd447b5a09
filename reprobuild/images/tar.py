"""Canonical POSIX pax tar: the same tree and epoch give the same bytes on any host.

Written by our own header code (not :mod:`tarfile`, whose output changed between Python
versions), from a plan computed first. The rules are those of GNU tar 1.34 run as
``tar --sort=name --format=pax --numeric-owner --mtime=@EPOCH --clamp-mtime
--pax-option=delete=atime,delete=ctime [--xattrs --xattrs-include='*'] -cf OUT -C ROOT .``
on the tree unpacked as root, and for such a tree the bytes are identical (a test checks
it), except that we sort xattrs by name where GNU tar keeps the file system's order:

* members in canonical order (root ``./`` first, depth-first, siblings bytewise), every
  name starting ``./``, directories ending in ``/``; a hardlink group's first path in
  canonical order carries the data and the xattrs, the others are link members
  (typeflag ``1``) naming it;
* ustar headers (magic ``ustar\\0``, version ``00``) with numeric owners only (uname and
  gname empty), mtimes clamped to the epoch, devmajor/devminor written as octal zeros
  for non-devices, no atime or ctime anywhere; the ustar prefix field is never used;
* a pax extended header only when a value does not fit: a name over 100 bytes or with
  non-ASCII bytes (``path``), a link target over 100 bytes (``linkpath``), a uid/gid over
  2097151, a size of 8 GiB or more, an mtime with a fraction of a second or out of range,
  xattrs (``SCHILY.xattr.NAME``). Records in the order linkpath, path, uid, gid, size,
  mtime, xattrs; names are raw bytes (no ``hdrcharset``, as GNU tar writes them). The pax
  header member is named ``DIR/PaxHeaders/NAME`` cut to 100 bytes, mode 0644, owner 0,
  mtime the epoch;
* the archive ends with two zero blocks and is padded to a 10240-byte record;
* ``compress = "zstd"`` or ``"gzip"`` compresses the whole stream
  (:mod:`reprobuild.images.archive_compress`).

Sockets cannot be stored in tar and are refused.
"""

from __future__ import annotations

import importlib
import struct
from collections.abc import Callable, Iterator
from typing import BinaryIO, NamedTuple, NoReturn, cast
from zlib import adler32

from reprobuild import native
from reprobuild.errors import ImageError
from reprobuild.images.archive_compress import (
    check_compress,
    compressed_writer,
    compressor_identity,
)
from reprobuild.images.contents import ContentStreamer
from reprobuild.images.registry import ImageOptions
from reprobuild.trees.gcpause import collector_paused
from reprobuild.trees.tree import Content, Entry, EntryType, FileSource, Tree, path_key

VERSION = "2"
# Loaded by read() alone: writing a tar needs no tar reader (nor tarfile, lzma, bz2).
TAR_READER = "reprobuild.trees.tar_reader"

BLOCK = 512
RECORD = 10240
NAME_MAX = 100
MAX_ID = 8**7 - 1
MAX_SIZE = 8**11 - 1
MAX_MTIME = 8**11 - 1

# struct posix_header (POSIX pax/ustar; GNU tar src/tar.h), 512 bytes:
# name[100] @0, mode[8] @100, uid[8] @108, gid[8] @116, size[12] @124, mtime[12] @136,
# chksum[8] @148, typeflag @156, linkname[100] @157, magic[6] @257, version[2] @263,
# uname[32] @265, gname[32] @297, devmajor[8] @329, devminor[8] @337, prefix[155] @345,
# padding[12] @500. Short strings are NUL-padded by "s".
POSIX_HEADER = struct.Struct("100s8s8s8s12s12s8sc100s6s2s32s32s8s8s155s12x")
CHKSUM_OFFSET = 148
TYPEFLAG: dict[EntryType, bytes] = {
    EntryType.REGULAR: b"0",
    EntryType.HARDLINK: b"1",
    EntryType.SYMLINK: b"2",
    EntryType.CHAR: b"3",
    EntryType.BLOCK: b"4",
    EntryType.DIRECTORY: b"5",
    EntryType.FIFO: b"6",
}
PAX_TYPEFLAG = b"x"
_TYPEFLAG_BY_NAME = {kind._name_: flag for kind, flag in TYPEFLAG.items()}  # str keys hash fast
SMALL_FILE = 1 << 18  # files up to this size are read whole into the write buffer
WRITE_SIZE = 1 << 20
_PADDING = tuple(bytes(n) for n in range(BLOCK))
SIZES_KEPT = 1 << 14  # distinct file sizes whose header field HeaderMaker remembers
# The compiled header packer and small-file copier (_tarpack.c), None for pure Python.
_TARPACK = native.load("reprobuild.images._tarpack")


class TarMember(NamedTuple):
    """One planned member: its header blocks (pax header included) and its data."""

    header: bytes
    content: Content | None
    path: bytes


def _octal(value: int, width: int) -> bytes:
    return b"%0*o\0" % (width - 1, value)


def pax_record(keyword: bytes, value: bytes) -> bytes:
    """One ``"LEN KEYWORD=VALUE\\n"`` record; LEN counts its own digits."""
    body = b" " + keyword + b"=" + value + b"\n"
    length = len(body) + 1
    while len(str(length)) + len(body) != length:
        length = len(str(length)) + len(body)
    return str(length).encode() + body


def format_pax_time(ns: int) -> bytes:
    sign = b"-" if ns < 0 else b""
    seconds, frac = divmod(abs(ns), 1_000_000_000)
    text = b"%d" % seconds
    if frac:
        text += b".%09d" % frac
        text = text.rstrip(b"0")
    return sign + text


def ustar_header(*, name: bytes, mode: int, uid: int, gid: int, size: int, mtime: int,
                 typeflag: bytes, linkname: bytes = b"", devmajor: int | None = 0,
                 devminor: int | None = 0) -> bytes:
    """A 512-byte ustar header with its checksum; every value must already fit.

    ``devmajor``/``devminor`` of None leave the fields empty (pax header members).
    """
    major = b"" if devmajor is None else _octal(devmajor, 8)
    minor = b"" if devminor is None else _octal(devminor, 8)
    header = POSIX_HEADER.pack(
        name, _octal(mode, 8), _octal(uid, 8), _octal(gid, 8), _octal(size, 12),
        _octal(mtime, 12), b" " * 8, typeflag, linkname, b"ustar\0", b"00", b"", b"",
        major, minor, b"")
    checksum = b"%06o\0 " % sum(header)
    return header[:CHKSUM_OFFSET] + checksum + header[CHKSUM_OFFSET + 8:]


class HeaderMaker:
    """:func:`ustar_header` for the common member, with the fields that repeat (mode,
    owners, mtime, type, device) formatted once per distinct combination and the
    checksum summed only over the name, link name and size; the same 512 bytes.

    :attr:`pack` is the fastest way to the same header: the compiled ``_tarpack.ustar``
    when it is built, else :meth:`pack_python`.
    """

    def __init__(self) -> None:
        self._fixed: dict[tuple[int, int, int, int, bytes, int, int],
                          tuple[bytes, bytes, bytes, int]] = {}
        self._sizes: dict[int, tuple[bytes, int]] = {}
        self.pack: Callable[[bytes, bytes, bytes, int, int, int, int, int, int, int],
                            bytes] = self.pack_python
        if _TARPACK is not None:
            self.pack = _TARPACK.ustar

    def pack_python(self, name: bytes, linkname: bytes, typeflag: bytes, mode: int,
                    uid: int, gid: int, size: int, mtime: int, devmajor: int,
                    devminor: int) -> bytes:
        """:meth:`make` with the compiled ``ustar``'s arguments."""
        return self.make(name, mode, uid, gid, size, mtime, typeflag, linkname, devmajor,
                         devminor)

    def header(self, *, name: bytes, mode: int, uid: int, gid: int, size: int, mtime: int,
               typeflag: bytes, linkname: bytes = b"", devmajor: int = 0,
               devminor: int = 0) -> bytes:
        return self.make(name, mode, uid, gid, size, mtime, typeflag, linkname, devmajor,
                         devminor)

    def make(self, name: bytes, mode: int, uid: int, gid: int, size: int, mtime: int,
             typeflag: bytes, linkname: bytes = b"", devmajor: int = 0,
             devminor: int = 0) -> bytes:
        """:meth:`header` with positional arguments (cheaper to call per member)."""
        key = (mode, uid, gid, mtime, typeflag, devmajor, devminor)
        fixed = self._fixed.get(key)
        if fixed is None:
            ids = _octal(mode, 8) + _octal(uid, 8) + _octal(gid, 8)
            times = _octal(mtime, 12)
            tail = (b"ustar\0" b"00" + bytes(64) + _octal(devmajor, 8) + _octal(devminor, 8)
                    + bytes(167))
            fixed = (ids, times, tail,
                     sum(ids) + sum(times) + sum(tail) + 8 * 0x20 + typeflag[0])
            self._fixed[key] = fixed
        ids, times, tail, fixed_sum = fixed
        sized = self._sizes.get(size)
        if sized is None:
            size_field = b"%011o\0" % size
            sized = (size_field, sum(size_field))
            if len(self._sizes) < SIZES_KEPT:
                self._sizes[size] = sized
        size_field, size_sum = sized
        name = name[:NAME_MAX]
        # sum(name), faster: adler32's low 16 bits are 1 + the byte sum modulo 65521,
        # and 100 bytes sum to at most 25500.
        checksum = fixed_sum + size_sum + (adler32(name) & 0xFFFF) - 1
        if linkname:
            linkname = linkname[:NAME_MAX]
            checksum += (adler32(linkname) & 0xFFFF) - 1
        return b"".join((name.ljust(NAME_MAX, b"\0"), ids, size_field, times,
                         b"%06o\0 " % checksum, typeflag, linkname.ljust(NAME_MAX, b"\0"),
                         tail))


def _member_name(entry: Entry) -> bytes:
    path = entry.path
    if entry.type is EntryType.DIRECTORY:
        return b"./" + path + b"/" if path else b"./"
    return b"./" + path


def pax_header_name(name: bytes) -> bytes:
    """``DIR/PaxHeaders/BASE`` of a member name, cut to the 100-byte name field."""
    bare = name.rstrip(b"/") or b"."
    directory, _, base = bare.rpartition(b"/")
    if not directory:
        directory, base = b".", bare
    return (directory + b"/PaxHeaders/" + base)[:NAME_MAX]


def plan_member(entry: Entry, inode: Entry, *, epoch: int, link_to: bytes | None,
                headers: HeaderMaker | None = None) -> TarMember:
    """Header blocks for ``entry``; ``inode`` holds the metadata (the hardlink primary)."""
    kind = entry.type
    if kind is EntryType.SOCKET:
        raise ImageError(f"{entry.display()}: tar cannot store a socket",
                         hint="remove sockets from the tree; they are made at run time")
    if link_to is not None:
        kind = EntryType.HARDLINK
    name = _member_name(entry)
    linkname = b"./" + link_to if link_to is not None else (entry.target or b"")
    content = inode.content if kind is EntryType.REGULAR else None
    size = content.size if content is not None else 0
    mtime_ns = min(inode.mtime_ns, epoch * 1_000_000_000)
    seconds, fraction = divmod(mtime_ns, 1_000_000_000)
    uid, gid = inode.uid, inode.gid
    if uid < 0 or gid < 0:
        raise ImageError(f"{entry.display()}: negative owner {uid}:{gid}",
                         hint="owners are numbers from 0 up; fix the source's uid and gid")
    devmajor, devminor = entry.rdev_major, entry.rdev_minor
    if devmajor > MAX_ID or devminor > MAX_ID:
        raise ImageError(f"{entry.display()}: device number {devmajor}:{devminor} does not"
                         " fit in tar")
    if (headers is not None and len(name) <= NAME_MAX and len(linkname) <= NAME_MAX
            and name.isascii() and uid <= MAX_ID and gid <= MAX_ID and size <= MAX_SIZE
            and not fraction and 0 <= seconds <= MAX_MTIME
            and (kind is EntryType.HARDLINK or not inode.xattrs)):
        # No pax record: the common member.
        return TarMember(headers.pack(
            name, linkname, _TYPEFLAG_BY_NAME[kind._name_], inode.mode & 0o7777, uid, gid,
            size, seconds, devmajor, devminor), content, entry.path)
    records: list[tuple[bytes, bytes]] = []
    if len(linkname) > NAME_MAX:
        records.append((b"linkpath", linkname))
    if len(name) > NAME_MAX or not name.isascii():
        records.append((b"path", name))
    if uid > MAX_ID:
        records.append((b"uid", b"%d" % uid))
        uid = 0
    if gid > MAX_ID:
        records.append((b"gid", b"%d" % gid))
        gid = 0
    header_size = size
    if size > MAX_SIZE:
        records.append((b"size", b"%d" % size))
        header_size = 0
    if fraction or not 0 <= seconds <= MAX_MTIME:
        records.append((b"mtime", format_pax_time(mtime_ns)))
        seconds = min(max(seconds, 0), MAX_MTIME)
    if kind is not EntryType.HARDLINK:
        for xname, xvalue in inode.xattrs:
            if b"=" in xname or b"\0" in xname or b"\n" in xname:
                raise ImageError(f"{entry.display()}: xattr name {xname!r} cannot be stored"
                                 " in a pax record")
            records.append((b"SCHILY.xattr." + xname, xvalue))
    header = ustar_header(
        name=name[:NAME_MAX], mode=inode.mode & 0o7777, uid=uid, gid=gid, size=header_size,
        mtime=seconds, typeflag=TYPEFLAG[kind], linkname=linkname[:NAME_MAX],
        devmajor=devmajor, devminor=devminor)
    if records:
        body = b"".join(pax_record(k, v) for k, v in records)
        pax = ustar_header(name=pax_header_name(name), mode=0o644, uid=0, gid=0,
                           size=len(body), mtime=min(max(epoch, 0), MAX_MTIME),
                           typeflag=PAX_TYPEFLAG, devmajor=None, devminor=None)
        header = pax + body + b"\0" * (-len(body) % BLOCK) + header
    return TarMember(header, content, entry.path)


def check_archive_options(options: ImageOptions, fmt: str) -> None:
    for name, value in (("size", options.size), ("uuid", options.uuid),
                        ("label", options.label), ("block_size", options.block_size)):
        if value is not None:
            raise ImageError(f"the {fmt} format has no {name.replace('_', ' ')}",
                             hint=f"leave out --{name.replace('_', '-')} for {fmt} images")
    check_compress(options.compress, fmt)


def plan(tree: Tree, options: ImageOptions) -> list[TarMember]:
    """Every member's headers in archive order (no file bytes read)."""
    check_archive_options(options, "tar")
    # The first path of a hardlink group in canonical order carries the data.
    first_of: dict[bytes, bytes] = {}
    for paths in tree.hardlink_groups().values():
        first = min(paths, key=path_key)
        for path in paths:
            first_of[path] = first
    members: list[TarMember] = []
    append = members.append
    headers = HeaderMaker()
    pack = headers.pack
    epoch = options.epoch
    clamp_ns = epoch * 1_000_000_000
    regular, directory = EntryType.REGULAR, EntryType.DIRECTORY
    entries = list(tree)
    plan_common = _TARPACK.plan_common if _TARPACK is not None and \
        0 <= clamp_ns < 1 << 63 else None  # the C code's clamp is a signed 64-bit value
    index, count = 0, len(entries)
    while index < count:
        if plan_common is not None:  # the common members below, compiled
            index = plan_common(entries, index, clamp_ns, regular, directory, first_of,
                                TarMember, members)
            if index == count:
                break
        entry = entries[index]
        index += 1
        path = entry.path
        kind = entry.type
        # The common member (a file or directory that needs no pax record), inline:
        # what plan_member would make of it, for a fraction of the cost per entry.
        if (kind is regular or kind is directory) and not entry.xattrs and \
                (not first_of or path not in first_of):
            name = b"./" + path + b"/" if kind is directory and path else b"./" + path
            content = entry.content if kind is regular else None
            size = content.size if content is not None else 0
            mtime_ns = entry.mtime_ns if entry.mtime_ns < clamp_ns else clamp_ns
            seconds, fraction = divmod(mtime_ns, 1_000_000_000)
            uid, gid = entry.uid, entry.gid
            if (len(name) <= NAME_MAX and name.isascii() and 0 <= uid <= MAX_ID
                    and 0 <= gid <= MAX_ID and size <= MAX_SIZE and not fraction
                    and 0 <= seconds <= MAX_MTIME):
                append(TarMember(pack(name, b"", b"0" if kind is regular else b"5",
                                      entry.mode & 0o7777, uid, gid, size, seconds, 0, 0),
                                 content, path))
                continue
        inode = tree.resolve(entry) if kind is EntryType.HARDLINK else entry
        group_first = first_of.get(path) if first_of else None
        link_to = group_first if group_first not in (None, path) else None
        append(plan_member(entry, inode, epoch=epoch, link_to=link_to, headers=headers))
    return members


def write(tree: Tree, output: BinaryIO, options: ImageOptions) -> None:
    """Write the canonical pax tar of ``tree`` to ``output`` (compressed if asked)."""
    with collector_paused():
        _write(plan(tree, options), output, options)


def _write(members: list[TarMember], output: BinaryIO, options: ImageOptions) -> None:
    total = 0
    with compressed_writer(output, check_compress(options.compress, "tar")) as stream, \
            ContentStreamer() as reader:
        # Headers and small files gather in one buffer, written a megabyte at a time.
        # It is filled from the start again after each write and never shrinks: a
        # cleared bytearray goes back to the allocator, and each megabyte would be
        # page-faulted in again (a fifth of the time of a tar of small files).
        pending = bytearray(WRITE_SIZE + SMALL_FILE + 2 * BLOCK)
        fill = 0
        whole = reader.whole
        # Runs of headers and small files on disk, compiled (called where such a run
        # starts): other sources and large files are written below.
        append_members = _TARPACK.append_members if _TARPACK is not None else None
        index, count = 0, len(members)
        while index < count:
            member = members[index]
            header, content, _ = member
            if append_members is not None and (content is None
                                               or type(content.source) is FileSource):
                start = index
                index, fill, changed = append_members(pending, fill, members, index,
                                                      WRITE_SIZE, SMALL_FILE, FileSource)
                if changed >= 0:
                    _changed(members[index], changed)
                if fill >= WRITE_SIZE:
                    total += _flush(stream, pending, fill)
                    fill = 0
                if index != start:
                    continue
                # Not taken (a large file): below.
            index += 1
            end = fill + len(header)
            pending[fill:end] = header  # grows the buffer if it must
            fill = end
            if content is None:
                continue
            size = content.size
            if size <= SMALL_FILE:
                data = whole(content)
                if len(data) != size:
                    _changed(member, len(data))
                padded = size + -size % BLOCK
                pending[fill:fill + size] = data
                pending[fill + size:fill + padded] = _PADDING[padded - size]
                fill += padded
            else:
                total += _flush(stream, pending, fill)
                fill = 0
                total += _write_content(member, stream, reader, uncompressed=stream is output)
            if fill >= WRITE_SIZE:
                total += _flush(stream, pending, fill)
                fill = 0
        total += fill
        end = 2 * BLOCK
        end += -(total + end) % RECORD
        pending[fill:fill + end] = bytes(end)
        _flush(stream, pending, fill + end)


def _flush(stream: BinaryIO, pending: bytearray, fill: int) -> int:
    """Write the first ``fill`` bytes of ``pending``; their count."""
    with memoryview(pending) as view, view[:fill] as filled:
        stream.write(filled)
    return fill


def _changed(member: TarMember, read: int) -> NoReturn:
    assert member.content is not None
    raise ImageError(f"/{member.path.decode(errors='replace')}: content is {read} bytes,"
                     f" expected {member.content.size}",
                     hint="do not modify the source tree during a build")


def _write_content(member: TarMember, output: BinaryIO, reader: ContentStreamer, *,
                   uncompressed: bool) -> int:
    assert member.content is not None
    written = None
    if uncompressed:  # a compressor's fileno() is the file under it: never copy there
        output.flush()
        written = reader.copy_to(member.content, output)
    if written is None:  # not a plain file to a plain file: through Python
        written = 0
        for chunk in reader.chunks(member.content):
            output.write(chunk)
            written += len(chunk)
    if written != member.content.size:
        _changed(member, written)
    padding = -written % BLOCK
    output.write(bytes(padding))
    return written + padding


def read(path: str | bytes) -> Tree:
    """Read a tar (ours or any other) back into a tree; contents stay in the archive."""
    return cast(Tree, importlib.import_module(TAR_READER).tree_from_tar(path))


def identity(options: ImageOptions) -> dict[str, str]:
    return compressor_identity(options.compress)


def iter_member_names(tree: Tree) -> Iterator[bytes]:
    """Member names in archive order (for listings and tests)."""
    for entry in tree:
        yield _member_name(entry)
