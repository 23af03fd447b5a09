"""An output as a cache object, and back: a deterministic tar, zstd-compressed.

The archive is our own canonical pax tar (:mod:`reprobuild.images.tar`) of a tree whose
root holds one member, ``out``: the output itself, a file, a symlink or a directory.
Owners are 0, every mtime is the output's epoch, so one output gives one archive on any
host; it is compressed by the pinned ``zstandard`` wheel at :data:`ZSTD_LEVEL`.

Unpacking trusts nothing: the compressed bytes are hashed and counted as they arrive
and must match the signed blake3 and size; the tar is then read by the hardened reader
(:mod:`reprobuild.trees.tar_reader`: no ``..``, no absolute names, nothing through a
symlink, no duplicates) and written out without ever following a symlink; device
nodes, fifos and sockets are refused, as they are in any output.
"""

from __future__ import annotations

import os
import stat
import tarfile
from dataclasses import dataclass
from typing import BinaryIO, Protocol, cast

import blake3
import zstandard

from reprobuild.cache.layout import ObjectInfo
from reprobuild.errors import ReprobuildError
from reprobuild.images import tar
from reprobuild.images.registry import ImageOptions
from reprobuild.trees.directory import tree_from_directory
from reprobuild.trees.region import FileRegion
from reprobuild.trees.tar_reader import Spool, tree_from_tar
from reprobuild.trees.tree import Content, Entry, EntryType, FileSource, Tree

ZSTD_LEVEL = 3
"""Pinned: the object bytes (and so their name) depend on it and on libzstd's version."""
CHUNK = 1 << 20
TOP = b"out"


class Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


class ObjectError(ReprobuildError):
    """A cache object that does not match its metadata or cannot be an output."""


class _Sink:
    """A writable stream that hashes and counts what passes through to ``output``."""

    def __init__(self, output: BinaryIO) -> None:
        self.output = output
        self.hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
        self.size = 0

    def write(self, data: bytes | memoryview) -> int:
        self.hasher.update(data)
        self.size += len(data)
        self.output.write(data)
        return len(data)

    def flush(self) -> None:
        self.output.flush()


def output_tree(path: str, *, epoch: int) -> Tree:
    """The tree of a store output placed at ``out`` under a root directory."""
    st = os.lstat(path)
    mtime = epoch * 1_000_000_000
    tree = Tree(Entry(b"", EntryType.DIRECTORY, 0o555, mtime_ns=mtime))
    if stat.S_ISLNK(st.st_mode):
        tree.add(Entry(TOP, EntryType.SYMLINK, 0o777, mtime_ns=mtime,
                       target=os.readlink(os.fsencode(path))))
    elif stat.S_ISREG(st.st_mode):
        tree.add(Entry(TOP, EntryType.REGULAR, stat.S_IMODE(st.st_mode), mtime_ns=mtime,
                       content=Content(st.st_size, FileSource(os.fsencode(path)))))
    elif stat.S_ISDIR(st.st_mode):
        for entry in tree_from_directory(path, epoch=epoch):
            moved = TOP + b"/" + entry.path if entry.path else TOP
            target = entry.target
            if entry.type is EntryType.HARDLINK and target is not None:
                target = TOP + b"/" + target
            tree.add(Entry(moved, entry.type, entry.mode, 0, 0, mtime, (), entry.content,
                           target))
    else:
        raise ObjectError(f"{path} is not a file, symlink or directory")
    return tree


def pack(path: str, epoch: int, destination: str) -> ObjectInfo:
    """Write the object of the output at ``path`` to the file ``destination``."""
    tree = output_tree(path, epoch=epoch)
    with open(destination, "wb") as raw:
        compressed = _Sink(raw)
        compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL, threads=0,
                                              write_content_size=False)
        with compressor.stream_writer(cast(BinaryIO, compressed), closefd=False) as stream:
            plain = _Sink(cast(BinaryIO, stream))
            tar.write(tree, cast(BinaryIO, plain), ImageOptions(epoch=epoch))
    return ObjectInfo(compressed.hasher.hexdigest(), compressed.size, plain.size, "zstd",
                      ZSTD_LEVEL)


class _Arriving:
    """The object's bytes as they arrive: hashed, counted, never more than signed."""

    def __init__(self, stream: Readable, expected: ObjectInfo, what: str) -> None:
        self.stream, self.expected, self.what = stream, expected, what
        self.hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
        self.received = 0

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(CHUNK if size < 0 else size)
        self.received += len(data)
        if self.received > self.expected.size:
            raise ObjectError(f"{self.what}: object is longer than the signed "
                              f"{self.expected.size} bytes")
        self.hasher.update(data)
        return data

    def drain(self) -> None:
        while self.read(CHUNK):
            pass


def receive(stream: Readable, expected: ObjectInfo, tar_path: str, what: str) -> None:
    """Read an object from ``stream`` into an uncompressed tar at ``tar_path``.

    The compressed bytes are hashed while they arrive; more or fewer bytes than signed,
    another hash, or more tar bytes than signed raise :class:`ObjectError`. Bytes are
    decompressed a bounded chunk at a time, so a decompression bomb costs no memory.
    """
    source = _Arriving(stream, expected, what)
    reader = zstandard.ZstdDecompressor().stream_reader(
        cast(BinaryIO, source), read_size=CHUNK, read_across_frames=True)
    written = 0
    broken: str | None = None  # reported after the hash check, which names the real fault
    with open(tar_path, "wb") as out:
        try:
            while chunk := reader.read(CHUNK):
                written += len(chunk)
                if written > expected.real_size:
                    broken = f"it unpacks to more than the signed {expected.real_size} bytes"
                    break
                out.write(chunk)
        except zstandard.ZstdError as exc:
            broken = str(exc)
    source.drain()
    if source.received != expected.size:
        raise ObjectError(f"{what}: object is truncated: {source.received} of "
                          f"{expected.size} bytes arrived")
    actual = source.hasher.hexdigest()
    if actual != expected.blake3:
        raise ObjectError(f"{what}: object hashes to blake3 {actual}, the metadata says "
                          f"{expected.blake3}", hint="the cache holds another object "
                          "under this name; it is rotten or was tampered with")
    if broken is not None:
        raise ObjectError(f"{what}: object cannot be unpacked: {broken}")
    if written != expected.real_size:
        raise ObjectError(f"{what}: object unpacks to {written} bytes, the metadata says "
                          f"{expected.real_size}")


@dataclass(frozen=True)
class _Place:
    """Where entries go: ``directory`` holds ``out``."""

    directory: bytes

    def path(self, tree_path: bytes) -> bytes:
        return self.directory + b"/" + tree_path


def unpack(tar_path: str, directory: str, what: str) -> str:
    """Write the output archived in ``tar_path`` as ``directory/out``; return that path.

    ``directory`` must be a fresh private directory. Refuses (with
    :class:`ObjectError`) any archive that is not one output.
    """
    _check_sizes(tar_path, what)
    try:
        # Nothing should need spooling (the tar is plain, without sparse members); if
        # anything does, it stays in the private work directory, never in /tmp.
        tree = tree_from_tar(tar_path, spool=Spool(os.path.join(directory, "spool")))
    except ReprobuildError as exc:
        raise ObjectError(f"{what}: refused archive: {exc.message}") from None
    names = [e.path for e in tree.children(b"")]
    if names != [TOP]:
        shown = ", ".join(n.decode(errors="replace") for n in names) or "nothing"
        raise ObjectError(f"{what}: archive holds {shown}, expected only {TOP.decode()}")
    place = _Place(os.fsencode(directory))
    for entry in tree:
        if entry.path:
            _write_entry(tree, entry, place, what)
    return os.fsdecode(place.path(TOP))


def _check_sizes(tar_path: str, what: str) -> None:
    """Refuse sparse members before the reader expands them: ours has none, and a sparse
    member can claim terabytes with a few bytes of archive."""
    try:
        with tarfile.open(tar_path, mode="r:") as archive:
            for info in archive:  # headers only: member data is skipped, not read
                if info.issparse():
                    raise ObjectError(f"{what}: member {info.name!r} is sparse (it claims "
                                      f"{info.size} bytes)", hint="reprobuild writes no "
                                      "sparse members; this archive was not made by copy")
    except (tarfile.TarError, OSError, ValueError) as exc:
        raise ObjectError(f"{what}: refused archive: not a readable tar ({exc})") from None


def _write_entry(tree: Tree, entry: Entry, place: _Place, what: str) -> None:
    """Create one entry; parents exist (canonical order) and are real directories."""
    path = place.path(entry.path)
    if entry.type is EntryType.DIRECTORY:
        os.mkdir(path, 0o755)
    elif entry.type is EntryType.REGULAR:
        assert entry.content is not None
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o755 if entry.mode & 0o111 else 0o644)
        with os.fdopen(fd, "wb") as out:
            written = _copy_content(entry.content, out)
        if written != entry.content.size:
            raise ObjectError(f"{what}: member {entry.display()} is truncated")
    elif entry.type is EntryType.SYMLINK:
        assert entry.target is not None
        os.symlink(entry.target, path)  # noqa: PTH211 - bytes, never followed
    elif entry.type is EntryType.HARDLINK:
        assert entry.target is not None
        primary = tree.get(entry.target)
        if primary is None or primary.type is not EntryType.REGULAR:
            raise ObjectError(f"{what}: hardlink {entry.display()} names no regular file")
        os.link(place.path(entry.target), path, follow_symlinks=False)
    else:
        raise ObjectError(f"{what}: member {entry.display()} is a {entry.type.value}; an "
                          "output holds only regular files, directories and symlinks")


def _copy_content(content: Content, out: BinaryIO) -> int:
    """Copy a member's bytes; pieces of the tar read in place are copied by the kernel."""
    source = content.source
    if not isinstance(source, FileRegion):
        written = 0
        for chunk in content.chunks(CHUNK):
            out.write(chunk)
            written += len(chunk)
        return written
    out.flush()
    written = 0
    with open(source.path, "rb") as tar_file:
        for piece in source.pieces:
            if piece.offset is None:  # a hole: zeros, like any other bytes of an output
                for start in range(0, piece.length, CHUNK):
                    out.write(bytes(min(CHUNK, piece.length - start)))
                out.flush()
                written += piece.length
                continue
            written += _copy_range(tar_file.fileno(), out.fileno(), piece.offset,
                                   piece.length)
    return written


def _copy_range(source: int, destination: int, offset: int, length: int) -> int:
    copied = 0
    while copied < length:
        count = os.copy_file_range(source, destination, min(length - copied, 1 << 30),
                                   offset + copied)
        if count == 0:
            break
        copied += count
    return copied
