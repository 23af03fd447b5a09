"""Read a FAT12/16/32 image back into a tree (names, directories, contents, mtimes).

Trusts no field: every sector, cluster and chain is checked against the image's size
and the FAT before it is used; a malformed image is an ImageError naming the image and
the path inside it. File contents stay in the image (a region per file). Times are read
as UTC, as the writer stores them; permission bits are 0755 for directories, 0644 for
files (0444 when read-only), owners 0.
"""

from __future__ import annotations

import array
import os
import sys
from dataclasses import dataclass
from typing import BinaryIO

from reprobuild.errors import ImageError
from reprobuild.images.vfat.ondisk import (
    ATTR_DIR,
    ATTR_EXT,
    ATTR_RO,
    ATTR_VOLUME,
    CASE_LOWER_BASE,
    CASE_LOWER_EXT,
    DELETED,
    DIR_ENTRY_SIZE,
    FAT32_EXTENSION,
    FAT_BOOT_SECTOR,
    FAT_FIRST,
    LAST_LONG_ENTRY,
    MSDOS_DIR_ENTRY,
    MSDOS_DIR_SLOT,
    alias_checksum,
    unix_time,
)
from reprobuild.trees.region import file_region
from reprobuild.trees.tree import Content, Entry, EntryType, Tree

NS = 1_000_000_000
MAX_CLUST_12 = 4084
END_MIN = {12: 0xFF8, 16: 0xFFF8, 32: 0x0FFFFFF8}


@dataclass(frozen=True)
class Volume:
    """What the boot sector says, checked against the image size."""

    fat_bits: int
    sector_size: int
    cluster_size: int
    fat_offset: int
    fat_bytes: int
    root_offset: int  # FAT12/16 root directory
    root_entries: int
    data_offset: int
    cluster_count: int
    root_cluster: int  # FAT32


def _volume(head: bytes, file_size: int, shown: str) -> Volume:
    if len(head) < 512 or head[510:512] != b"\x55\xaa":
        raise ImageError(f"{shown}: no FAT boot sector (no 55 AA signature)",
                         hint="is this a vfat image?")
    (_jump, _oem, sector_size, spc, reserved, fats, root_entries, total16, _media,
     fat_length16, _spt, _heads, _hidden, total32) = FAT_BOOT_SECTOR.unpack_from(head)
    fat32 = FAT32_EXTENSION.unpack_from(head, 36)
    fat_length = fat_length16 or fat32[0]
    total = total16 or total32
    if (sector_size not in (512, 1024, 2048, 4096) or spc not in (1, 2, 4, 8, 16, 32, 64, 128)
            or reserved < 1 or not 1 <= fats <= 4 or fat_length == 0
            or (fat_length16 == 0 and root_entries)):
        raise ImageError(f"{shown}: the FAT boot sector is damaged or not FAT",
                         hint="the image is damaged")
    root_sectors = -(-root_entries * DIR_ENTRY_SIZE // sector_size)
    data_start = reserved + fats * fat_length + root_sectors
    if total * sector_size > file_size or data_start >= total:
        raise ImageError(f"{shown}: the boot sector claims {total} sectors, the image has "
                         f"{file_size // sector_size}", hint="the image is truncated")
    clusters = (total - data_start) // spc
    bits = 32 if fat_length16 == 0 else 12 if clusters <= MAX_CLUST_12 else 16
    if clusters + 2 > fat_length * sector_size * 8 // bits:
        raise ImageError(f"{shown}: the FAT is too small for {clusters} clusters",
                         hint="the image is damaged")
    return Volume(bits, sector_size, spc * sector_size, reserved * sector_size,
                  fat_length * sector_size, (reserved + fats * fat_length) * sector_size,
                  root_entries, data_start * sector_size, clusters,
                  fat32[3] if bits == 32 else 0)


def _fat_entries(raw: bytes, bits: int, count: int) -> array.array[int]:
    if bits == 32:
        entries = array.array("I", raw[:4 * count])  # the top 4 bits are masked on use
        if sys.byteorder == "big":
            entries.byteswap()
        return entries
    if bits == 16:
        halves = array.array("H", raw[:2 * count])
        if sys.byteorder == "big":
            halves.byteswap()
        return array.array("I", halves)
    out = array.array("I", bytes(4 * count))
    for index in range(count):
        pair = int.from_bytes(raw[index * 3 // 2:index * 3 // 2 + 2], "little")
        out[index] = pair >> 4 if index % 2 else pair & 0xFFF
    return out


class _Reader:
    def __init__(self, path: bytes, image: BinaryIO, shown: str) -> None:
        self.path = path
        self.image = image
        self.shown = shown
        self.file_size = os.fstat(image.fileno()).st_size
        image.seek(0)
        self.volume = _volume(image.read(512), self.file_size, shown)
        image.seek(self.volume.fat_offset)
        self.fat = _fat_entries(image.read(self.volume.fat_bytes), self.volume.fat_bits,
                                self.volume.cluster_count + 2)

    def chain(self, first: int, what: str) -> list[int]:
        """The clusters of the chain starting at ``first``."""
        volume = self.volume
        clusters: list[int] = []
        current = first
        while True:
            if not 2 <= current < volume.cluster_count + 2 or len(clusters) > volume.cluster_count:
                raise ImageError(f"{self.shown}: {what} has a broken cluster chain "
                                 f"(cluster {current})", hint="the image is damaged")
            clusters.append(current)
            current = self.fat[current] & 0x0FFFFFFF
            if current >= END_MIN[volume.fat_bits]:
                return clusters

    def offset(self, cluster: int) -> int:
        return self.volume.data_offset + (cluster - 2) * self.volume.cluster_size

    def directory(self, first: int | None, what: str) -> bytes:
        volume = self.volume
        if first is None:
            self.image.seek(volume.root_offset)
            return self.image.read(volume.root_entries * DIR_ENTRY_SIZE)
        parts = []
        for cluster in self.chain(first, what):
            self.image.seek(self.offset(cluster))
            parts.append(self.image.read(volume.cluster_size))
        return b"".join(parts)

    def content(self, first: int, size: int, what: str) -> Content:
        if size == 0:
            return Content.from_bytes(b"")
        size_of = self.volume.cluster_size
        needed = -(-size // size_of)
        clusters = self.chain(first, what)
        if len(clusters) < needed:
            raise ImageError(f"{self.shown}: {what} is {size} bytes but has "
                             f"{len(clusters)} clusters", hint="the image is damaged")
        pieces: list[tuple[int | None, int]] = []
        left = size
        for cluster in clusters[:needed]:
            length = min(size_of, left)
            offset = self.offset(cluster)
            last = pieces[-1] if pieces else None
            if last is not None and last[0] is not None and last[0] + last[1] == offset:
                pieces[-1] = (last[0], last[1] + length)
            else:
                pieces.append((offset, length))
            left -= length
        return Content(size, file_region(self.path, pieces, file_size=self.file_size,
                                         what=what))


def _short_text(raw: bytes, case_bits: int) -> str:
    base, ext = raw[:8].rstrip(b" "), raw[8:11].rstrip(b" ")
    if base[:1] == b"\x05":
        base = b"\xe5" + base[1:]
    base_text = base.decode("cp437")
    ext_text = ext.decode("cp437")
    if case_bits & CASE_LOWER_BASE:
        base_text = base_text.lower()
    if case_bits & CASE_LOWER_EXT:
        ext_text = ext_text.lower()
    return f"{base_text}.{ext_text}" if ext_text else base_text


def _long_text(slots: list[bytes], checksum: int) -> str | None:
    """The name the slots (in on-disk order) spell for an alias with ``checksum``."""
    if not slots:
        return None
    count = slots[0][0] & 0x3F
    if not slots[0][0] & LAST_LONG_ENTRY or count != len(slots):
        return None
    units = b""
    for expected, slot in zip(range(count, 0, -1), slots, strict=True):
        order, part1, _attr, _kind, slot_sum, part2, _start, part3 = MSDOS_DIR_SLOT.unpack(slot)
        if order & 0x3F != expected or slot_sum != checksum:
            return None
        units = part1 + part2 + part3 + units
    for index in range(0, len(units), 2):
        if units[index:index + 2] == b"\0\0":
            units = units[:index]
            break
    try:
        return units.decode("utf-16-le")
    except UnicodeDecodeError:
        return None


def read_tree(path: bytes) -> Tree:
    shown = path.decode("utf-8", "backslashreplace")
    with open(path, "rb") as image:
        reader = _Reader(path, image, shown)
        tree = Tree(Entry(b"", EntryType.DIRECTORY, 0o755))
        volume = reader.volume
        pending: list[tuple[bytes, int | None]] = [
            (b"", volume.root_cluster if volume.fat_bits == 32 else None)]
        seen: set[int] = set()
        while pending:
            directory, first = pending.pop()
            what = "/" + directory.decode("utf-8", "backslashreplace")
            if first is not None:
                if first in seen:
                    raise ImageError(f"{shown}: directory {what} loops",
                                     hint="the image is damaged")
                seen.add(first)
            raw = reader.directory(first, what)
            for name, record in _records(raw, shown, what):
                child = f"{directory.decode()}/{name}".lstrip("/").encode()
                pending.extend(_add(tree, reader, child, record))
    return tree


def _records(raw: bytes, shown: str, what: str) -> list[tuple[str, tuple[int, ...]]]:
    """(name, short entry fields) of every live entry of a directory."""
    out = []
    slots: list[bytes] = []
    for offset in range(0, len(raw) - DIR_ENTRY_SIZE + 1, DIR_ENTRY_SIZE):
        record = raw[offset:offset + DIR_ENTRY_SIZE]
        if record[0] == 0:
            break
        if record[0] == DELETED:
            slots = []
            continue
        if record[11] == ATTR_EXT:
            slots.append(record)
            continue
        fields = MSDOS_DIR_ENTRY.unpack(record)
        short = fields[0]
        long_text = _long_text(slots, alias_checksum(short))
        slots = []
        if fields[1] & ATTR_VOLUME or short in (b".          ", b"..         "):
            continue
        name = long_text or _short_text(short, fields[2])
        if not name or "/" in name or "\0" in name or name in (".", ".."):
            raise ImageError(f"{shown}: {what} holds the bad name {name!r}",
                             hint="the image is damaged")
        out.append((name, fields))
    return out


def _add(tree: Tree, reader: _Reader, path: bytes,
         fields: tuple[int, ...]) -> list[tuple[bytes, int | None]]:
    attr, high, time, date, low, size = (fields[1], fields[7], fields[8], fields[9],
                                         fields[10], fields[11])
    seconds = unix_time(date, time)
    mtime = (FAT_FIRST if seconds is None else seconds) * NS
    first = (high << 16 | low) if reader.volume.fat_bits == 32 else low
    what = "/" + path.decode("utf-8", "backslashreplace")
    if attr & ATTR_DIR:
        tree.add(Entry(path, EntryType.DIRECTORY, 0o755, mtime_ns=mtime))
        return [(path, first)]
    content = reader.content(first, size, what)
    mode = 0o444 if attr & ATTR_RO else 0o644
    tree.add(Entry(path, EntryType.REGULAR, mode, mtime_ns=mtime, content=content))
    return []
