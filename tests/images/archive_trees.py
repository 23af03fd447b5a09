"""The generated tree shared by the tar and cpio writer tests."""

from __future__ import annotations

from dataclasses import replace

from reprobuild.trees.tree import Content, Entry, EntryType, Tree

EPOCH = 1_700_000_000
NS = 1_000_000_000
# struct vfs_cap_data, revision 2, effective: permitted = CAP_NET_RAW (bit 13).
CAP_NET_RAW = b"\x01\x00\x00\x02" + (1 << 13).to_bytes(4, "little") + bytes(12)


def sample_tree(*, xattrs: bool = True, long_names: bool = True) -> Tree:
    """Every entry kind, hardlinks across directories, odd modes, big ids, ns times."""
    t = EPOCH * NS
    tree = Tree(Entry(b"", EntryType.DIRECTORY, 0o755, mtime_ns=t))

    def add(path: bytes, kind: EntryType = EntryType.REGULAR, data: bytes | None = None,
            **kw: object) -> None:
        kw.setdefault("mode", 0o755 if kind is EntryType.DIRECTORY else 0o644)
        kw.setdefault("mtime_ns", t - 1000 * NS)
        content = Content.from_bytes(data) if data is not None else None
        tree.add(Entry(path, kind, content=content, **kw))  # type: ignore[arg-type]

    add(b"bin", EntryType.DIRECTORY)
    add(b"bin/ping", data=b"\x7fELF" + bytes(range(256)) * 40, mode=0o4755,
        xattrs=((b"security.capability", CAP_NET_RAW), (b"user.note", b"n")) if xattrs
        else ())
    add(b"bin/sh", EntryType.SYMLINK, target=b"dash", mode=0o777)
    add(b"bin/empty", data=b"")
    add(b"dev", EntryType.DIRECTORY)
    add(b"dev/console", EntryType.CHAR, mode=0o600, rdev_major=5, rdev_minor=1)
    add(b"dev/sda1", EntryType.BLOCK, mode=0o660, gid=6, rdev_major=8, rdev_minor=1)
    add(b"dev/initctl", EntryType.FIFO, mode=0o600)
    add(b"etc", EntryType.DIRECTORY, mode=0o700)
    add(b"etc/shadow", data=b"root:*:19000:0:99999:7:::\n", mode=0o640, gid=42)
    add(b"home", EntryType.DIRECTORY, mode=0o1777)
    add(b"home/user", EntryType.DIRECTORY, mode=0o2750, uid=1000, gid=1000)
    add(b"home/user/file", data=b"u" * 513, uid=1000, gid=1000,
        mtime_ns=t - 5 * NS + 123_456_789)
    add(b"sbin", EntryType.DIRECTORY)
    add(b"sbin/ping-link", EntryType.HARDLINK, target=b"bin/ping", mode=0o4755)
    add(b"bin/ping6", EntryType.HARDLINK, target=b"bin/ping", mode=0o4755)
    add(b"usr", EntryType.DIRECTORY)
    add(b"usr/big-ids", data=b"b", uid=3_000_000, gid=2_500_000)
    add(b"usr/caf\xc3\xa9", data=b"utf8 name")
    if long_names:
        deep = b"/".join([b"d" * 60] * 5)
        path = b"usr"
        for part in deep.split(b"/"):
            path += b"/" + part
            add(path, EntryType.DIRECTORY)
        add(deep.join([b"usr/", b"/" + b"f" * 150]), data=b"long name")
        add(b"usr/long-link", EntryType.SYMLINK, target=b"t" * 200, mode=0o777)
    return tree


def whole_seconds(tree: Tree) -> Tree:
    """The tree as cpio newc keeps it: mtimes in whole seconds."""
    out = Tree(replace(tree.root, mtime_ns=tree.root.mtime_ns // NS * NS))
    for entry in tree:
        if entry.path:
            out.add(replace(entry, mtime_ns=entry.mtime_ns // NS * NS))
    return out
