"""GPT on-disk structures: the partition types by name, the layout plan, and its bytes.

Spec: UEFI 2.10 chapter 5 (protective MBR, GPT header, partition entry array) and the
UAPI Discoverable Partitions Specification (type GUIDs, attribute bits 59/60/63). Pure
code: :func:`plan` computes every LBA as data; :func:`protective_mbr`, :func:`entry_array`
and :func:`header` turn a plan into bytes; :func:`parse` reads them back. No I/O here.
"""

from __future__ import annotations

import struct
import uuid as uuidlib
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import blake3

from reprobuild.errors import ImageError

# Partition type GUIDs by the names the Discoverable Partitions Specification uses.
PARTITION_TYPES: dict[str, str] = {
    "esp": "c12a7328-f81f-11d2-ba4b-00a0c93ec93b",
    "xbootldr": "bc13c2ff-59e6-4262-a352-b275fd6f7172",
    "swap": "0657fd6d-a4ab-43c4-84e5-0933c84b4f4f",
    "home": "933ac7e1-2eb4-4f13-b844-0e14e2aef915",
    "srv": "3b8f8425-20e0-4f3b-907f-1a25a76f98e8",
    "var": "4d21b016-b534-45c2-a9fb-5c16e091fd2d",
    "tmp": "7ec6f557-3bc5-4aca-b293-16ef5df639d1",
    "linux-generic": "0fc63daf-8483-4772-8e79-3d69d8477de4",
    "root-x86-64": "4f68bce3-e8cd-4db1-96e7-fbcaf984b709",
    "root-x86-64-verity": "2c7357ed-ebd2-46d9-aec1-23d437ec2bf5",
    "usr-x86-64": "8484680c-9521-48c6-9c11-b0720656f69e",
    "usr-x86-64-verity": "77ff5f63-e7b6-4633-acf4-1565b864c0e6",
    "root-arm64": "b921b045-1df0-41c3-af44-4c6f280d3fae",
    "root-arm64-verity": "df3300ce-d69f-4c92-978c-9bfb0f38d820",
    "usr-arm64": "b0e01050-ee5f-4390-949a-9101b17104e9",
    "usr-arm64-verity": "6e11a4e7-fbca-4ded-b9e9-e1a512bb664e",
    "root-riscv64": "72ec70a6-cf74-40e6-bd49-4bda08e8f224",
    "root-riscv64-verity": "b6ed5582-440b-4209-b8da-5ff7c419ea3d",
    "usr-riscv64": "beaec34b-8442-439b-a40b-984381ed097d",
    "usr-riscv64-verity": "8f1056be-9b05-47c4-81d6-be53128e5b54",
}
TYPE_NAMES: dict[str, str] = {guid: name for name, guid in PARTITION_TYPES.items()}

# Partition attribute bits: UEFI (0-2) and the Discoverable Partitions Specification.
ATTRIBUTE_BITS: dict[str, int] = {
    "required": 0,
    "legacy-bios-bootable": 2,
    "growfs": 59,
    "read-only": 60,
    "no-auto": 63,
}

GPT_SIGNATURE = b"EFI PART"
GPT_REVISION = 0x00010000
ENTRY_COUNT = 128
ENTRY_SIZE = 128
NAME_UNITS = 36  # UTF-16 code units in an entry's name

# Protective MBR partition record at offset 446 of LBA 0 (UEFI 5.2.3, table 5-4):
#   0 u8 boot indicator  1 u8 start CHS[3]  4 u8 OS type (0xEE)  5 u8 end CHS[3]
#   8 le32 starting LBA (1)  12 le32 size in LBA
MBR_PARTITION_RECORD = struct.Struct("<B3sB3sII")
MBR_RECORD_OFFSET = 446
MBR_SIGNATURE = b"\x55\xaa"

# GPT header (UEFI 5.3.2, table 5-5), 92 bytes, little endian:
#   0 signature[8]  8 le32 revision  12 le32 header size (92)  16 le32 header CRC32
#  20 le32 reserved  24 le64 MyLBA  32 le64 AlternateLBA  40 le64 FirstUsableLBA
#  48 le64 LastUsableLBA  56 DiskGUID[16]  72 le64 PartitionEntryLBA
#  80 le32 NumberOfPartitionEntries  84 le32 SizeOfPartitionEntry
#  88 le32 PartitionEntryArrayCRC32
GPT_HEADER = struct.Struct("<8sIIII QQQQ 16s QIII")

# GPT partition entry (UEFI 5.3.3, table 5-6), 128 bytes:
#   0 PartitionTypeGUID[16]  16 UniquePartitionGUID[16]  32 le64 StartingLBA
#  40 le64 EndingLBA (inclusive)  48 le64 Attributes  56 PartitionName[72] (UTF-16LE)
GPT_ENTRY = struct.Struct("<16s16sQQQ72s")

_GUID_CONTEXT = "reprobuild 2026-11 gpt guid"


def type_guid(name_or_guid: str) -> str:
    """The type GUID for a DPS name (``root-x86-64``) or a literal GUID."""
    key = name_or_guid.lower()
    if key in PARTITION_TYPES:
        return PARTITION_TYPES[key]
    try:
        return str(uuidlib.UUID(key))
    except ValueError:
        known = ", ".join(sorted(PARTITION_TYPES))
        raise ImageError(f"unknown partition type {name_or_guid!r}",
                         hint=f"use a GUID or one of {known}") from None


def derive_guid(seed: str, purpose: str) -> str:
    """A GUID (random-variant form) derived from ``seed`` and what it names."""
    raw = bytearray(blake3.blake3(seed.encode() + b"\0" + purpose.encode(),
                                  derive_key_context=_GUID_CONTEXT).digest(16))
    raw[6] = (raw[6] & 0x0F) | 0x40
    raw[8] = (raw[8] & 0x3F) | 0x80
    return str(uuidlib.UUID(bytes=bytes(raw)))


def encode_name(name: str) -> bytes:
    raw = name.encode("utf-16-le")
    if len(raw) > NAME_UNITS * 2:
        raise ImageError(f"partition label {name!r} is longer than {NAME_UNITS} UTF-16 "
                         "code units", hint="use a shorter label")
    return raw.ljust(NAME_UNITS * 2, b"\0")


def decode_name(raw: bytes) -> str:
    text = raw.decode("utf-16-le", "replace")
    return text.split("\0", 1)[0]


def _round_up(value: int, unit: int) -> int:
    return -(-value // unit) * unit


@dataclass(frozen=True)
class PartitionSpec:
    """One partition as asked for: content size, explicit size, identity and flags."""

    label: str
    type_guid: str
    uuid: str
    content_size: int
    size: int | None = None  # bytes; None: content rounded up to the alignment
    attributes: int = 0


@dataclass(frozen=True)
class PlannedPartition:
    number: int  # 1-based
    spec: PartitionSpec
    first_lba: int
    last_lba: int  # inclusive

    def offset(self, sector_size: int) -> int:
        return self.first_lba * sector_size

    def size(self, sector_size: int) -> int:
        return (self.last_lba - self.first_lba + 1) * sector_size


@dataclass(frozen=True)
class DiskLayout:
    """Every LBA of the disk, computed before any byte is written."""

    sector_size: int
    total_lbas: int
    disk_guid: str
    partitions: tuple[PlannedPartition, ...]

    @property
    def entry_array_lbas(self) -> int:
        return ENTRY_COUNT * ENTRY_SIZE // self.sector_size

    @property
    def first_usable_lba(self) -> int:
        return 2 + self.entry_array_lbas

    @property
    def last_lba(self) -> int:
        return self.total_lbas - 1

    @property
    def last_usable_lba(self) -> int:
        return self.last_lba - 1 - self.entry_array_lbas

    @property
    def backup_entries_lba(self) -> int:
        return self.last_lba - self.entry_array_lbas

    @property
    def size(self) -> int:
        return self.total_lbas * self.sector_size


def plan(specs: Sequence[PartitionSpec], *, disk_guid: str, sector_size: int = 512,
         alignment: int = 1 << 20, disk_size: int | None = None) -> DiskLayout:
    """Place partitions in order, each starting on an ``alignment`` boundary.

    A partition's size is its ``size`` or its content rounded up to the alignment. The
    disk is the end of the last partition plus the backup GPT, rounded up to the
    alignment, unless ``disk_size`` is given (then it must be large enough).
    """
    if sector_size not in (512, 4096):
        raise ImageError(f"sector size {sector_size} is not supported", hint="use 512 or 4096")
    if alignment % sector_size or alignment <= 0:
        raise ImageError(f"alignment {alignment} is not a multiple of the sector size "
                         f"{sector_size}")
    if len(specs) > ENTRY_COUNT:
        raise ImageError(f"{len(specs)} partitions do not fit in {ENTRY_COUNT} GPT entries")
    array_lbas = ENTRY_COUNT * ENTRY_SIZE // sector_size
    position = _round_up((2 + array_lbas) * sector_size, alignment)
    placed: list[PlannedPartition] = []
    for number, spec in enumerate(specs, start=1):
        if spec.size is not None:
            if spec.size % sector_size:
                raise ImageError(f"partition {spec.label!r}: size {spec.size} is not a "
                                 f"multiple of the sector size {sector_size}")
            if spec.size < spec.content_size:
                raise ImageError(f"partition {spec.label!r}: size {spec.size} is smaller "
                                 f"than its content ({spec.content_size} bytes)",
                                 hint="raise the partition's size or leave it out")
            size = spec.size
        else:
            size = _round_up(max(spec.content_size, 1), alignment)
        first = position // sector_size
        placed.append(PlannedPartition(number, spec, first, first + size // sector_size - 1))
        position = _round_up(position + size, alignment)
    backup = (1 + array_lbas) * sector_size
    needed = _round_up(position + backup, alignment)
    if disk_size is None:
        disk_size = needed
    elif disk_size < position + backup or disk_size % sector_size:
        raise ImageError(f"disk size {disk_size} is too small or not whole sectors",
                         hint=f"the partitions need at least {position + backup} bytes")
    return DiskLayout(sector_size, disk_size // sector_size, disk_guid, tuple(placed))


def protective_mbr(layout: DiskLayout) -> bytes:
    """LBA 0: one partition of type 0xEE covering the disk (or 2^32-1 sectors)."""
    sector = bytearray(layout.sector_size)
    size = min(layout.total_lbas - 1, 0xFFFFFFFF)
    record = MBR_PARTITION_RECORD.pack(0, b"\x00\x02\x00", 0xEE, b"\xff\xff\xff", 1, size)
    sector[MBR_RECORD_OFFSET:MBR_RECORD_OFFSET + len(record)] = record
    sector[510:512] = MBR_SIGNATURE
    return bytes(sector)


def entry_array(layout: DiskLayout) -> bytes:
    """The 128 partition entries (unused ones zero)."""
    out = bytearray(ENTRY_COUNT * ENTRY_SIZE)
    for part in layout.partitions:
        spec = part.spec
        raw = GPT_ENTRY.pack(uuidlib.UUID(spec.type_guid).bytes_le,
                             uuidlib.UUID(spec.uuid).bytes_le, part.first_lba, part.last_lba,
                             spec.attributes, encode_name(spec.label))
        start = (part.number - 1) * ENTRY_SIZE
        out[start:start + ENTRY_SIZE] = raw
    return bytes(out)


def header(layout: DiskLayout, entries: bytes, *, primary: bool) -> bytes:
    """The primary (LBA 1) or backup (last LBA) header sector, CRCs filled in."""
    my_lba, alternate = (1, layout.last_lba) if primary else (layout.last_lba, 1)
    entries_lba = 2 if primary else layout.backup_entries_lba
    fields = [GPT_SIGNATURE, GPT_REVISION, GPT_HEADER.size, 0, 0, my_lba, alternate,
              layout.first_usable_lba, layout.last_usable_lba,
              uuidlib.UUID(layout.disk_guid).bytes_le, entries_lba, ENTRY_COUNT, ENTRY_SIZE,
              zlib.crc32(entries)]
    crc = zlib.crc32(GPT_HEADER.pack(*fields))
    fields[3] = crc
    return GPT_HEADER.pack(*fields).ljust(layout.sector_size, b"\0")


@dataclass(frozen=True)
class GptEntry:
    """A partition entry read back from a disk."""

    number: int
    type_guid: str
    uuid: str
    first_lba: int
    last_lba: int
    attributes: int
    name: str


@dataclass(frozen=True)
class GptTable:
    """A GPT read back from a disk, after its CRCs were checked."""

    sector_size: int
    disk_guid: str
    first_usable_lba: int
    last_usable_lba: int
    alternate_lba: int
    entries: tuple[GptEntry, ...]


def parse(head: bytes, sector_size: int, where: str) -> GptTable:
    """Parse the primary GPT from the first bytes of a disk (LBA 0 to the entry array)."""
    raw = head[sector_size:sector_size + GPT_HEADER.size]
    if len(raw) < GPT_HEADER.size or raw[:8] != GPT_SIGNATURE:
        raise ImageError(f"{where}: no GPT header at LBA 1 (sector size {sector_size})",
                         hint="is this a GPT disk image?")
    fields = list(GPT_HEADER.unpack(raw))
    (_, _, header_size, crc, _, _, alternate, first_usable, last_usable, guid, entries_lba,
     count, entry_size, entries_crc) = fields
    check = fields.copy()
    check[3] = 0
    if header_size != GPT_HEADER.size or zlib.crc32(GPT_HEADER.pack(*check)) != crc:
        raise ImageError(f"{where}: GPT header CRC mismatch", hint="the disk is corrupt")
    if entry_size < GPT_ENTRY.size or entry_size % 8 or count * entry_size > len(head):
        raise ImageError(f"{where}: GPT header claims {count} entries of {entry_size} "
                         "bytes", hint="the partition table is damaged")
    start = entries_lba * sector_size
    array = head[start:start + count * entry_size]
    if len(array) != count * entry_size or zlib.crc32(array) != entries_crc:
        raise ImageError(f"{where}: GPT partition entry array CRC mismatch",
                         hint="the disk is corrupt")
    entries = []
    for index in range(count):
        chunk = array[index * entry_size:index * entry_size + GPT_ENTRY.size]
        type_raw, uuid_raw, first, last, attributes, name = GPT_ENTRY.unpack(chunk)
        if type_raw == bytes(16):
            continue
        entries.append(GptEntry(index + 1, str(uuidlib.UUID(bytes_le=type_raw)),
                                str(uuidlib.UUID(bytes_le=uuid_raw)), first, last,
                                attributes, decode_name(name)))
    return GptTable(sector_size, str(uuidlib.UUID(bytes_le=guid)), first_usable, last_usable,
                    alternate, tuple(entries))
