"""Compare two trees entry by entry and say, per path, what differs and how."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import zip_longest

from reprobuild.trees.tree import Entry, EntryType, Tree, path_key


@dataclass(frozen=True)
class Difference:
    """One difference at one path: ``kind`` is a stable word, ``detail`` is for people."""

    path: bytes
    kind: str  # only-in-a, only-in-b, type, mode, owner, mtime, xattr, size, content,
    # target, device, hardlink
    detail: str

    def display(self) -> str:
        return f"/{self.path.decode('utf-8', 'backslashreplace')}: {self.kind}: {self.detail}"


def first_difference_offset(a: Entry, b: Entry) -> int | None:
    """The first byte offset at which two regular files' contents differ, or None."""
    assert a.content is not None and b.content is not None
    offset = 0
    for chunk_a, chunk_b in zip_longest(a.content.chunks(), b.content.chunks(), fillvalue=b""):
        if chunk_a != chunk_b:
            # Chunk boundaries line up (same chunk size) until one stream ends.
            n = min(len(chunk_a), len(chunk_b))
            for i in range(n):
                if chunk_a[i] != chunk_b[i]:
                    return offset + i
            return offset + n
        offset += len(chunk_a)
    return None


def diff_trees(
    a: Tree,
    b: Tree,
    *,
    compare_mtime: bool = True,
    compare_owner: bool = True,
    compare_xattrs: bool = True,
    compare_root: bool = True,
    ignore_xattr_prefixes: tuple[bytes, ...] = (),
) -> list[Difference]:
    """Every difference between ``a`` and ``b``, in canonical path order.

    Hardlinks are compared as groups: two trees match when the same paths share an
    inode, whichever path each calls the primary.
    """
    diffs: list[Difference] = []
    groups_a = _link_sets(a)
    groups_b = _link_sets(b)
    paths = sorted({e.path for e in a} | {e.path for e in b}, key=path_key)
    for path in paths:
        if path == b"" and not compare_root:
            continue
        ea, eb = a.get(path), b.get(path)
        if ea is None:
            diffs.append(Difference(path, "only-in-b", _describe(b, eb)))
            continue
        if eb is None:
            diffs.append(Difference(path, "only-in-a", _describe(a, ea)))
            continue
        if groups_a.get(path) != groups_b.get(path):
            diffs.append(Difference(path, "hardlink",
                                    f"links {_fmt_group(groups_a.get(path))} vs "
                                    f"{_fmt_group(groups_b.get(path))}"))
        ra, rb = a.resolve(ea), b.resolve(eb)
        if ra.type is not rb.type:
            diffs.append(Difference(path, "type", f"{ra.type.value} vs {rb.type.value}"))
            continue
        if ra.mode != rb.mode:
            diffs.append(Difference(path, "mode", f"{ra.mode:04o} vs {rb.mode:04o}"))
        if compare_owner and (ra.uid, ra.gid) != (rb.uid, rb.gid):
            diffs.append(Difference(path, "owner", f"{ra.uid}:{ra.gid} vs {rb.uid}:{rb.gid}"))
        if compare_mtime and ra.mtime_ns != rb.mtime_ns:
            diffs.append(Difference(path, "mtime", f"{ra.mtime_ns} vs {rb.mtime_ns} ns"))
        if compare_xattrs:
            xa = _filter_xattrs(ra.xattrs, ignore_xattr_prefixes)
            xb = _filter_xattrs(rb.xattrs, ignore_xattr_prefixes)
            if xa != xb:
                diffs.append(Difference(path, "xattr", _xattr_detail(xa, xb)))
        if ra.type is EntryType.SYMLINK and ra.target != rb.target:
            diffs.append(Difference(path, "target", f"{ra.target!r} vs {rb.target!r}"))
        if ra.type in (EntryType.CHAR, EntryType.BLOCK) and (
            (ra.rdev_major, ra.rdev_minor) != (rb.rdev_major, rb.rdev_minor)
        ):
            diffs.append(Difference(
                path, "device",
                f"{ra.rdev_major}:{ra.rdev_minor} vs {rb.rdev_major}:{rb.rdev_minor}"))
        if ra.type is EntryType.REGULAR and ea.type is not EntryType.HARDLINK:
            if ra.size != rb.size:
                diffs.append(Difference(path, "size", f"{ra.size} vs {rb.size} bytes"))
            assert ra.content is not None and rb.content is not None
            if ra.content.blake3 != rb.content.blake3:
                offset = first_difference_offset(ra, rb)
                diffs.append(Difference(path, "content", f"first differing byte at offset "
                                        f"{offset}"))
    return diffs


def _describe(tree: Tree, entry: Entry | None) -> str:
    assert entry is not None
    resolved = tree.resolve(entry)
    if resolved.type is EntryType.REGULAR:
        return f"{entry.type.value}, {resolved.size} bytes"
    return entry.type.value


def _link_sets(tree: Tree) -> dict[bytes, frozenset[bytes]]:
    sets: dict[bytes, frozenset[bytes]] = {}
    for paths in tree.hardlink_groups().values():
        group = frozenset(paths)
        for p in paths:
            sets[p] = group
    return sets


def _fmt_group(group: frozenset[bytes] | None) -> str:
    if not group:
        return "(none)"
    return "{" + ", ".join(sorted(p.decode(errors="replace") for p in group)) + "}"


def _filter_xattrs(
    xattrs: tuple[tuple[bytes, bytes], ...], ignore: tuple[bytes, ...]
) -> tuple[tuple[bytes, bytes], ...]:
    return tuple((n, v) for n, v in xattrs if not n.startswith(ignore)) if ignore else xattrs


def _xattr_detail(
    xa: tuple[tuple[bytes, bytes], ...], xb: tuple[tuple[bytes, bytes], ...]
) -> str:
    da, db = dict(xa), dict(xb)
    parts = []
    for name in sorted(set(da) | set(db)):
        if da.get(name) != db.get(name):
            parts.append(f"{name.decode(errors='replace')}: {da.get(name)!r} vs {db.get(name)!r}")
    return "; ".join(parts)
