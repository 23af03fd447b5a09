"""cpio "newc" archives (Linux initramfs): same tree and epoch, same bytes, on any host.

The plan, computed before any byte is written:

* members in canonical order; the root is ``.``, other names are relative paths;
* inode numbers 1, 2, ... in canonical order; the paths of a hardlink group share the
  number of the group's first path; the file's bytes go with the *last* path of the
  group (earlier ones have size 0), which is what the kernel's initramfs unpacker and
  GNU cpio expect;
* nlink: the group size for regular files, 2 + subdirectories for directories, 1 else;
* mtimes are whole seconds, clamped to the epoch (fractions are dropped: newc has none);
  devmajor/devminor (the device of the archived file system) are 0, check is 0;
* the archive ends with ``TRAILER!!!`` and is zero-padded to a 512-byte block.

What newc cannot hold is refused with an ImageError naming the path: sizes, ids or mtimes
beyond 32 bits, names longer than PATH_MAX (4096 bytes with the NUL), a top-level file
named ``TRAILER!!!`` (it would end the archive), and xattrs (unless
the option ``xattrs = "ignore"`` is given, which drops them).
``compress = "zstd"`` or ``"gzip"`` compresses the whole archive, as the kernel accepts
for an initramfs (:mod:`reprobuild.images.archive_compress`).
"""

from __future__ import annotations

import importlib
import os
import struct
from dataclasses import dataclass
from typing import BinaryIO, NamedTuple, NoReturn

from reprobuild.errors import ImageError
from reprobuild.images.archive_compress import (
    check_compress,
    compressed_writer,
    compressor_identity,
)
from reprobuild.images.contents import ContentStreamer
from reprobuild.images.registry import ImageOptions
from reprobuild.images.tar import check_archive_options
from reprobuild.trees.builder import TreeBuilder
from reprobuild.trees.gcpause import collector_paused
from reprobuild.trees.region import file_region
from reprobuild.trees.tree import (
    S_IFMT_OF_TYPE,
    Content,
    Entry,
    EntryType,
    FileSource,
    Tree,
    check_relative_path,
    path_key,
)

VERSION = "1"

# Loaded by read() alone (with tarfile and the decompressors): writing needs no reader.
TAR_READER = "reprobuild.trees.tar_reader"

NEWC_MAGIC = b"070701"
CRC_MAGIC = b"070702"
# struct cpio_newc_header (cpio(5); kernel init/initramfs.c), 110 bytes, all fields
# 8 hex digits: c_magic[6] @0, c_ino @6, c_mode @14, c_uid @22, c_gid @30, c_nlink @38,
# c_mtime @46, c_filesize @54, c_devmajor @62, c_devminor @70, c_rdevmajor @78,
# c_rdevminor @86, c_namesize @94, c_check @102.
CPIO_NEWC_HEADER = struct.Struct("6s" + "8s" * 13)
NEWC_HEADER_SIZE = CPIO_NEWC_HEADER.size
TRAILER = b"TRAILER!!!"
PATH_MAX = 4096
U32 = 0xFFFFFFFF
BLOCK = 512
SMALL_FILE = 1 << 18  # files up to this size are read whole into the write buffer
WRITE_SIZE = 1 << 20


class CpioMember(NamedTuple):
    """One planned member: header and name (padded) and the data to follow."""

    header: bytes
    content: Content | None  # regular file data or None
    inline: bytes  # symlink target (written as data)
    path: bytes


# The whole header in one formatting operation: CPIO_NEWC_HEADER's layout, for values
# that fit 32 bits (the plan checks them).
NEWC_FORMAT = NEWC_MAGIC + b"%08X" * 13
# NUL terminator and padding after a name of each length modulo 4: the 110-byte header
# plus the name plus these end on a multiple of 4.
_PADDING = (b"", b"\0", b"\0\0", b"\0\0\0")
NAME_END = tuple(b"\0" * (1 + (-(NEWC_HEADER_SIZE + n + 1) % 4)) for n in range(4))


def newc_header(name: bytes, *, ino: int, mode: int, uid: int, gid: int, nlink: int,
                mtime: int, filesize: int, rdevmajor: int = 0, rdevminor: int = 0) -> bytes:
    """Header plus NUL-terminated name, padded to a multiple of 4 bytes."""
    fields = (ino, mode, uid, gid, nlink, mtime, filesize, 0, 0, rdevmajor, rdevminor,
              len(name) + 1, 0)
    if max(fields) > U32 or min(fields) < 0:
        raise ImageError(f"cpio: a header field of {name!r} does not fit 32 bits")
    return NEWC_FORMAT % fields + name + NAME_END[len(name) % 4]


def _check_u32(entry: Entry, inode: Entry, mtime: int, size: int) -> None:
    """Refuse, naming the entry, a value newc's 32-bit hex fields cannot hold."""
    for what, value in (("uid", inode.uid), ("gid", inode.gid), ("mtime", mtime),
                        ("size", size), ("device major", entry.rdev_major),
                        ("device minor", entry.rdev_minor)):
        if not 0 <= value <= U32:
            raise ImageError(f"{entry.display()}: {what} {value} does not fit in a cpio "
                             "newc header", hint="newc holds 32-bit sizes, ids and times")


def plan(tree: Tree, options: ImageOptions) -> list[CpioMember]:
    """Every member's header in archive order (no file bytes read)."""
    check_archive_options(options, "cpio")
    ignore_xattrs = options.get("xattrs") == "ignore"
    groups = tree.hardlink_groups()
    group_of: dict[bytes, list[bytes]] = {}
    for paths in groups.values():
        ordered = sorted(paths, key=path_key)
        for path in ordered:
            group_of[path] = ordered
    inode_of: dict[bytes, int] = {}
    subdirs: dict[bytes, int] = {}
    directory, symlink, regular = EntryType.DIRECTORY, EntryType.SYMLINK, EntryType.REGULAR
    for entry in tree:
        if entry.type is directory and entry.path:
            parent = entry.path.rpartition(b"/")[0]
            subdirs[parent] = subdirs.get(parent, 0) + 1
    members: list[CpioMember] = []
    epoch_ns = options.epoch * 1_000_000_000
    s_ifmt = {kind._name_: bits for kind, bits in S_IFMT_OF_TYPE.items()}  # str keys hash fast
    next_ino = 1
    append = members.append
    hardlink = EntryType.HARDLINK
    for entry in tree:
        path = entry.path
        kind = entry.type
        inode = tree.resolve(entry) if kind is hardlink else entry
        group = group_of.get(path) if group_of else None
        if group is None:  # an inode of its own: the next number
            ino = next_ino
            next_ino += 1
        else:  # a hardlink group: the number of its first path
            ino = inode_of.get(group[0], 0)
            if not ino:
                ino = inode_of[group[0]] = next_ino
                next_ino += 1
        if inode.xattrs and not ignore_xattrs:
            raise ImageError(f"{entry.display()}: cpio newc cannot store xattrs",
                             hint="drop them with the image option xattrs = \"ignore\"")
        name = path or b"."
        if name == TRAILER:
            raise ImageError(f"{entry.display()}: a top-level {TRAILER.decode()} would end "
                             "the archive", hint="rename it; newc cannot hold this name")
        if len(name) + 1 > PATH_MAX:
            raise ImageError(f"{entry.display()}: name of {len(name)} bytes is longer than "
                             "PATH_MAX")
        content = None
        inline = b""
        if kind is symlink:
            inline = entry.target or b""
            size = len(inline)
        elif inode.type is regular and (group is None or path == group[-1]):
            content = inode.content
            size = content.size if content is not None else 0
        else:
            size = 0
        nlink = (2 + subdirs.get(path, 0) if kind is directory
                 else len(group) if group else 1)
        mtime = min(inode.mtime_ns, epoch_ns) // 1_000_000_000
        if (inode.uid > U32 or inode.gid > U32 or size > U32 or mtime < 0 or mtime > U32
                or entry.rdev_major > U32 or entry.rdev_minor > U32):
            _check_u32(entry, inode, mtime, size)
        header = NEWC_FORMAT % (ino, s_ifmt[inode.type._name_] | inode.mode, inode.uid, inode.gid,
                                nlink, mtime, size, 0, 0, entry.rdev_major,
                                entry.rdev_minor, len(name) + 1, 0)
        append(CpioMember(header + name + NAME_END[len(name) % 4], content, inline, path))
    return members


def write(tree: Tree, output: BinaryIO, options: ImageOptions) -> None:
    """Write the newc archive of ``tree`` to ``output`` (compressed if asked)."""
    with collector_paused():
        members = plan(tree, options)
        with compressed_writer(output, check_compress(options.compress, "cpio")) as stream, \
                ContentStreamer() as reader:
            _write_members(members, stream, reader, uncompressed=stream is output)


def _write_members(members: list[CpioMember], output: BinaryIO,
                   reader: ContentStreamer, *, uncompressed: bool) -> None:
    """Headers, symlink targets and small files gather in one buffer, written a megabyte
    at a time; larger files are copied by the kernel into an uncompressed file, else
    stream through it."""
    total = 0
    pending = bytearray()
    whole = reader.whole
    for member in members:
        header, content, inline, _ = member
        pending += header
        if inline:
            pending += inline
            pending += _PADDING[-len(inline) % 4]
        elif content is not None and content.size <= SMALL_FILE:
            data = whole(content)
            if len(data) != content.size:
                _changed(member, len(data))
            pending += data
            pending += _PADDING[-len(data) % 4]
        elif content is not None:
            output.write(pending)
            total += len(pending)
            pending.clear()
            copied = None
            if uncompressed:  # a compressor's fileno() is the file under it
                output.flush()
                copied = reader.copy_to(content, output)
            data_size = copied or 0
            if copied is None:
                for chunk in reader.chunks(content):
                    output.write(chunk)
                    data_size += len(chunk)
            if data_size != content.size:
                _changed(member, data_size)
            pending += bytes(-data_size % 4)
            total += data_size
        if len(pending) >= WRITE_SIZE:
            output.write(pending)
            total += len(pending)
            pending.clear()
    pending += newc_header(TRAILER, ino=0, mode=0, uid=0, gid=0, nlink=1, mtime=0,
                           filesize=0)
    total += len(pending)
    pending += bytes(-total % BLOCK)
    output.write(pending)


def _changed(member: CpioMember, read: int) -> NoReturn:
    assert member.content is not None
    raise ImageError(f"/{member.path.decode(errors='replace')}: content is {read} bytes,"
                     f" expected {member.content.size}",
                     hint="do not modify the source tree during a build")


# -- reading ---------------------------------------------------------------------------
@dataclass(frozen=True)
class _Record:
    name: bytes
    fields: tuple[int, ...]
    data_offset: int


def _records(path: bytes) -> list[_Record]:
    """Every member header up to the trailer, each name and data range inside the file."""
    shown = path.decode("utf-8", "backslashreplace")
    records: list[_Record] = []
    with open(path, "rb") as archive:
        file_size = os.fstat(archive.fileno()).st_size
        offset = 0
        while True:
            head = archive.read(NEWC_HEADER_SIZE)
            if len(head) < NEWC_HEADER_SIZE or head[:6] not in (NEWC_MAGIC, CRC_MAGIC):
                raise ImageError(f"{shown}: no newc header at offset {offset}",
                                 hint="only newc (070701/070702) cpio archives are read")
            try:
                fields = tuple(int(field, 16) for field in CPIO_NEWC_HEADER.unpack(head)[1:])
            except ValueError:
                raise ImageError(f"{shown}: bad newc header at offset {offset}") from None
            namesize = fields[11]
            name_end = offset + NEWC_HEADER_SIZE + namesize
            if not 0 < namesize <= PATH_MAX or name_end > file_size:
                raise ImageError(f"{shown}: member at offset {offset} has a name of "
                                 f"{namesize} bytes, past PATH_MAX or the archive's end")
            raw_name = archive.read(namesize)
            if len(raw_name) != namesize or not raw_name.endswith(b"\0"):
                raise ImageError(f"{shown}: bad name at offset {offset}")
            name = raw_name[:-1]
            data_offset = name_end + (-name_end % 4)
            if name == TRAILER:
                return records
            if data_offset + fields[6] > file_size:
                raise ImageError(f"{shown}: member {name!r} claims {fields[6]} bytes, past "
                                 "the end of the archive", hint="the archive is truncated")
            records.append(_Record(name, fields, data_offset))
            offset = data_offset + fields[6]
            offset += -offset % 4
            archive.seek(offset)


def identity(options: ImageOptions) -> dict[str, str]:
    return compressor_identity(options.compress)


def _uncompressed(path: bytes) -> bytes:
    """``path`` itself, or a spooled, decompressed copy of a compressed archive."""
    tar_reader = importlib.import_module(TAR_READER)
    with open(path, "rb") as raw:
        compression = tar_reader.detect_compression(raw.read(6))
        if compression is None:
            return path
        raw.seek(0)
        try:
            with tar_reader.open_decompressed(raw, compression) as stream:
                content = tar_reader.default_spool().store(stream, None,
                                                           path.decode(errors="replace"))
        except tar_reader.DECOMPRESS_ERRORS as exc:
            raise ImageError(f"{path.decode(errors='replace')}: cannot decompress ({exc})"
                             ) from None
    assert isinstance(content.source, FileSource)
    return content.source.path


def read(path: str | bytes) -> Tree:
    """Read a newc archive (plain, or compressed like a kernel initramfs) into a tree.

    Contents stay in the archive file; a compressed archive is decompressed once into
    the spool directory first.
    """
    shown = os.fsencode(path).decode("utf-8", "backslashreplace")
    path = _uncompressed(os.fsencode(path))
    builder = TreeBuilder(what=shown)
    groups: dict[tuple[int, ...], list[tuple[bytes, _Record]]] = {}
    for record in _records(path):
        ino, mode, nlink = record.fields[0], record.fields[1], record.fields[4]
        label = f"{shown}: member {record.name!r}"
        rel = check_relative_path(record.name, label)
        kind = _kind(mode, label)
        if kind is EntryType.REGULAR and nlink > 1:
            groups.setdefault((record.fields[7], record.fields[8], ino), []).append(
                (rel, record))
            continue
        entry = _entry(path, rel, kind, record, label)
        builder.add(entry, record.name.decode("utf-8", "backslashreplace"))
    for links in groups.values():
        ordered = sorted(links, key=lambda item: path_key(item[0]))
        with_data = [r for _, r in links if r.fields[6]]
        record = with_data[-1] if with_data else links[-1][1]
        first = ordered[0][0]
        builder.add(_entry(path, first, EntryType.REGULAR, record, shown),
                    first.decode("utf-8", "backslashreplace"))
        for rel, _ in ordered[1:]:
            builder.link(rel, first, rel.decode("utf-8", "backslashreplace"),
                         replace_existing=False)
    return builder.build()


def _kind(mode: int, label: str) -> EntryType:
    kinds = {0o100000: EntryType.REGULAR, 0o040000: EntryType.DIRECTORY,
             0o120000: EntryType.SYMLINK, 0o020000: EntryType.CHAR,
             0o060000: EntryType.BLOCK, 0o010000: EntryType.FIFO,
             0o140000: EntryType.SOCKET}
    kind = kinds.get(mode & 0o170000)
    if kind is None:
        raise ImageError(f"{label} has an unknown file type (mode {mode:o})")
    return kind


def _entry(path: bytes, rel: bytes, kind: EntryType, record: _Record, label: str) -> Entry:
    _ino, mode, uid, gid, _nlink, mtime, size = record.fields[:7]
    content = None
    target = None
    if kind is EntryType.REGULAR:
        content = Content(size, file_region(path, ((record.data_offset, size),),
                                            file_size=os.path.getsize(path), what=label))
    elif kind is EntryType.SYMLINK:
        with open(path, "rb") as archive:
            archive.seek(record.data_offset)
            target = archive.read(size)
        if len(target) != size or not target:
            raise ImageError(f"{label}: bad symlink target")
    return Entry(rel, kind, mode & 0o7777, uid, gid, mtime * 1_000_000_000, content=content,
                 target=target, rdev_major=record.fields[9], rdev_minor=record.fields[10])
