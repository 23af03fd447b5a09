"""Canonical outputs on disk: normalise like Nix, hash a tree, sync it, remove it.

An output is a regular file, a symlink or a directory of those. Canonical form: every
mtime is the epoch, regular files are 0444 or 0555 (any execute bit), directories 0555,
no setuid/setgid/sticky bits, no xattrs; ownership is ignored. The content hash is blake3
over a serialisation of the tree that depends on nothing else:

    node      = file | symlink | directory
    file      = b"F" + (b"x" | b"-") + u64le(size) + bytes
    symlink   = b"L" + u64le(len) + target
    directory = b"D" + u64le(count) + count * (u64le(len) + name + node)

with the header ``b"reprobuild-tree/1\\0"`` in front and names sorted bytewise.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import stat
import struct

import blake3

from reprobuild.errors import BuildError

HEADER = b"reprobuild-tree/1\0"
U64 = struct.Struct("<Q")
CHUNK = 1 << 20


def _display(path: bytes) -> str:
    return path.decode("utf-8", "backslashreplace")


def canonicalize(path: str | bytes, *, epoch: int, top_mode: bool = True) -> None:
    """Normalise the output at ``path`` in place; refuse anything but files, dirs, links.

    With ``top_mode=False`` the top directory keeps its mode (so it can still be renamed
    into the store by an unprivileged user; the caller sets it afterwards).
    """
    root = os.fsencode(path)
    _canon(root, root, epoch, top_mode=top_mode)


def _strip_xattrs(path: bytes) -> None:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return
    for name in names:
        with contextlib.suppress(OSError):
            os.removexattr(path, name, follow_symlinks=False)


def _canon(root: bytes, path: bytes, epoch: int, *, top_mode: bool) -> None:
    # Iterative (an output may be deeper than Python's recursion limit): a directory is
    # opened up on the way down and finished (xattrs, mode, time) after its entries.
    stack: list[tuple[bytes, bool]] = [(path, False)]
    while stack:
        node, finishing = stack.pop()
        if finishing:
            _strip_xattrs(node)
            if node != root or top_mode:
                os.chmod(node, 0o555)
            os.utime(node, ns=(epoch * 10**9, epoch * 10**9), follow_symlinks=False)
            continue
        mode = os.lstat(node).st_mode
        if stat.S_ISDIR(mode):
            if not mode & 0o200 or not mode & 0o100:
                os.chmod(node, 0o755)
            stack.append((node, True))
            # Sorted, so the first refused entry (and its error) is the same on every host.
            stack += [(node + b"/" + name, False)
                      for name in sorted(os.listdir(node), reverse=True)]
            continue
        if stat.S_ISREG(mode):
            _strip_xattrs(node)
            os.chmod(node, 0o555 if mode & 0o111 else 0o444)
        elif not stat.S_ISLNK(mode):
            _refuse_special(root, node, mode)
        os.utime(node, ns=(epoch * 10**9, epoch * 10**9), follow_symlinks=False)


def _refuse_special(root: bytes, path: bytes, mode: int) -> None:
    rel = _display(os.path.relpath(path, root)) if path != root else "the output"
    kind = "device node" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else (
        "fifo" if stat.S_ISFIFO(mode) else "socket")
    raise BuildError(f"output contains a {kind} at {rel}",
                     hint="outputs hold only regular files, directories and symlinks; "
                          "device nodes belong in an image's [files] overrides")


def hash_path(path: str | bytes) -> str:
    """The content hash (hex) of a file, symlink or directory tree, as described above."""
    hasher = blake3.blake3(HEADER)
    _hash(hasher, os.fsencode(path))
    return hasher.hexdigest()


def _hash(hasher: blake3.blake3, top: bytes) -> None:
    # Iterative, in the order a recursive pre-order walk would feed the hasher: each
    # directory's header, then per entry its name record followed by the entry itself.
    stack: list[bytes | tuple[bytes]] = [top]
    while stack:
        item = stack.pop()
        if isinstance(item, tuple):
            hasher.update(item[0])  # a name record
            continue
        path = item
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            target = os.readlink(path)
            hasher.update(b"L" + U64.pack(len(target)) + target)
        elif stat.S_ISREG(st.st_mode):
            _hash_file(hasher, path, st)
        elif stat.S_ISDIR(st.st_mode):
            names = sorted(os.listdir(path))
            hasher.update(b"D" + U64.pack(len(names)))
            for name in reversed(names):
                stack += [path + b"/" + name, (U64.pack(len(name)) + name,)]
        else:
            raise BuildError(f"{_display(path)} is not a regular file, directory or symlink")


def _hash_file(hasher: blake3.blake3, path: bytes, st: os.stat_result) -> None:
    hasher.update(b"F" + (b"x" if st.st_mode & 0o111 else b"-") + U64.pack(st.st_size))
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            hasher.update(chunk)
            size += len(chunk)
    if size != st.st_size:
        raise BuildError(f"{_display(path)} changed while it was being hashed")


SYNCFS_THRESHOLD = 64
"""Above this many regular files one syncfs() of the filesystem beats an fsync() each."""


def fsync_tree(path: str | bytes) -> None:
    """Make the data of every regular file under ``path`` durable.

    Directory entries are metadata, which journaling filesystems (ext4, xfs, btrfs)
    commit in order: the store's later rename of the metadata file cannot persist
    without the earlier renames and creations it depends on, so only file data needs an
    explicit sync before the entry is made valid.
    """
    files: list[bytes] = []
    _regular_files(os.fsencode(path), files)
    if len(files) > SYNCFS_THRESHOLD and _syncfs(os.fsencode(path)):
        return
    for file in files:
        fsync_path(file)


def _regular_files(top: bytes, found: list[bytes]) -> None:
    stack = [top]
    while stack:
        path = stack.pop()
        st = os.lstat(path)
        if stat.S_ISDIR(st.st_mode):
            names = os.listdir(path)  # nondet-ok: only fsynced, order irrelevant
            stack += [path + b"/" + name for name in names]
        elif stat.S_ISREG(st.st_mode):
            found.append(path)


def _syncfs(path: bytes) -> bool:
    """syncfs(2) the filesystem holding ``path``; False when unavailable."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        syncfs = libc.syncfs
    except (OSError, AttributeError):
        return False
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return bool(syncfs(fd) == 0)
    finally:
        os.close(fd)


def fsync_path(path: str | bytes) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_tree(path: str | bytes) -> None:
    """Delete a file or tree even when its directories are read-only (store outputs),
    without recursion (a tree may be deeper than Python's recursion limit)."""
    top = os.fsencode(path)
    try:
        st = os.lstat(top)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(top)
        return
    stack: list[tuple[bytes, bool]] = [(top, False)]
    while stack:
        directory, emptied = stack.pop()
        if emptied:
            os.rmdir(directory)
            continue
        if stat.S_IMODE(os.lstat(directory).st_mode) & 0o700 != 0o700:
            os.chmod(directory, 0o700)
        stack.append((directory, True))
        for name in os.listdir(directory):  # nondet-ok: deletion order is irrelevant
            child = directory + b"/" + name
            if stat.S_ISDIR(os.lstat(child).st_mode):
                stack.append((child, False))
            else:
                os.unlink(child)
