"""The range of times each image format can store, checked before anything is written.

Writers clamp every mtime to the epoch, so the newest time an image holds is the epoch
and the oldest is the oldest mtime of the tree. A time outside the format's range is
refused with the range named, instead of being wrapped (ext4 with a 2^34 epoch once
wrote 1970) or overflowing a struct field.
"""

from __future__ import annotations

import datetime

from reprobuild.errors import ImageError
from reprobuild.trees.tree import Tree

NS = 1_000_000_000
# ext4 inodes with extra time fields: a signed 32-bit second count plus two epoch bits
# (fs/ext4/ext4.h, ext4_decode_extra_time): 1901-12-13 to 2446-05-10.
EXT4_TIMES = (-(1 << 31), (1 << 31) - 1 + (3 << 32))
# EROFS: the superblock's build_time is __le64, extended inodes' i_mtime __le64 read as
# signed by the kernel; compact inodes take the build time.
EROFS_TIMES = (-(1 << 63), (1 << 63) - 1)


def _date(seconds: int) -> str:
    try:
        return datetime.datetime.fromtimestamp(seconds, datetime.UTC).strftime("%Y-%m-%d")
    except (OverflowError, ValueError, OSError):
        return f"{seconds} s"


def check_times(tree: Tree, epoch: int, limits: tuple[int, int], fmt: str) -> None:
    """Refuse an epoch, or a tree mtime (clamped to the epoch), outside ``limits`` seconds."""
    low, high = limits
    span = f"{fmt} stores times from {low} ({_date(low)}) to {high} ({_date(high)})"
    if not max(low, 0) <= epoch <= high:
        raise ImageError(f"{fmt}: epoch {epoch} is outside what the image can hold: {span}",
                         hint="give an epoch in that range")
    oldest = min(entry.mtime_ns for entry in tree) // NS
    if oldest < low:
        entry = min(tree, key=lambda e: e.mtime_ns)
        raise ImageError(f"{fmt}: {entry.display()} has mtime {oldest}, before what the "
                         f"image can hold: {span}",
                         hint="set the file's time in range (e.g. with [images.X.files])")
