"""A tree in composefs's dump format (composefs-dump(5)), as ``composefs-info dump``
prints it and ``mkcomposefs --from-file`` reads it: our own rendering of what the image
must hold, to compare with what the composefs tools make of it."""

from __future__ import annotations

import os

from reprobuild.images.composefs.layout import object_path
from reprobuild.trees.tree import Entry, EntryType, Tree

INLINE_MAX = 64
_SPECIAL = {ord("\\"): "\\\\", ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t"}


def escape(value: bytes, *, equal: bool = False, lone_dash: bool = False) -> str:
    if lone_dash and value == b"-":
        return "\\x2d"
    out = []
    for c in value:
        if c in _SPECIAL:
            out.append(_SPECIAL[c])
        elif (c == ord("=") and equal) or not 0x21 <= c <= 0x7E:
            out.append(f"\\x{c:02x}")
        else:
            out.append(chr(c))
    return "".join(out)


def render(tree: Tree, digests: dict[bytes, bytes], *, dir_size: bool = False) -> list[str]:
    """One dump line per path, depth first; directory sizes 0 unless ``dir_size``."""
    links: dict[bytes, int] = {}
    for entry in tree:
        if entry.type is EntryType.HARDLINK:
            assert entry.target is not None
            links[entry.target] = links.get(entry.target, 1) + 1
    lines = []
    for entry in tree:
        primary = tree.resolve(entry)
        lines.append(_line(tree, entry, primary, digests, links))
    return lines


def _line(tree: Tree, entry: Entry, primary: Entry, digests: dict[bytes, bytes],
          links: dict[bytes, int]) -> str:
    kind = primary.type
    size = primary.size if kind is EntryType.REGULAR else (
        len(primary.target or b"") if kind is EntryType.SYMLINK else 0)
    nlink = links.get(primary.path, 1)
    if kind is EntryType.DIRECTORY:
        nlink = 2 + sum(1 for c in tree.children(primary.path)
                        if c.type is EntryType.DIRECTORY)
    payload = b"-"
    content = b"-"
    digest = "-"
    if kind is EntryType.SYMLINK:
        payload = escape(primary.target or b"", lone_dash=True).encode()
    elif kind is EntryType.REGULAR and size > INLINE_MAX:
        payload = object_path(digests[primary.path]).encode()
        digest = digests[primary.path].hex()
    elif kind is EntryType.REGULAR and size:
        assert primary.content is not None
        content = escape(primary.content.read(), lone_dash=True).encode()
    mode = f"{primary.st_mode:o}"
    if entry.type is EntryType.HARDLINK:
        mode = "@" + mode
        payload = escape(b"/" + primary.path, lone_dash=True).encode()
    rdev = os.makedev(primary.rdev_major, primary.rdev_minor)
    sec, nsec = divmod(primary.mtime_ns, 1_000_000_000)
    fields = [escape(b"/" + entry.path) if entry.path else "/", str(size), mode, str(nlink),
              str(primary.uid), str(primary.gid), str(rdev), f"{sec}.{nsec}",
              payload.decode(), content.decode(), digest]
    fields += [f"{escape(n, equal=True)}={escape(v, equal=True)}"
               for n, v in sorted(primary.xattrs)]
    return " ".join(fields)


def normalise(dump: str) -> list[str]:
    """``composefs-info dump`` lines with directory sizes 0 and xattrs sorted."""
    lines = []
    for line in dump.splitlines():
        fields = line.split(" ")
        if fields[2].lstrip("@").startswith("40"):
            fields[1] = "0"
        lines.append(" ".join(fields[:11] + sorted(fields[11:])))
    return lines
