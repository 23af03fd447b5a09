"""Serialise a planned FAT image: directories and file data in cluster order, then the
FATs, and last the boot sector (its volume id hashes the contents written before it)."""

from __future__ import annotations

import array
import io
import os
import sys
from typing import BinaryIO

from reprobuild.errors import ImageError
from reprobuild.images.contents import ContentStreamer
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
from reprobuild.images.vfat.volume_id import THREAD_BYTES, VolumeIdHash

FSINFO_SECTOR = 1
BACKUP_BOOT_SECTOR = 6
NO_NAME = b"NO NAME    "
OEM_NAME = b"MSWIN4.1"  # what the FAT specification recommends drivers see
END_OF_CHAIN = {12: 0xFFF, 16: 0xFFFF, 32: 0x0FFFFFFF}
# Files up to this size are read whole in one call; larger ones stream in pieces.
WHOLE_FILE = 1 << 20
# The data area is written in batches of about this many bytes and at most this many
# pieces (the kernel's IOV_MAX is 1024).
BATCH = 4 << 20
BATCH_PIECES = 1000
_ZEROS = memoryview(bytes(64 << 10))  # padding: less than a cluster (at most 64 KiB)


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


def _write_clusters(layout: Layout, output: BinaryIO, hasher: VolumeIdHash | None) -> None:
    """Directories and files in cluster order: they lie end to end from cluster 2, so
    this is one sequential stream (each file padded to its last cluster), written a few
    MiB at a time (see :class:`_ClusterStream`)."""
    cluster_size = layout.geometry.cluster_size
    files = iter(layout.files)
    stream = _ClusterStream(output, layout.geometry.cluster_offset(2))
    with ContentStreamer() as contents:
        for path, extent in layout.extents.items():
            if not extent.count:
                continue
            raw = layout.directories.get(path)
            if raw is not None:
                stream.put(raw)
                continue
            entry = next(files)
            assert entry.path == path and entry.content is not None
            written = 0
            try:
                if entry.size <= WHOLE_FILE:
                    data = contents.whole(entry.content)
                    written = len(data)
                    if written == entry.size:  # else refused below, before any byte of it
                        stream.put(data)
                        if hasher is not None:
                            hasher.update(data)
                else:
                    for chunk in contents.chunks(entry.content):
                        stream.put(chunk)
                        if hasher is not None:
                            hasher.update(chunk)
                        written += len(chunk)
            except OSError as error:
                raise ImageError(f"{entry.display()}: cannot read its content: "
                                 f"{error.strerror}",
                                 hint="check that the source tree is readable") from None
            if written != entry.size:
                # A file read whole is read one byte past its size: it grew by at least one.
                found = f"more than {entry.size}" if written > entry.size else written
                raise ImageError(f"{entry.display()}: content is {found} bytes, expected "
                                 f"{entry.size}", hint="do not modify the source tree during "
                                                       "a build")
            stream.pad(-written % cluster_size)
    stream.flush()


class _ClusterStream:
    """Bytes written at consecutive offsets of ``output`` from ``offset`` on, gathered
    into batches of up to :data:`BATCH` bytes and :data:`BATCH_PIECES` pieces: one
    ``pwritev`` a batch when ``output`` is a file (the pieces are not copied again),
    else one ``write`` of the joined batch."""

    def __init__(self, output: BinaryIO, offset: int) -> None:
        self.output = output
        self.offset = offset
        self.pieces: list[bytes | memoryview] = []
        self.size = 0
        try:
            self.fd: int | None = output.fileno()
        except (OSError, AttributeError, io.UnsupportedOperation):
            self.fd = None
        if self.fd is not None:
            output.flush()  # what went through ``output`` lies before our writes
        else:
            output.seek(offset)

    def put(self, data: bytes | memoryview) -> None:
        if data:
            self.pieces.append(data)
            self.size += len(data)
            if self.size >= BATCH or len(self.pieces) >= BATCH_PIECES:
                self.flush()

    def pad(self, count: int) -> None:
        """``count`` zero bytes (less than a cluster)."""
        if count:
            self.put(_ZEROS[:count])

    def flush(self) -> None:
        if not self.pieces:
            return
        if self.fd is None:
            self.output.write(b"".join(self.pieces))
        else:
            done = os.pwritev(self.fd, self.pieces, self.offset)
            if done < self.size:  # a short write: the rest one piece at a time
                rest = memoryview(b"".join(self.pieces))[done:]
                while rest:
                    count = os.pwrite(self.fd, rest, self.offset + done)
                    rest = rest[count:]
                    done += count
        self.offset += self.size
        self.pieces = []
        self.size = 0


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
    if volume_id is None:
        # The derived volume id hashes every directory and file byte: skipped when given.
        file_bytes = sum(entry.size for entry in layout.files)
        with VolumeIdHash(seed, threaded=file_bytes >= THREAD_BYTES) as hasher:
            for path, raw in layout.directories.items():
                hasher.update(len(path).to_bytes(4, "little") + path + raw)
            _write_clusters(layout, output, hasher)
            volume_id = hasher.digest()
    else:
        _write_clusters(layout, output, None)
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
