"""Read a composefs image back into the tree it was made from, as libcomposefs's own
reader does (``lcfs_load_node_from_image``): the root's 256 whiteouts and every
``trusted.overlay.*`` xattr composefs added are dropped, escaped ones unescaped, escaped
whiteouts become whiteout devices again, and files stored by reference take their bytes
from the digest store. The store is ``objects/`` beside the image (a recipe output's
layout) unless named.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from reprobuild.errors import ImageError
from reprobuild.images.composefs import ondisk
from reprobuild.images.erofs.read import read_image
from reprobuild.trees.tree import Content, Entry, EntryType, FileSource, Tree

_SKIPPED = (ondisk.ESCAPED_WHITEOUTS, ondisk.USERXATTR_WHITEOUT, ondisk.USERXATTR_WHITEOUTS)


def read_composefs(path: str | bytes | os.PathLike[str], store: str | None = None) -> Tree:
    """The tree of the composefs image at ``path``, file bytes from ``store`` (default:
    ``objects`` beside the image)."""
    image = os.fsdecode(path)
    if store is None:
        store = os.path.join(os.path.dirname(os.path.abspath(image)), "objects")
    stored = read_image(path)
    tree = Tree(_logical(stored.root, image, store))
    links = []
    for entry in stored:
        if not entry.path or (entry.type is EntryType.CHAR
                              and (entry.rdev_major, entry.rdev_minor) == (0, 0)):
            continue  # the root, and whiteouts composefs made (escaped ones are files)
        if entry.type is EntryType.HARDLINK:
            links.append(entry)  # its primary may come later in path order
        else:
            tree.add(_logical(entry, image, store))
    for link in links:
        tree.add(link)
    return tree


def _logical(entry: Entry, image: str, store: str) -> Entry:
    xattrs, redirect, whiteout = _xattrs(entry.xattrs)
    if entry.type is not EntryType.REGULAR:
        return Entry(entry.path, entry.type, entry.mode, entry.uid, entry.gid, entry.mtime_ns,
                     xattrs, None, entry.target, entry.rdev_major, entry.rdev_minor)
    if whiteout:
        return Entry(entry.path, EntryType.CHAR, entry.mode, entry.uid, entry.gid,
                     entry.mtime_ns, xattrs)
    content = entry.content
    if redirect is not None:
        content = Content(entry.size, FileSource(_object(redirect, entry, image, store)))
    return Entry(entry.path, EntryType.REGULAR, entry.mode, entry.uid, entry.gid,
                 entry.mtime_ns, xattrs, content)


def _xattrs(stored: Iterable[tuple[bytes, bytes]]
            ) -> tuple[tuple[tuple[bytes, bytes], ...], bytes | None, bool]:
    """The user's xattrs, the redirect (object path) and whether it is an escaped
    whiteout."""
    kept: list[tuple[bytes, bytes]] = []
    redirect = None
    whiteout = False
    for name, value in stored:
        if name == ondisk.REDIRECT:
            redirect = value.removeprefix(b"/")
        elif name == ondisk.ESCAPED_WHITEOUT:
            whiteout = True
        elif name in _SKIPPED:
            continue
        elif name.startswith(ondisk.OVERLAY_ESCAPE_PREFIX):
            kept.append((ondisk.OVERLAY_PREFIX + name[len(ondisk.OVERLAY_ESCAPE_PREFIX):],
                         value))
        elif not name.startswith(ondisk.OVERLAY_PREFIX):
            kept.append((name, value))
    return tuple(sorted(kept)), redirect, whiteout


def _object(redirect: bytes, entry: Entry, image: str, store: str) -> bytes:
    parts = redirect.split(b"/")
    if len(parts) != 2 or not all(p and p.isalnum() for p in parts):
        raise ImageError(f"{image}: {entry.display()} redirects to {redirect!r}, not a "
                         "digest store object")
    path = os.path.join(os.fsencode(store), redirect)
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        raise ImageError(f"{image}: {entry.display()} is stored as "
                         f"{redirect.decode()}, which {store} does not hold",
                         hint="give the image's digest store (objects/ beside it)") from None
    if size != entry.size:
        raise ImageError(f"{image}: {entry.display()} has {entry.size} bytes, its object "
                         f"{redirect.decode()} {size}", hint="the digest store is damaged")
    return path
