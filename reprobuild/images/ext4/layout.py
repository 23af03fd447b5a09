"""Plan an ext4 image: inode numbers, block allocation, directory and xattr blocks, as data.

:mod:`~reprobuild.images.ext4.prepare` numbers inodes, scans contents and builds
directory and xattr blocks; :mod:`~reprobuild.images.ext4.allocate` places them.

The plan reads file contents once (to find all-zero blocks, which become holes, and to
hash the tree for the UUID and hash seed); the serialiser then writes the plan out.
Layout, all metadata first as flex_bg allows::

    block 0: boot area + superblock | GDT | block bitmaps | inode bitmaps | inode tables |
    directory, xattr and symlink blocks | file data in inode order | extent tree blocks

with the sparse_super backups (superblock + GDT copy) of groups 1, 3^n, 5^n, 7^n left in
place wherever they fall.
"""

from __future__ import annotations

from reprobuild.errors import ImageError, ImageTooSmall
from reprobuild.images.ext4.allocate import (
    Extent,
    GroupPlan,
    InodePlan,
    Layout,
    NoSpace,
    allocate,
    geometry,
    minimum_blocks,
)
from reprobuild.images.ext4.ondisk import (
    BLOCK_SIZE,
    BLOCKS_PER_GROUP,
    HASH_VERSIONS,
    has_super_backup,
)
from reprobuild.images.ext4.prepare import Needs, prepare
from reprobuild.images.registry import ImageOptions
from reprobuild.trees.tree import Tree

__all__ = ["Extent", "GroupPlan", "InodePlan", "Layout", "plan"]

def plan(tree: Tree, options: ImageOptions, cache: dict[int, bytes] | None = None) -> Layout:
    """Lay out ``tree`` as an ext4 image for ``options``; raises ImageError if it can't."""
    if options.block_size not in (None, BLOCK_SIZE):
        raise ImageError(f"ext4: block size {options.block_size} is not supported",
                         hint="reprobuild writes ext4 with 4096-byte blocks")
    if options.compress is not None:
        raise ImageError("ext4 images are not compressed", hint="drop the compress option")
    label = (options.label or "").encode()
    if len(label) > 16:
        raise ImageError(f"ext4 label {options.label!r} is longer than 16 bytes")
    hash_name = str(options.get("hash_version", "half_md4"))
    if hash_name not in HASH_VERSIONS:
        raise ImageError(f"unknown ext4 hash_version {hash_name!r}",
                         hint="use half_md4 or tea")
    prepared = prepare(tree, options, cache, HASH_VERSIONS[hash_name], label)
    needs = prepared.needs(int(options.get("inodes", 0) or 0))
    minimum = minimum_blocks(needs)
    if options.size is not None:
        blocks_count = options.size // BLOCK_SIZE
        if blocks_count < minimum:
            raise ImageTooSmall(
                f"the tree needs an ext4 image of at least {minimum * BLOCK_SIZE} bytes "
                f"({minimum} blocks); the size given is {options.size}",
                minimum=minimum * BLOCK_SIZE)
        groups, _, _, gdt_blocks = geometry(blocks_count, needs.inodes)
        last = groups - 1
        if groups > 1 and has_super_backup(last) and \
                blocks_count - last * BLOCKS_PER_GROUP < 2 + gdt_blocks:
            blocks_count = last * BLOCKS_PER_GROUP  # too small for its backup: drop it
        attempts = [blocks_count]
    else:
        attempts = [minimum]
    while True:
        blocks_count = attempts[-1]
        try:
            return allocate(blocks_count, needs, prepared, options.size)
        except NoSpace as short:
            needs = Needs(needs.inodes, needs.data_blocks + short.shortage)
            if options.size is not None or len(attempts) > 16:
                need = minimum_blocks(needs) * BLOCK_SIZE
                raise ImageTooSmall(
                    f"the tree needs an ext4 image of at least {need} bytes; the size given "
                    f"is {options.size}", minimum=need) from None
            attempts.append(minimum_blocks(needs))

