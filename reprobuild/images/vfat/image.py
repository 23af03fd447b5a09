"""The ``vfat`` image format: FAT12/16/32 with VFAT long names, as an EFI system
partition needs (the :class:`~reprobuild.images.protocol.TreeFormat` module).

Options: ``size`` ("min": the smallest size, in whole MiB, that holds the tree with a
sixteenth to spare), ``label`` (up to 11 upper-case characters; none by default),
``fat`` (12, 16 or 32: force the type; by default chosen by size as mkfs.fat does),
``volume_id`` (8 hex digits, ``ABCD-1234`` or ``ABCD1234``; by default derived from
the content and ``seed``), ``seed`` (any text mixed into the derived volume id),
``hardlinks`` (``"refuse"``, the default, or ``"copy"``: each link a copy of its file).
See :mod:`reprobuild.images.vfat.layout` for what FAT cannot hold and the time policy.
"""

from __future__ import annotations

import importlib
import os
from typing import BinaryIO

from reprobuild.errors import ImageError
from reprobuild.images.protocol import ImageOptions
from reprobuild.images.vfat.layout import plan
from reprobuild.images.vfat.write import write_image
from reprobuild.trees.tree import Tree

READER = "reprobuild.images.vfat.read"  # loaded by read(): a writer never needs it
VERSION = "1"


def _volume_id(options: ImageOptions) -> int | None:
    text = options.get("volume_id")
    if options.uuid is not None:
        if text is not None:
            raise ImageError("vfat: give the volume id as uuid or as volume_id, not both")
        text = options.uuid
    if text is None:
        return None
    digits = str(text).replace("-", "")
    if len(digits) != 8 or (len(str(text)) == 9 and str(text)[4] != "-"):
        digits = ""
    try:
        return int(digits, 16)
    except ValueError:
        raise ImageError(f"vfat volume id {text!r} is not 8 hex digits",
                         hint='give it as blkid shows a FAT UUID, like "ABCD-1234"') from None


def _fat_bits(options: ImageOptions) -> int | None:
    value = options.get("fat")
    if value is None:
        return None
    if value not in (12, 16, 32):
        raise ImageError(f"vfat option fat = {value!r} is not 12, 16 or 32",
                         hint="leave it unset to choose by size as mkfs.fat does")
    assert isinstance(value, int)
    return value


def _check_common(options: ImageOptions) -> None:
    if options.compress not in (None, "none"):
        raise ImageError(f"vfat images are not compressed (compress = {options.compress!r})",
                         hint="leave compress unset")
    if options.block_size not in (None, 512):
        raise ImageError(f"vfat block size {options.block_size} is not supported",
                         hint="reprobuild writes FAT with 512-byte sectors; leave "
                              "block_size unset")


def write(tree: Tree, output: BinaryIO, options: ImageOptions) -> None:
    """Write the FAT image of ``tree``: plan, then serialise."""
    _check_common(options)
    volume_id = _volume_id(options)
    layout = plan(tree, options, fat_bits=_fat_bits(options))
    write_image(layout, output, str(options.get("seed", "")).encode(), volume_id)


def read(path: str | bytes) -> Tree:
    """The tree a FAT image holds; contents stream from the image file."""
    tree: Tree = importlib.import_module(READER).read_tree(os.fsencode(path))
    return tree


def identity(options: ImageOptions) -> dict[str, str]:
    return {}
