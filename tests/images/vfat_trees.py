"""Trees for the FAT tests: every kind of name FAT stores differently, and what a FAT
image gives back of a tree (names, directories, contents, mtimes in FAT's terms)."""

from __future__ import annotations

import random

from reprobuild.images.vfat.ondisk import FAT_FIRST
from reprobuild.trees.tree import Content, Entry, EntryType, Tree

EPOCH = 1_700_000_001  # odd: FAT keeps even seconds
NS = 1_000_000_000
CLUSTER = 2048  # FAT12/16 volumes below 16 MiB

# (name, its 8.3 name): an upper-case 8.3 name, single-case parts with the NT case
# bits (SHORT_ONLY: no long name), and names that need long-name slots and an alias.
SHORT_ONLY = (b"NOTES.TXT", b"readme.txt", b"boot.EFI")
NAMES = {
    b"NOTES.TXT": "NOTES   TXT",
    b"readme.txt": "README  TXT",
    b"boot.EFI": "BOOT    EFI",
    b"Makefile": "MAKEFILE   ",
    b".hidden": "HIDDEN~1   ",
    b"a b c.txt": "ABC~1   TXT",
    b"x.tar.gz": "XTAR~1  GZ ",
    b"odd+,;=[].name": "ODD___~1NAM",
    "\u00dcn\u00efcode \u30d5\u30a1\u30a4\u30eb.txt".encode(): "_N_COD~1TXT",
}


def vfat_tree() -> Tree:
    """A tree a FAT can hold: long, case-only, Unicode and 8.3 names; 12 names that share
    an alias stem; files empty, one byte, one cluster, a cluster and a byte; a 300-entry
    directory; times before 1980, odd seconds and after the epoch."""
    rng = random.Random(17)
    old = (EPOCH - 3 * 86400 - 1) * NS
    tree = Tree(Entry(b"", EntryType.DIRECTORY, 0o755, mtime_ns=EPOCH * NS))

    def add(path: bytes, data: bytes | None = None, mtime: int = old, mode: int = 0o644) -> None:
        if data is None:
            tree.add(Entry(path, EntryType.DIRECTORY, 0o755, mtime_ns=mtime))
        else:
            tree.add(Entry(path, EntryType.REGULAR, mode, mtime_ns=mtime,
                           content=Content.from_bytes(data)))

    add(b"EFI")
    add(b"EFI/BOOT")
    add(b"EFI/BOOT/BOOTX64.EFI", rng.randbytes(70_001))
    for name in NAMES:
        add(name, name * 3)
    add(b"loader")
    add(b"loader/entries")
    for number in range(12):
        add(b"loader/entries/entry-%02d-long-name.conf" % number, b"title %d\n" % number)
    add(b"sizes")
    for size in (0, 1, CLUSTER, CLUSTER + 1, 3 * CLUSTER - 1):
        add(b"sizes/s%d" % size, rng.randbytes(size))
    add(b"sizes/read-only", b"ro\n", mode=0o444)
    add(b"times")
    add(b"times/1970", b"a", mtime=0)
    add(b"times/1979-12-31", b"b", mtime=(FAT_FIRST - 1) * NS)
    add(b"times/future", b"c", mtime=(EPOCH + 10**6) * NS)
    add(b"times/odd", b"d", mtime=(EPOCH - 1000) * NS + 999_999_999)
    add(b"wide")
    for number in range(300):
        add(b"wide/file-with-a-long-name-%03d" % number, b"%d" % number)
    add(b"a")
    add(b"a/b")
    add(b"a/b/c")
    add(b"a/b/c/deep.txt", b"deep")
    add(b"empty-dir")
    add(b"x" * 255, b"255 units")
    return tree


def fat_seconds(mtime_ns: int, epoch: int = EPOCH) -> int:
    """The mtime a FAT image gives back: clamped to the epoch, then to 1980, even."""
    seconds = max(min(mtime_ns // NS, epoch), FAT_FIRST)
    return seconds - seconds % 2


def fat_view(tree: Tree, epoch: int = EPOCH) -> dict[bytes, tuple[str, bytes, int]]:
    """path -> (type, content, mtime) of what FAT holds (the root's time is not kept)."""
    view = {}
    for entry in tree:
        if not entry.path:
            continue
        content = entry.content.read() if entry.content is not None else b""
        view[entry.path] = (entry.type.value, content, fat_seconds(entry.mtime_ns, epoch))
    return view
