"""FAT on-disk structures (Microsoft "FAT32 File System Specification" 1.03; Linux
include/uapi/linux/msdos_fs.h), all little-endian, and the FAT time encoding."""

from __future__ import annotations

import datetime
import functools
import struct

SECTOR = 512
DIR_ENTRY_SIZE = 32
LFN_UNITS = 13  # UTF-16 units in one long-name slot
MAX_NAME_UNITS = 255
MAX_FILE_SIZE = (1 << 32) - 1
MAX_DIR_ENTRIES = 65536  # a directory's entries are indexed by 16 bits
MEDIA_FIXED = 0xF8

# struct fat_boot_sector, common part (msdos_fs.h), bytes 0-35: ignored[3] (jump) @0,
# system_id[8] @3, sector_size @11, sec_per_clus @13, reserved @14, fats @16,
# dir_entries @17, sectors @19, media @21, fat_length @22, secs_track @24, heads @26,
# hidden @28, total_sect @32.
FAT_BOOT_SECTOR = struct.Struct("<3s8sHBHBHHBHHHII")
# FAT12/16 tail at 36 (struct fat_boot_sector.fat16): drive_number @36, state @37,
# signature @38 (0x29), vol_id[4] @39, vol_label[11] @43, fs_type[8] @54.
FAT16_EXTENSION = struct.Struct("<BBBI11s8s")
# FAT32 tail at 36 (struct fat_boot_sector.fat32): length @36, flags @40, version[2] @42,
# root_cluster @44, info_sector @48, backup_boot @50, reserved2[6] (12 bytes) @52,
# drive_number @64, state @65, signature @66, vol_id @67, vol_label[11] @71, fs_type @82.
FAT32_EXTENSION = struct.Struct("<IHHIHH12sBBBI11s8s")
BOOT_CODE_16 = 62
BOOT_CODE_32 = 90
BOOT_SIGNATURE = b"\x55\xaa"  # at 510
EXTENDED_SIGNATURE = 0x29
# The boot code of a data volume: cli; hlt; jmp back to hlt (the firmware never runs it).
HALT_CODE = b"\xfa\xf4\xeb\xfd"

# struct fat_boot_fsinfo: signature1 @0 (0x41615252), reserved1[480], signature2 @484
# (0x61417272), free_clusters @488, next_cluster @492, reserved2[3] (12 bytes),
# trail signature @508 (0xAA550000).
FSINFO_LEAD = struct.Struct("<I")
FSINFO_TAIL = struct.Struct("<III12sI")
FSINFO_SIGNATURES = (0x41615252, 0x61417272, 0xAA550000)
FSINFO_TAIL_OFFSET = 484
UNKNOWN_FREE = 0xFFFFFFFF

# struct msdos_dir_entry: name[11] @0, attr @11, lcase @12, ctime_cs @13, ctime @14,
# cdate @16, adate @18, starthi @20, time @22, date @24, start @26, size @28.
MSDOS_DIR_ENTRY = struct.Struct("<11sBBBHHHHHHHI")
# struct msdos_dir_slot (a long-name slot): id @0, name0_4[10] @1, attr @11 (0x0F),
# reserved @12, alias_checksum @13, name5_10[12] @14, start[2] @26, name11_12[4] @28.
MSDOS_DIR_SLOT = struct.Struct("<B10sBBB12sH4s")

ATTR_RO = 0x01
ATTR_HIDDEN = 0x02
ATTR_SYS = 0x04
ATTR_VOLUME = 0x08
ATTR_DIR = 0x10
ATTR_ARCH = 0x20
ATTR_EXT = 0x0F  # a long-name slot
LAST_LONG_ENTRY = 0x40
DELETED = 0xE5
CASE_LOWER_BASE = 0x08  # lcase bits (Windows NT): the 8-char base is lower case
CASE_LOWER_EXT = 0x10  # the 3-char extension is lower case

# FAT dates count years from 1980 in 7 bits; times have 2-second steps.
FAT_FIRST = int(datetime.datetime(1980, 1, 1, tzinfo=datetime.UTC).timestamp())
FAT_LAST = int(datetime.datetime(2107, 12, 31, 23, 59, 58, tzinfo=datetime.UTC).timestamp())


@functools.lru_cache(maxsize=4096)  # trees share few times (most are the epoch)
def fat_time(seconds: int) -> tuple[int, int]:
    """(date, time) fields of ``seconds`` since 1970 UTC, in [FAT_FIRST, FAT_LAST]; odd
    seconds round down, as the Linux driver stores them."""
    moment = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    date = ((moment.year - 1980) << 9) | (moment.month << 5) | moment.day
    time = (moment.hour << 11) | (moment.minute << 5) | (moment.second // 2)
    return date, time


def unix_time(date: int, time: int) -> int | None:
    """Seconds since 1970 UTC of a FAT (date, time); None when the fields are no date."""
    try:
        moment = datetime.datetime(1980 + (date >> 9), (date >> 5) & 0x0F, date & 0x1F,
                                   time >> 11, (time >> 5) & 0x3F, (time & 0x1F) * 2,
                                   tzinfo=datetime.UTC)
    except ValueError:
        return None
    return int(moment.timestamp())


# Each byte of the checksum rotated right by one bit.
_ROTATED = bytes(((total & 1) << 7) | (total >> 1) for total in range(256))


def alias_checksum(short_name: bytes) -> int:
    """The checksum of an 8.3 name that every long-name slot before it carries: for each
    byte, rotate the sum right by one bit and add the byte."""
    total = 0
    for byte in short_name:
        total = (_ROTATED[total] + byte) & 0xFF
    return total
