"""Making FAT images in the tests and reading them back: the sample image of every FAT
type, small trees with one odd entry, and the environment the reference tools need."""

from __future__ import annotations

import io
import os
from pathlib import Path

from reprobuild.images.registry import ImageOptions, OptionValue
from reprobuild.images.vfat import image as vfat
from reprobuild.trees.tree import Content, Entry, EntryType, Tree
from tests.images.vfat_trees import EPOCH, vfat_tree

TOOL_ENV = {**os.environ, "TZ": "UTC", "MTOOLS_SKIP_CHECK": "1", "LC_ALL": "C.UTF-8"}
# The FAT types of the sample image: chosen by size (FAT12), and forced 16 and 32.
SAMPLE_TYPES = [None, 16, 32]
SAMPLE_IDS = ["auto", "fat16", "fat32"]


def image_of(tree: Tree, **options: OptionValue) -> bytes:
    """The FAT image of ``tree`` at the tests' epoch, written in memory."""
    common = {key: options.pop(key) for key in ("size", "label", "uuid") if key in options}
    out = io.BytesIO()
    vfat.write(tree, out, ImageOptions(epoch=EPOCH, extra=tuple(sorted(options.items())),
                                       **common))  # type: ignore[arg-type]
    return out.getvalue()


def write_sample_image(fat_bits: int | None, directory: Path) -> Path:
    """The image of :func:`~tests.images.vfat_trees.vfat_tree` labelled ESP, of the given
    FAT type (None: chosen by size), written under ``directory``."""
    options: dict[str, OptionValue] = {} if fat_bits is None else {"fat": fat_bits}
    path = directory / "sample.img"
    path.write_bytes(image_of(vfat_tree(), label="ESP", **options))
    return path


def fat_bits_of(data: bytes) -> int:
    """The FAT type a boot sector names."""
    return 32 if data[82:87] == b"FAT32" else int(data[57:59])


def tree_with(*entries: Entry) -> Tree:
    """A directory with one file, and ``entries``."""
    tree = Tree(Entry(b"", EntryType.DIRECTORY, 0o755))
    tree.add(Entry(b"dir", EntryType.DIRECTORY, 0o755))
    tree.add(Entry(b"dir/file", EntryType.REGULAR, 0o644, content=Content.from_bytes(b"x")))
    for entry in entries:
        tree.add(entry)
    return tree


def file(path: bytes) -> Entry:
    return Entry(path, EntryType.REGULAR, 0o644, content=Content.from_bytes(b"y"))


def read_bytes(data: bytes) -> Tree:
    """The tree the image ``data`` holds, its contents read into memory."""
    path = Path(os.environ.get("TMPDIR", "/tmp"), f"vfat-{os.getpid()}.img")
    path.write_bytes(data)
    try:
        tree = vfat.read(path)
        return Tree() if tree is None else _materialised(tree)
    finally:
        path.unlink()


def _materialised(tree: Tree) -> Tree:
    out = Tree(tree.root)
    for entry in tree:
        if entry.path:
            content = (Content.from_bytes(entry.content.read()) if entry.content is not None
                       else None)
            out.add(Entry(entry.path, entry.type, entry.mode, mtime_ns=entry.mtime_ns,
                          content=content))
    return out
