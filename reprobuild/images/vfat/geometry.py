"""The FAT type and layout of a volume of a given size, chosen as ``mkfs.fat`` does.

Follows dosfstools' ``mkfs.fat`` (``establish_params`` and ``setup_tables``) for a fixed
disk with 512-byte sectors, two FATs and aligned structures: FAT32 from 512 MiB up,
otherwise the FAT12 or FAT16 with more clusters; clusters start at 2 KiB (FAT12/16) or
by volume size (FAT32) and double until the clusters fit the type; 1 (FAT12/16) or 32
(FAT32) reserved sectors, 512 root entries for FAT12/16, the reserved area, FATs and
root directory rounded to whole clusters above 4 MiB. The plan is data; nothing here
reads or writes bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

from reprobuild.images.vfat.ondisk import DIR_ENTRY_SIZE, SECTOR

NUM_FATS = 2
MAX_CLUST_12 = 4084
MIN_CLUST_16 = 4087
MAX_CLUST_16 = 65524
MIN_CLUST_32 = 65525
MAX_CLUST_32 = 268435446
DEFAULT_ROOT_ENTRIES = 512
FAT32_THRESHOLD = 512 << 20  # bytes; mkfs.fat picks FAT32 from this size up
MAX_SECTORS = (1 << 32) - 1


@dataclass(frozen=True)
class Geometry:
    """Where everything lies, in 512-byte sectors; clusters are numbered from 2."""

    fat_bits: int
    total_sectors: int
    sectors_per_cluster: int
    reserved_sectors: int
    fat_length: int  # sectors of one FAT
    root_entries: int  # 0 on FAT32 (the root is a cluster chain)
    cluster_count: int
    sectors_per_track: int
    heads: int

    @property
    def cluster_size(self) -> int:
        return self.sectors_per_cluster * SECTOR

    @property
    def fat_start(self) -> int:
        return self.reserved_sectors

    @property
    def root_start(self) -> int:
        return self.reserved_sectors + NUM_FATS * self.fat_length

    @property
    def data_start(self) -> int:
        return self.root_start + self.root_entries * DIR_ENTRY_SIZE // SECTOR

    def cluster_offset(self, cluster: int) -> int:
        """Byte offset of ``cluster`` (2 is the first)."""
        return (self.data_start + (cluster - 2) * self.sectors_per_cluster) * SECTOR


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _chs(total_sectors: int) -> tuple[int, int]:
    """(sectors per track, heads) as mkfs.fat derives them when the device has none."""
    if total_sectors <= 524288:  # the SD card specification's recommendation
        heads = (2 if total_sectors <= 32768 else 4 if total_sectors <= 65536
                 else 8 if total_sectors <= 262144 else 16)
        return (16 if total_sectors <= 4096 else 32), heads
    heads = (16 if total_sectors <= 16 * 63 * 1024 else 32 if total_sectors <= 32 * 63 * 1024
             else 64 if total_sectors <= 64 * 63 * 1024
             else 128 if total_sectors <= 128 * 63 * 1024 else 255)
    return 63, heads


def _fat32_cluster_sectors(sectors: int) -> int:
    return (64 if sectors > 32 * 1024 * 1024 * 2 else 32 if sectors > 16 * 1024 * 1024 * 2
            else 16 if sectors > 8 * 1024 * 1024 * 2 else 8 if sectors > 260 * 1024 * 2 else 1)


@dataclass
class _Try:
    bits: int
    clusters: int
    fat_length: int


def _tries(num_sectors: int, reserved: int, root_sectors: int, spc: int, aligned: bool,
           *, fat32_allowed_small: bool) -> dict[int, _Try]:
    """mkfs.fat's three candidate layouts for ``spc`` sectors per cluster (0 clusters:
    that type does not fit)."""
    def align(sectors: int) -> int:
        return _cdiv(sectors, spc) * spc if aligned else sectors

    fatdata32 = num_sectors - align(reserved)
    fatdata1216 = fatdata32 - align(root_sectors)
    clust12 = 2 * (fatdata1216 * SECTOR + NUM_FATS * 3) // (2 * spc * SECTOR + NUM_FATS * 3)
    fatlength12 = align(_cdiv(((clust12 + 2) * 3 + 1) >> 1, SECTOR))
    clust12 = (fatdata1216 - NUM_FATS * fatlength12) // spc
    if clust12 > min(fatlength12 * 2 * SECTOR // 3, MAX_CLUST_12):
        clust12 = 0
    clust16 = (fatdata1216 * SECTOR + NUM_FATS * 4) // (spc * SECTOR + NUM_FATS * 2)
    fatlength16 = align(_cdiv((clust16 + 2) * 2, SECTOR))
    clust16 = (fatdata1216 - NUM_FATS * fatlength16) // spc
    if clust16 > min(fatlength16 * SECTOR // 2, MAX_CLUST_16) or clust16 < MIN_CLUST_16:
        clust16 = 0
    clust32 = (fatdata32 * SECTOR + NUM_FATS * 8) // (spc * SECTOR + NUM_FATS * 4)
    fatlength32 = align(_cdiv((clust32 + 2) * 4, SECTOR))
    clust32 = (fatdata32 - NUM_FATS * fatlength32) // spc
    if clust32 > min(fatlength32 * SECTOR // 4, MAX_CLUST_32) or (
            clust32 < MIN_CLUST_32 and not fat32_allowed_small):
        clust32 = 0
    return {12: _Try(12, max(clust12, 0), fatlength12), 16: _Try(16, max(clust16, 0),
            fatlength16), 32: _Try(32, max(clust32, 0), fatlength32)}


def choose(size: int, *, fat_bits: int | None = None,
           root_entries: int = DEFAULT_ROOT_ENTRIES) -> Geometry | None:
    """The layout mkfs.fat gives a ``size``-byte volume (``-F fat_bits`` when given,
    ``-r root_entries``), or None when no FAT of that type fits the size."""
    num_sectors = min(size // 1024 * 2, MAX_SECTORS)
    sectors_per_track, heads = _chs(num_sectors)
    by_user = fat_bits
    if fat_bits is None and size >= FAT32_THRESHOLD:
        fat_bits = 32
    spc = _fat32_cluster_sectors(num_sectors) if fat_bits == 32 else 4
    reserved = 32 if fat_bits == 32 else 1
    root_entries = 0 if fat_bits == 32 else root_entries
    root_sectors = _cdiv(root_entries * DIR_ENTRY_SIZE, SECTOR)
    num_sectors = num_sectors // sectors_per_track * sectors_per_track
    aligned = num_sectors > 8192
    tries: dict[int, _Try] = {}
    while spc <= 128:
        tries = _tries(num_sectors, reserved, root_sectors, spc, aligned,
                       fat32_allowed_small=by_user == 32)
        wanted = (12, 16) if fat_bits is None else (fat_bits,)
        if any(tries[bits].clusters for bits in wanted):
            break
        spc <<= 1
    else:
        return None
    if fat_bits is None:
        fat_bits = 16 if tries[16].clusters > tries[12].clusters else 12
    chosen = tries[fat_bits]
    if chosen.clusters == 0:
        return None
    if aligned:
        reserved = _cdiv(reserved, spc) * spc
        root_entries = _cdiv(root_sectors, spc) * spc * (SECTOR // DIR_ENTRY_SIZE)
    return Geometry(fat_bits, num_sectors, spc, reserved, chosen.fat_length, root_entries,
                    chosen.clusters, sectors_per_track, heads)
