"""The PE planning of the uki format on a synthetic stub (no network, no packages)."""

from __future__ import annotations

import random
import struct
import subprocess
from pathlib import Path

import pytest

from reprobuild.errors import ImageError
from reprobuild.images.uki import image as uki
from reprobuild.images.uki import pe
from reprobuild.proof.diffreport import detect, diff_paths
from tests.conftest import need_tool

PE_AT = 0x80
OPTIONAL_SIZE = 240  # PE32+ with 16 data directories


def make_stub(*, machine: int = 0x8664, section_alignment: int = 0x1000,
              file_alignment: int = 0x200, headers: int = 0x400) -> bytes:
    """A PE32+ image with .text and .sbat (4 KiB apart), as small as the format allows."""
    sections = [(b".text", 0x123, 0x1000, 0x200, headers, 0x60000020),
                (b".sbat", 0x40, 0x2000, 0x200, headers + 0x200, 0x40000040)]
    out = bytearray(headers + 0x400)
    out[:2] = b"MZ"
    struct.pack_into("<I", out, 0x3C, PE_AT)
    out[PE_AT:PE_AT + 4] = b"PE\0\0"
    coff = PE_AT + 4
    struct.pack_into("<HHIIIHH", out, coff, machine, len(sections), 0x12345678, 0, 0,
                     OPTIONAL_SIZE, 0x206)
    optional = coff + 20
    struct.pack_into("<HBBIII", out, optional, 0x20B, 2, 40, 0x200, 0x200, 0)
    struct.pack_into("<II", out, optional + 32, section_alignment, file_alignment)
    struct.pack_into("<III", out, optional + 56, 0x3000, headers, 0)
    struct.pack_into("<H", out, optional + 68, 10)  # EFI application
    table = optional + OPTIONAL_SIZE
    for index, (name, vsize, va, raw, offset, flags) in enumerate(sections):
        struct.pack_into("<8sIIIIIIHHI", out, table + 40 * index, name, vsize, va, raw,
                         offset, 0, 0, 0, 0, flags)
    out[headers:headers + 4] = b"\xc3\x90\x90\x90"
    out[headers + 0x200:headers + 0x240] = b"sbat,1,SBAT Version,sbat,1,x\n".ljust(0x40, b"\0")
    return bytes(out)


def build(stub: bytes, payloads: list[tuple[str, bytes]]) -> bytes:
    parsed = pe.parse_stub(stub, "stub")
    layout = pe.plan(parsed, len(stub), [(name, len(data)) for name, data in payloads])
    image = pe.assemble_headers(stub, layout)
    image += bytes(layout.file_size - len(image))
    by_name = {s.name: s for s in layout.sections}
    for name, data in payloads:
        section = by_name[name]
        image[section.raw_offset:section.raw_offset + len(data)] = data
    at = pe.checksum_offset(layout)
    pe.U32.pack_into(image, at, pe.pe_checksum(image, checksum_at=at))
    return bytes(image)


def test_sections_follow_the_stub_aligned_as_ukify_places_them() -> None:
    stub = make_stub()
    parsed = pe.parse_stub(stub, "stub")
    layout = pe.plan(parsed, len(stub), [(".osrel", 10), (".cmdline", 0x1001),
                                         (".linux", 5), (".sbat", 0x30)])
    added = {s.name: s for s in layout.sections[2:]}
    assert list(added) == [".osrel", ".cmdline", ".linux"]  # .sbat replaced in place
    assert added[".osrel"].virtual_address == 0x3000  # after .sbat's 0x2000 + 0x40
    assert added[".cmdline"].virtual_address == 0x4000
    assert added[".linux"].virtual_address == 0x6000  # 0x4000 + 0x1001 rounded up
    assert added[".osrel"].raw_offset == len(stub)  # the stub is file-aligned already
    assert added[".cmdline"].raw_offset == len(stub) + 0x200
    assert added[".cmdline"].raw_size == 0x1200
    assert added[".linux"].characteristics & pe.IMAGE_SCN_CNT_CODE
    assert layout.sections[1].virtual_size == 0x30 and layout.replaced == (".sbat",)
    assert layout.size_of_image == 0x7000
    with pytest.raises(ImageError, match=r"\.sbat section \(513 bytes\) does not fit"):
        pe.plan(parsed, len(stub), [(".sbat", 0x201)])


def test_headers_with_no_room_are_refused() -> None:
    stub = make_stub(headers=0x200)  # the table starts at 0x168: room for 3 headers
    parsed = pe.parse_stub(stub, "stub")
    pe.plan(parsed, len(stub), [(".osrel", 1)])
    with pytest.raises(ImageError, match="room for 1 more sections at most, not 2"):
        pe.plan(parsed, len(stub), [(".osrel", 1), (".cmdline", 1)])


def test_timestamp_zero_and_checksum_as_objdump_reads_them(tmp_path: Path) -> None:
    need_tool("objdump")
    image = build(make_stub(), [(".osrel", b"ID=x\n"), (".cmdline", b"quiet"),
                                (".linux", b"\x90" * 999)])
    path = tmp_path / "uki.efi"
    path.write_bytes(image)
    header = subprocess.run(["objdump", "-p", str(path)], check=True, capture_output=True,
                            text=True).stdout
    assert "Thu Jan  1 00:00:00 1970" in header
    assert f"CheckSum\t\t{pe.pe_checksum(image, checksum_at=PE_AT + 24 + 64):08x}" in header
    listed = subprocess.run(["objdump", "-h", str(path)], check=True, capture_output=True,
                            text=True).stdout
    assert ".osrel        00000005  0000000000003000" in listed
    assert ".linux        000003e7  0000000000005000" in listed


def test_checksum_folds_carries_and_adds_the_length() -> None:
    data = bytes([0xFF, 0xFF, 0, 0, 0, 0, 0x01, 0x00, 0xFF])
    # words: 0xffff, (checksum field skipped), 0x0001, 0x00ff -> 0x100ff -> 0x0100 + len 9
    assert pe.pe_checksum(data, checksum_at=2) == 0x0100 + 9
    with pytest.raises(ImageError, match="odd offset"):
        pe.pe_checksum(data, checksum_at=3)


@pytest.mark.parametrize(("stub", "message"), [
    (b"ZM" + bytes(100), "no MZ header"),
    (make_stub()[:PE_AT + 30], "truncated headers"),
    (make_stub(section_alignment=0x1001), "alignment 4097 is not a power of two"),
    (make_stub()[:0x700], "section 1 lies beyond the end"),
])
def test_malformed_stubs_are_named(stub: bytes, message: str) -> None:
    with pytest.raises(ImageError, match=message) as raised:
        pe.parse_stub(stub, "`stub` (x.efi)")
    assert "`stub` (x.efi) is not a usable UEFI stub" in str(raised.value)


def test_mutated_stubs_give_image_errors_only() -> None:
    """Headers are trusted nowhere: flipped fields end in ImageError or a planned image."""
    stub = make_stub()
    rng = random.Random(17)
    planned = 0
    for _ in range(3000):
        mutant = bytearray(stub)
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(0, 0x400)
            mutant[at:at + 4] = rng.choice([b"\xff\xff\xff\xff", b"\0\0\0\0",
                                            rng.randbytes(4), b"\x00\x10\x00\x00"])
        if rng.random() < 0.2:
            del mutant[rng.randrange(0, len(mutant)):]
        try:
            build(bytes(mutant), [(".cmdline", b"x" * rng.randint(0, 5000)),
                                  (".linux", b"\x90" * 100), (".sbat", b"sbat,1\n")])
            planned += 1
        except ImageError:
            pass
    assert planned > 100  # most mutants leave a usable stub


def test_diff_names_the_section_that_differs(tmp_path: Path) -> None:
    """A UKI reads as its headers and sections: two that differ in the command line
    differ in .cmdline (and the checksum in the headers), nowhere else."""
    a, b = tmp_path / "a.efi", tmp_path / "b.efi"
    a.write_bytes(build(make_stub(), [(".cmdline", b"quiet"), (".linux", b"\x90" * 99)]))
    b.write_bytes(build(make_stub(), [(".cmdline", b"debug"), (".linux", b"\x90" * 99)]))
    assert detect(a) == "uki"
    tree = uki.read(a)
    assert [e.path for e in tree if e.path] == [b".cmdline", b".linux", b".sbat", b".text",
                                                  b"headers"]
    linux = tree.get(b".linux")
    assert linux is not None and linux.content is not None
    assert linux.content.read() == b"\x90" * 99 + bytes(0x200 - 99)
    report = diff_paths(a, b)
    assert {(d.path, d.kind) for d in report.differences} == {(b".cmdline", "content"),
                                                              (b"headers", "content")}


def test_mutated_ukis_read_as_image_errors_only(tmp_path: Path) -> None:
    image = build(make_stub(), [(".cmdline", b"quiet"), (".linux", b"\x90" * 99)])
    rng = random.Random(5)
    path = tmp_path / "m.efi"
    for _ in range(1000):
        mutant = bytearray(image)
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(0, 0x400)
            mutant[at:at + 4] = rng.choice([b"\xff\xff\xff\xff", rng.randbytes(4)])
        if rng.random() < 0.2:
            del mutant[rng.randrange(0, len(mutant)):]
        path.write_bytes(bytes(mutant))
        try:
            for entry in uki.read(path):
                if entry.content is not None:
                    entry.content.read()
        except ImageError:
            pass
