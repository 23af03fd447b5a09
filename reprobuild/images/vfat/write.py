"""Serialise a planned FAT image: directories and file data in cluster order, then the
FATs, and last the boot sector (its volume id hashes the contents written before it)."""

from __future__ import annotations

import array
import sys
from typing import BinaryIO

import blake3

from reprobuild.images.vfat.data import write_data_area
from reprobuild.images.vfat.geometry import NUM_FATS, Geometry
from reprobuild.images.vfat.layout import Layout
from reprobuild.images.vfat.ondisk import (
    BOOT_CODE_16,
    BOOT_CODE_32,
    BOOT_SIGNATURE,
    EXTENDED_SIGNATURE,
    FAT16_EXTENSION,
    FAT32_EXTENSION,
    FAT_BOOT_SECTOR,
    FSINFO_LEAD,
    FSINFO_SIGNATURES,
    FSINFO_TAIL,
    FSINFO_TAIL_OFFSET,
    HALT_CODE,
    MEDIA_FIXED,
    SECTOR,
    UNKNOWN_FREE,
)

FSINFO_SECTOR = 1
BACKUP_BOOT_SECTOR = 6
NO_NAME = b"NO NAME    "
OEM_NAME = b"MSWIN4.1"  # what the FAT specification recommends drivers see
END_OF_CHAIN = {12: 0xFFF, 16: 0xFFFF, 32: 0x0FFFFFFF}


def fat_table(layout: Layout) -> bytes:
    """One FAT: entries 0 and 1 as mkfs.fat writes them, then each extent a chain."""
    geometry = layout.geometry
    eoc = END_OF_CHAIN[geometry.fat_bits]
    entries = array.array("I", bytes(4 * (geometry.cluster_count + 2)))
    entries[0] = (eoc & ~0xFF) | MEDIA_FIXED
    entries[1] = eoc
    for extent in layout.extents.values():
        if extent.count:
            end = extent.first + extent.count
            entries[extent.first:end - 1] = array.array("I", range(extent.first + 1, end))
            entries[end - 1] = eoc
    if geometry.fat_bits == 32:
        packed = _little_endian(entries)
    elif geometry.fat_bits == 16:
        packed = _little_endian(array.array("H", entries))
    else:
        packed = _fat12(entries)
    return packed + bytes(geometry.fat_length * SECTOR - len(packed))


def _little_endian(entries: array.array[int]) -> bytes:
    if sys.byteorder == "big":
        entries = array.array(entries.typecode, entries)
        entries.byteswap()
    return entries.tobytes()


def _fat12(entries: array.array[int]) -> bytes:
    values = list(entries) + ([0] if len(entries) % 2 else [])
    out = bytearray()
    for index in range(0, len(values), 2):
        pair = values[index] | (values[index + 1] << 12)
        out += pair.to_bytes(3, "little")
    return bytes(out[:(len(entries) * 3 + 1) // 2])


def boot_sector(geometry: Geometry, volume_id: int, label: bytes | None) -> bytes:
    fat32 = geometry.fat_bits == 32
    total = geometry.total_sectors
    common = FAT_BOOT_SECTOR.pack(
        b"\xeb" + bytes([(BOOT_CODE_32 if fat32 else BOOT_CODE_16) - 2]) + b"\x90",
        OEM_NAME, SECTOR, geometry.sectors_per_cluster, geometry.reserved_sectors,
        NUM_FATS, geometry.root_entries, total if total < 65536 else 0, MEDIA_FIXED,
        0 if fat32 else geometry.fat_length, geometry.sectors_per_track, geometry.heads, 0,
        total if total >= 65536 else 0)
    name = label or NO_NAME
    if fat32:
        tail = FAT32_EXTENSION.pack(geometry.fat_length, 0, 0, 2, FSINFO_SECTOR,
                                    BACKUP_BOOT_SECTOR, bytes(12), 0x80, 0,
                                    EXTENDED_SIGNATURE, volume_id, name, b"FAT32   ")
    else:
        tail = FAT16_EXTENSION.pack(0x80, 0, EXTENDED_SIGNATURE, volume_id, name,
                                    b"FAT12   " if geometry.fat_bits == 12 else b"FAT16   ")
    head = common + tail + HALT_CODE
    return head + bytes(SECTOR - 2 - len(head)) + BOOT_SIGNATURE


def fsinfo_sector(free: int, next_free: int) -> bytes:
    lead, middle, trail = FSINFO_SIGNATURES
    return (FSINFO_LEAD.pack(lead) + bytes(FSINFO_TAIL_OFFSET - 4)
            + FSINFO_TAIL.pack(middle, free, next_free, bytes(12), trail))


def write_image(layout: Layout, output: BinaryIO, seed: bytes,
                volume_id: int | None) -> None:
    """Write the planned image to the empty, seekable ``output``."""
    geometry = layout.geometry
    output.seek(layout.image_size - 1)  # the full length, also for an in-memory output
    output.write(b"\0")
    if b"" not in layout.extents:  # the FAT12/16 root has its own area
        output.seek(geometry.root_start * SECTOR)
        output.write(layout.directories[b""])
    # The derived volume id hashes the FAT12/16 root area and the data area as written
    # (every directory, file and padding byte): skipped when given.
    hasher = (blake3.blake3(b"reprobuild vfat volume id v2\0" + seed + b"\0")
              if volume_id is None else None)
    if hasher is not None and b"" not in layout.extents:
        hasher.update(layout.directories[b""])
    write_data_area(layout, output, hasher)
    if hasher is not None:
        volume_id = int.from_bytes(hasher.digest(length=4), "little")
    assert volume_id is not None
    table = fat_table(layout)
    for copy in range(NUM_FATS):
        output.seek((geometry.fat_start + copy * geometry.fat_length) * SECTOR)
        output.write(table)
    boot = boot_sector(geometry, volume_id, layout.label)
    output.seek(0)
    output.write(boot)
    if geometry.fat_bits == 32:
        free = geometry.cluster_count - layout.used_clusters
        next_free = 2 + layout.used_clusters if free else UNKNOWN_FREE
        info = fsinfo_sector(free, next_free)
        for base in (0, BACKUP_BOOT_SECTOR):
            output.seek((base + FSINFO_SECTOR) * SECTOR)
            output.write(info)
        output.seek(BACKUP_BOOT_SECTOR * SECTOR)
        output.write(boot)
