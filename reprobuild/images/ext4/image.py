"""ext4 images written in pure Python: read-only, no journal, bit-identical for a tree.

The module contract of :mod:`reprobuild.images.registry`. The work is split by job:
``ext4_format`` (on-disk structures, checksums, hashes), ``ext4_dir`` (directory and
xattr bytes), ``ext4_layout`` (the plan), ``ext4_write`` (serialising the plan) and
``ext4_read`` (an image back into a tree).

Features: 4 KiB blocks, 256-byte inodes with nanosecond times, extent, filetype,
sparse_super, large_file, huge_file, dir_nlink, extra_isize, ext_attr, dir_index (htree,
unsigned hash flag set explicitly), metadata_csum (crc32c), 64bit, flex_bg; no journal.

What the bytes depend on: the tree and the options, nothing else. Inode numbers follow
the canonical order (root 2, lost+found 11, then 12, 13, ...); all four inode times are
the entry's mtime clamped to the epoch; superblock times are the epoch. All-zero 4 KiB
blocks of content become holes. The UUID and the htree hash seed are blake3 of the
canonical tree (with content digests) unless given. Xattrs are stored in the kernel's
sorted order (prefix index, name length, name), in the inode while they fit, then in one
xattr block shared by inodes with identical remainders. A ``lost+found`` is added when
the tree has none (read back, it is part of the image).

Options: ``size`` (None = the smallest image that fits: no spare block or inode beyond
16-inode rounding; a given size that cannot hold the tree is refused, naming the size
needed), ``uuid``, ``label`` (<= 16 bytes), ``epoch``, and ``extra`` keys ``hash_seed``
(a UUID), ``hash_version`` (``half_md4``, the default, or ``tea``) and ``inodes`` (spare
inodes to add).
"""

from __future__ import annotations

import os
from typing import BinaryIO

from reprobuild.images.ext4.layout import plan
from reprobuild.images.ext4.read import read_image
from reprobuild.images.ext4.write import write_image
from reprobuild.images.registry import ImageOptions
from reprobuild.images.timestamps import EXT4_TIMES, check_times
from reprobuild.trees.gcpause import collector_paused
from reprobuild.trees.tree import Tree

VERSION = "1"


def write(tree: Tree, output: BinaryIO, options: ImageOptions) -> None:
    """Write ``tree`` as an ext4 image to ``output`` (seekable and initially empty)."""
    check_times(tree, options.epoch, EXT4_TIMES, "ext4")
    cache: dict[int, bytes] = {}
    with collector_paused():  # the plan is many objects that live until written
        layout = plan(tree, options, cache)
        write_image(layout, output, cache)


def read(path: str | bytes | os.PathLike[str]) -> Tree:
    """Read an ext4 image into a tree whose file contents stream from the image."""
    return read_image(path)


def identity(options: ImageOptions) -> dict[str, str]:
    """Nothing outside this package's code shapes the bytes (crc32c is a fixed function)."""
    return {}
