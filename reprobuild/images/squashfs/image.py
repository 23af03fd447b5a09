"""squashfs 4.0 images from a tree, in pure Python (the registry's module contract).

Options: ``compress`` is zstd (default; the zstandard wheel pins libzstd), gzip, xz, lz4
or none; ``block_size`` is a power of two from 4 KiB to 1 MiB (default 128 KiB); extra
options ``exportable`` (write the NFS export table), ``compression_level`` (zstd 1-22,
default 15; gzip 1-9, default 9), ``tail_fragments`` (pack the tails of files larger than
a block into fragments too; default true), ``probe`` (store blocks that zstd level 1
cannot shrink at all uncompressed without running the configured compressor; default
true) and ``threads`` (compression threads; the bytes never depend on it). The
superblock's time is ``options.epoch``. ``options.size`` pads the image with zeros to
that many bytes (an error when the image is larger); squashfs has no label or UUID, so
``label`` and ``uuid`` are not used.
"""

from __future__ import annotations

from typing import BinaryIO

from reprobuild.errors import ImageError
from reprobuild.images.registry import ImageOptions
from reprobuild.images.squashfs.compressors import (
    DEFAULT,
    library_identity,
    make_compressor,
)
from reprobuild.images.squashfs.layout import SquashfsPlan, plan_image
from reprobuild.images.squashfs.ondisk import (
    SQUASHFS_DEFAULT_BLOCK_SIZE,
    SQUASHFS_MAX_BLOCK_SIZE,
    SQUASHFS_MIN_BLOCK_SIZE,
)
from reprobuild.images.squashfs.read import read_image
from reprobuild.images.squashfs.write import WriteSettings, default_workers, write_plan
from reprobuild.trees.tree import Tree

VERSION = "1"

__all__ = ["VERSION", "identity", "plan", "read", "write"]


def _block_size(options: ImageOptions) -> int:
    size = options.block_size or SQUASHFS_DEFAULT_BLOCK_SIZE
    if (size & (size - 1) or not SQUASHFS_MIN_BLOCK_SIZE <= size <= SQUASHFS_MAX_BLOCK_SIZE):
        raise ImageError(f"squashfs: block size {size} is not a power of two from 4 KiB"
                         " to 1 MiB", hint="use e.g. block_size = 131072")
    return size


def _level(options: ImageOptions) -> int | None:
    level = options.get("compression_level")
    if level is None:
        return None
    if isinstance(level, bool) or not isinstance(level, int):
        raise ImageError(f"squashfs: compression_level must be an integer, not {level!r}")
    return level


def _flag(options: ImageOptions, name: str, default: bool) -> bool:
    value = options.get(name, default)
    if not isinstance(value, bool):
        raise ImageError(f"squashfs: option {name} must be true or false, not {value!r}")
    return value


def plan(tree: Tree, options: ImageOptions) -> SquashfsPlan:
    """The layout of the image ``write`` would make (no bytes written)."""
    return plan_image(tree, _block_size(options),
                      tail_fragments=_flag(options, "tail_fragments", True))


def write(tree: Tree, output: BinaryIO, options: ImageOptions) -> None:
    """Write ``tree`` as a squashfs image whose bytes depend only on tree and options."""
    if not 0 <= options.epoch < 1 << 32:
        raise ImageError(f"squashfs: epoch {options.epoch} does not fit the superblock's"
                         " 32-bit time")
    block_size = _block_size(options)
    compressor = make_compressor(options.compress or DEFAULT, block_size, _level(options),
                                 probe=_flag(options, "probe", True))
    threads = options.get("threads")
    workers = threads if isinstance(threads, int) and threads > 0 else default_workers()
    settings = WriteSettings(compressor=compressor, mkfs_time=options.epoch,
                             exportable=_flag(options, "exportable", False),
                             workers=workers, size=options.size)
    write_plan(plan(tree, options), output, settings)


def read(path: str | bytes) -> Tree:
    """The tree stored in the squashfs image at ``path``; contents stream from it."""
    return read_image(path)


def identity(options: ImageOptions) -> dict[str, str]:
    """The compressor, its level and its library version (they change the bytes)."""
    name = options.compress or DEFAULT
    make_compressor(name, _block_size(options), _level(options))  # validates
    return library_identity(name, _level(options), probe=_flag(options, "probe", True))
