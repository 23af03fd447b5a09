"""Write a validated :class:`~reprobuild.trees.tree.Tree` below a fresh host directory.

Used for unpacking Debian packages in the engine's process. Every entry is created
relative to its parent's directory descriptor, and every directory on the way is opened
with ``O_NOFOLLOW | O_DIRECTORY``: a symlink written earlier (or planted by anyone else)
is never followed, so nothing is created or opened outside the destination. Nothing is
ever opened for writing that already exists (``O_EXCL``; ``mkdir``, ``symlink`` and
``link`` fail on an existing name).
"""

from __future__ import annotations

import os
import shutil

from reprobuild.errors import FetchError
from reprobuild.trees.tree import CHUNK, Entry, EntryType, Tree

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class _Directories:
    """Descriptors of the directories below the destination, opened without following."""

    def __init__(self, root_fd: int) -> None:
        self.root_fd = root_fd
        self._path: bytes | None = None
        self._fd = -1

    def parent_of(self, path: bytes) -> tuple[int, bytes]:
        """(descriptor of the parent directory, last name) of a tree path."""
        parent, _, name = path.rpartition(b"/")
        return self.open(parent), name

    def open(self, directory: bytes) -> int:
        if directory == self._path:
            return self._fd
        self.close()
        fd = os.dup(self.root_fd)
        try:
            for part in directory.split(b"/") if directory else []:
                next_fd = os.open(part, DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = next_fd
        except BaseException:
            os.close(fd)
            raise
        self._path, self._fd = directory, fd
        return fd

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
        self._path, self._fd = None, -1


def _write_file(entry: Entry, parent_fd: int, name: bytes) -> None:
    assert entry.content is not None
    mode = 0o755 if entry.mode & 0o111 else 0o644
    fd = os.open(name, FILE_FLAGS, mode, dir_fd=parent_fd)
    with os.fdopen(fd, "wb") as out, entry.content.source.open() as src:
        os.fchmod(out.fileno(), mode)  # whatever the umask
        shutil.copyfileobj(src, out, CHUNK)


def _write(entry: Entry, dirs: _Directories, second: _Directories) -> None:
    parent_fd, name = dirs.parent_of(entry.path)
    if entry.type is EntryType.DIRECTORY:
        os.mkdir(name, 0o755, dir_fd=parent_fd)
    elif entry.type is EntryType.REGULAR:
        _write_file(entry, parent_fd, name)
    elif entry.type is EntryType.SYMLINK:
        assert entry.target is not None
        os.symlink(entry.target, name, dir_fd=parent_fd)
    elif entry.type is EntryType.HARDLINK:
        assert entry.target is not None
        target_fd, target_name = second.parent_of(entry.target)
        os.link(target_name, name, src_dir_fd=target_fd, dst_dir_fd=parent_fd,
                follow_symlinks=False)
    else:
        raise FetchError(f"cannot unpack {entry.display()!r}: a {entry.type.value}")


def write_tree_below(tree: Tree, dest: str) -> None:
    """Create every entry of ``tree`` below the existing, empty directory ``dest``.

    Directories are made 0755 (less what the umask removes), regular files 0755 or
    0644 by their execute bit; owners, times and xattrs are not written.
    """
    root_fd = os.open(dest, DIR_FLAGS)
    dirs, second = _Directories(root_fd), _Directories(root_fd)
    try:
        for entry in tree:
            if entry.path:
                _write(entry, dirs, second)
    except OSError as exc:
        raise FetchError(f"cannot unpack into {dest}: {exc.strerror} ({exc.filename!r})",
                         hint="the destination must be a new, empty directory") from None
    finally:
        dirs.close()
        second.close()
        os.close(root_fd)
