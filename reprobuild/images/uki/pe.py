"""PE/COFF as a UEFI stub needs it: parse the headers, plan appended sections, serialise.

Pure model code: :func:`parse_stub` reads bytes it is given, :func:`plan` places the new
sections as ukify does (each after the last one, its address rounded up to the section
alignment and its file offset to the file alignment; an existing section of the same
name, the stub's ``.sbat``, is replaced in place when it fits), and :func:`assemble`
returns the headers with the timestamp zeroed; :func:`pe_checksum` is the image
checksum of the PE/COFF specification (16-bit one's-complement sum plus the length).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, replace

from reprobuild.errors import ImageError

# IMAGE_DOS_HEADER: e_magic "MZ" at 0, e_lfanew (offset of "PE\0\0") at 0x3c.
IMAGE_DOS_SIGNATURE = b"MZ"
E_LFANEW = struct.Struct("<I")
E_LFANEW_OFFSET = 0x3C
IMAGE_NT_SIGNATURE = b"PE\0\0"
# IMAGE_FILE_HEADER (20 bytes after the NT signature): Machine, NumberOfSections,
# TimeDateStamp, PointerToSymbolTable, NumberOfSymbols, SizeOfOptionalHeader,
# Characteristics.
IMAGE_FILE_HEADER = struct.Struct("<HHIIIHH")
# IMAGE_OPTIONAL_HEADER64, the fields we read or rewrite, by offset from its start:
# Magic 0 (0x20b), SizeOfInitializedData 8, SectionAlignment 32, FileAlignment 36,
# SizeOfImage 56, SizeOfHeaders 60, CheckSum 64.
OPT_MAGIC_PE32_PLUS = 0x20B
OPT_SIZE_OF_INITIALIZED_DATA = 8
OPT_SECTION_ALIGNMENT = 32
OPT_FILE_ALIGNMENT = 36
OPT_SIZE_OF_IMAGE = 56
OPT_SIZE_OF_HEADERS = 60
OPT_CHECKSUM = 64
U16 = struct.Struct("<H")
U32 = struct.Struct("<I")
# IMAGE_SECTION_HEADER (40 bytes): Name[8], VirtualSize, VirtualAddress, SizeOfRawData,
# PointerToRawData, PointerToRelocations, PointerToLinenumbers, NumberOfRelocations,
# NumberOfLinenumbers, Characteristics.
IMAGE_SECTION_HEADER = struct.Struct("<8sIIIIIIHHI")
IMAGE_SCN_CNT_CODE = 0x00000020
IMAGE_SCN_CNT_INITIALIZED_DATA = 0x00000040
IMAGE_SCN_MEM_READ = 0x40000000
IMAGE_FILE_MACHINE_AMD64 = 0x8664
MACHINES = {0x014C: "i386", 0x8664: "x86-64", 0xAA64: "arm64", 0x01C4: "arm",
            0x5064: "riscv64", 0x6264: "loongarch64"}


@dataclass(frozen=True)
class Section:
    """One section header: where its bytes sit in the file and in memory."""

    name: str  # latin-1, so that any 8 bytes of a stub's header round-trip
    virtual_size: int
    virtual_address: int
    raw_size: int
    raw_offset: int
    characteristics: int

    def header(self) -> bytes:
        return IMAGE_SECTION_HEADER.pack(self.name.encode("latin-1"), self.virtual_size,
                                         self.virtual_address, self.raw_size, self.raw_offset,
                                         0, 0, 0, 0, self.characteristics)


@dataclass(frozen=True)
class PeImage:
    """The parsed headers of a PE32+ image (the stub)."""

    machine: int
    coff_offset: int  # of IMAGE_FILE_HEADER
    optional_offset: int
    section_table_offset: int
    size_of_headers: int
    section_alignment: int
    file_alignment: int
    size_of_initialized_data: int
    sections: tuple[Section, ...]


def _round_up(value: int, alignment: int) -> int:
    return -(-value // alignment) * alignment


def parse_stub(data: bytes, what: str, *, file_size: int | None = None) -> PeImage:
    """The headers of a PE32+ image; anything malformed is an ImageError naming ``what``.

    ``data`` holds at least the headers; ``file_size`` is the whole file's size when
    ``data`` is only its beginning (sections are checked against it)."""
    size = len(data) if file_size is None else file_size
    def bad(reason: str) -> ImageError:
        return ImageError(f"{what} is not a usable UEFI stub: {reason}",
                          hint="point `stub` at linuxx64.efi.stub from systemd-boot-efi")
    if len(data) < 0x40 or data[:2] != IMAGE_DOS_SIGNATURE:
        raise bad("no MZ header")
    (pe_offset,) = E_LFANEW.unpack_from(data, E_LFANEW_OFFSET)
    if pe_offset + 4 + IMAGE_FILE_HEADER.size > len(data) or \
            data[pe_offset:pe_offset + 4] != IMAGE_NT_SIGNATURE:
        raise bad("no PE signature")
    coff = pe_offset + 4
    machine, count, _, _, _, optional_size, _ = IMAGE_FILE_HEADER.unpack_from(data, coff)
    optional = coff + IMAGE_FILE_HEADER.size
    table = optional + optional_size
    if optional_size < OPT_CHECKSUM + 4 or table + count * IMAGE_SECTION_HEADER.size > len(data):
        raise bad("truncated headers")
    if U16.unpack_from(data, optional)[0] != OPT_MAGIC_PE32_PLUS:
        raise bad("not PE32+")
    sections = []
    for index in range(count):
        name, vsize, va, raw_size, raw_offset, *_, flags = IMAGE_SECTION_HEADER.unpack_from(
            data, table + index * IMAGE_SECTION_HEADER.size)
        if raw_offset + raw_size > size:
            raise bad(f"section {index} lies beyond the end of the file")
        sections.append(Section(name.rstrip(b"\0").decode("latin-1"), vsize, va,
                                raw_size, raw_offset, flags))
    section_alignment = U32.unpack_from(data, optional + OPT_SECTION_ALIGNMENT)[0]
    file_alignment = U32.unpack_from(data, optional + OPT_FILE_ALIGNMENT)[0]
    for alignment in (section_alignment, file_alignment):
        if alignment == 0 or alignment & (alignment - 1):
            raise bad(f"alignment {alignment} is not a power of two")
    if not sections:
        raise bad("no sections")
    size_of_headers = U32.unpack_from(data, optional + OPT_SIZE_OF_HEADERS)[0]
    if size_of_headers > size or any(
            s.raw_size and s.raw_offset < size_of_headers for s in sections):
        raise bad(f"SizeOfHeaders {size_of_headers} overlaps the sections or the file's end")
    return PeImage(machine, coff, optional, table, size_of_headers,
                   section_alignment, file_alignment,
                   U32.unpack_from(data, optional + OPT_SIZE_OF_INITIALIZED_DATA)[0],
                   tuple(sections))


@dataclass(frozen=True)
class UkiLayout:
    """Every section of the UKI (the stub's, then the added ones) and the image size."""

    stub: PeImage
    sections: tuple[Section, ...]
    replaced: tuple[str, ...]  # stub sections whose bytes the UKI replaces
    size_of_image: int
    size_of_initialized_data: int
    file_size: int


def plan(stub: PeImage, stub_size: int, payloads: list[tuple[str, int]]) -> UkiLayout:
    """Place ``payloads`` (section name, byte count) after the stub's sections, as ukify
    does. A name the stub already has (``.sbat``) replaces that section's bytes, which
    must fit in its file and address space."""
    sections = list(stub.sections)
    replaced: list[str] = []
    initialized = stub.size_of_initialized_data
    file_end = _round_up(stub_size, stub.file_alignment)
    for name, size in payloads:
        existing = [i for i, s in enumerate(sections) if s.name == name]
        if existing:
            index = existing[0]
            old = sections[index]
            room = (sections[index + 1].virtual_address - old.virtual_address
                    if index + 1 < len(sections) else old.raw_size)
            if size > min(old.raw_size, room):
                raise ImageError(f"the {name} section ({size} bytes) does not fit in the "
                                 f"stub's {name} ({min(old.raw_size, room)} bytes)",
                                 hint=f"shorten {name}")
            sections[index] = replace(old, virtual_size=size)
            replaced.append(name)
            continue
        last = sections[-1]
        flags = IMAGE_SCN_MEM_READ | (IMAGE_SCN_CNT_CODE if name == ".linux"
                                      else IMAGE_SCN_CNT_INITIALIZED_DATA)
        raw_size = _round_up(size, stub.file_alignment)
        sections.append(Section(name, size,
                                _round_up(last.virtual_address + last.virtual_size,
                                          stub.section_alignment),
                                raw_size, file_end, flags))
        file_end += raw_size
        if name != ".linux":
            initialized += size
    header_end = stub.section_table_offset + len(sections) * IMAGE_SECTION_HEADER.size
    if header_end > stub.size_of_headers:
        room = (stub.size_of_headers - stub.section_table_offset) // IMAGE_SECTION_HEADER.size
        raise ImageError(f"the stub's headers have room for {room - len(stub.sections)} "
                         f"more sections at most, not {len(sections) - len(stub.sections)}",
                         hint="use a stub built with room for UKI sections")
    last = sections[-1]
    size_of_image = _round_up(last.virtual_address + last.virtual_size, stub.section_alignment)
    if max(size_of_image, initialized, file_end) >> 32:
        raise ImageError("the UKI would not fit in the 4 GiB a PE image can address",
                         hint="use a smaller kernel and initrd (or check the stub's headers)")
    return UkiLayout(stub, tuple(sections), tuple(replaced), size_of_image, initialized,
                     file_end)


def assemble_headers(stub_bytes: bytes, layout: UkiLayout) -> bytearray:
    """The stub's bytes with the new section table, sizes, a zero timestamp and a zero
    checksum (the caller fills it in once every byte is known)."""
    head = bytearray(stub_bytes)
    stub = layout.stub
    struct.pack_into("<H", head, stub.coff_offset + 2, len(layout.sections))
    struct.pack_into("<I", head, stub.coff_offset + 4, 0)  # TimeDateStamp
    U32.pack_into(head, stub.optional_offset + OPT_SIZE_OF_INITIALIZED_DATA,
                  layout.size_of_initialized_data)
    U32.pack_into(head, stub.optional_offset + OPT_SIZE_OF_IMAGE, layout.size_of_image)
    U32.pack_into(head, stub.optional_offset + OPT_CHECKSUM, 0)
    for index, section in enumerate(layout.sections):
        head[stub.section_table_offset + index * IMAGE_SECTION_HEADER.size:
             stub.section_table_offset + (index + 1) * IMAGE_SECTION_HEADER.size] = \
            section.header()
    return head


def checksum_offset(layout: UkiLayout) -> int:
    return layout.stub.optional_offset + OPT_CHECKSUM


def pe_checksum(data: bytes | bytearray | memoryview, *, checksum_at: int) -> int:
    """The PE image checksum: the 16-bit one's-complement sum of the file (its CheckSum
    field counted as zero), plus the file's length."""
    view = memoryview(data)
    if checksum_at % 2:
        raise ImageError(f"the PE CheckSum field is at an odd offset ({checksum_at})")
    total = sum(view[:checksum_at].cast("H"))
    tail = bytes(view[checksum_at + 4:])
    if len(tail) % 2:
        tail += b"\0"
    total += sum(memoryview(tail).cast("H"))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total + len(data)
