"""The uki format: sections where ukify puts them, fixed bytes, clear errors."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from reprobuild.build.recipe import load_recipe
from reprobuild.errors import ImageError, RecipeError
from reprobuild.images import registry
from reprobuild.images.gpt import image as gpt
from reprobuild.images.gpt import layout as gpt_layout
from reprobuild.images.registry import ImageOptions
from reprobuild.images.uki import image as uki
from reprobuild.images.uki import pe
from tests.conftest import REPO, BootableDisk, need_tool

OPTIONS = ImageOptions(epoch=0)
STUB = "systemd-boot/usr/lib/systemd/boot/efi/linuxx64.efi.stub"
KERNEL = "kernel/boot/vmlinuz-6.1.0-57-cloud-amd64"


def table(**changes: str) -> dict[str, object]:
    base: dict[str, object] = {"format": "uki", "stub": STUB, "kernel": KERNEL,
                               "initrd": "initrd", "cmdline": "console=ttyS0"}
    base.update(changes)
    return {k: v for k, v in base.items() if v != ""}


def inputs(disk: BootableDisk) -> dict[str, str]:
    return {name: str(path) for name, path in disk.paths.items()}


def test_inputs_and_registry() -> None:
    assert registry.get_format("uki").kind == "disk"
    assert uki.inputs_of(table(cmdline="roothash=@root-verity quiet")) == [
        "systemd-boot", "kernel", "initrd", "root-verity"]
    with pytest.raises(ImageError, match="needs `kernel`"):
        uki.inputs_of(table(kernel=""))
    with pytest.raises(ImageError, match="needs `initrd`"):
        uki.inputs_of(table(initrd=""))
    with pytest.raises(ImageError, match="`cmdline` is 2048 bytes"):
        uki.inputs_of(table(cmdline="x" * 2048))
    with pytest.raises(ImageError, match="NAME/relative/path"):
        uki.inputs_of(table(kernel="kernel/../etc/passwd"))


def test_recipe_errors_name_the_image_and_key(tmp_path: Path) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text('[steps.s]\nbuilder = ["/bin/true"]\n[images.uki]\nformat = "uki"\n'
                      'stub = "s/x"\ninitrd = "s"\n')
    with pytest.raises(RecipeError, match=r"\[images\.uki\].*needs `kernel`"):
        load_recipe(str(recipe))
    recipe.write_text(recipe.read_text() + 'kernel = "s/k"\ncmdlin = "x"\n')
    with pytest.raises(RecipeError, match=r"cmdlin.*cmdline"):
        load_recipe(str(recipe))


def test_shipped_recipe_wires_the_uki() -> None:
    recipe = load_recipe(str(REPO / "recipes" / "bootable-disk.toml"))
    assert recipe.images["uki"].inputs == ("systemd-boot", "kernel", "initrd", "root-verity")
    assert recipe.images["disk"].inputs == ("esp", "root", "root-verity")


@pytest.mark.slow
@pytest.mark.userns
@pytest.mark.tool
def test_checksum_is_the_one_the_stub_carries(bootable_disk: BootableDisk) -> None:
    stub = (bootable_disk.paths["systemd-boot"] / STUB.split("/", 1)[1]).read_bytes()
    parsed = pe.parse_stub(stub, "stub")
    at = parsed.optional_offset + pe.OPT_CHECKSUM
    assert pe.pe_checksum(stub, checksum_at=at) == struct.unpack_from("<I", stub, at)[0]


def _objdump_sections(path: Path) -> dict[str, tuple[int, int, int]]:
    """name -> (size, VMA, file offset) as objdump -h lists them."""
    out = subprocess.run(["objdump", "-h", str(path)], check=True, capture_output=True,
                         text=True).stdout
    rows = re.findall(r"^\s*\d+\s+(\S+)\s+([0-9a-f]+)\s+([0-9a-f]+)\s+[0-9a-f]+\s+"
                      r"([0-9a-f]+)", out, re.M)
    return {name: (int(size, 16), int(vma, 16), int(off, 16)) for name, size, vma, off in rows}


@pytest.mark.slow
@pytest.mark.userns
@pytest.mark.tool
def test_objdump_finds_every_section_at_its_address(bootable_disk: BootableDisk) -> None:
    need_tool("objdump")
    out = bootable_disk.paths["uki"]
    efi = out / "uki.efi"
    sections = _objdump_sections(efi)
    added = [".osrel", ".cmdline", ".uname", ".initrd", ".linux"]
    names = list(sections)
    assert names[-5:] == added and ".sbat" in names  # the stub's own sections first
    data = efi.read_bytes()
    previous_end = 0
    for name in names:
        size, vma, offset = sections[name]
        assert vma >= previous_end, f"{name} overlaps the section before it"
        previous_end = vma + size
        if name in added:
            assert vma % 0x200 == 0 and offset % 0x200 == 0  # the stub's alignments
    kernel = (bootable_disk.paths["kernel"] / KERNEL.split("/", 1)[1]).read_bytes()
    size, _, offset = sections[".linux"]
    assert size == len(kernel) and data[offset:offset + size] == kernel
    initrd = bootable_disk.paths["initrd"].read_bytes()
    size, _, offset = sections[".initrd"]
    assert data[offset:offset + size] == initrd
    size, _, offset = sections[".cmdline"]
    root_hash = (bootable_disk.paths["root-verity"] / "roothash").read_text().strip()
    assert data[offset:offset + size].decode() == (
        f"console=ttyS0 panic=-1 roothash={root_hash}")
    header = subprocess.run(["objdump", "-p", str(efi)], check=True, capture_output=True,
                            text=True).stdout
    assert "Thu Jan  1 00:00:00 1970" in header
    stored = int(re.search(r"^CheckSum\s+([0-9a-f]+)", header, re.M).group(1), 16)  # type: ignore[union-attr]
    parsed = pe.parse_stub(data, "uki")
    at = parsed.optional_offset + pe.OPT_CHECKSUM
    assert stored == pe.pe_checksum(data, checksum_at=at) != 0


@pytest.mark.slow
@pytest.mark.userns
@pytest.mark.tool
def test_build_errors_name_the_key(bootable_disk: BootableDisk, tmp_path: Path) -> None:
    given = inputs(bootable_disk)
    stub_path = bootable_disk.paths["systemd-boot"] / STUB.split("/", 1)[1]
    arm = tmp_path / "arm" / STUB.split("/", 1)[1]
    arm.parent.mkdir(parents=True)
    stub = bytearray(stub_path.read_bytes())
    struct.pack_into("<H", stub, pe.parse_stub(bytes(stub), "stub").coff_offset, 0xAA64)
    arm.write_bytes(bytes(stub))
    with pytest.raises(ImageError, match="`stub` is a UEFI stub for arm64, not x86-64"):
        uki.build({**given, "systemd-boot": str(tmp_path / "arm")}, table(), OPTIONS,
                  str(tmp_path / "o1"))
    with pytest.raises(ImageError, match="`kernel`: input 'kernel' has no file"):
        uki.build(given, table(kernel="kernel/boot/vmlinuz-0"), OPTIONS, str(tmp_path / "o2"))
    with pytest.raises(ImageError, match="`kernel` is not an x86 EFI-stub kernel"):
        uki.build(given, table(kernel="initrd"), OPTIONS, str(tmp_path / "o3"))
    long = "x" * 1990 + " roothash=@root-verity"  # fits before, not once resolved
    with pytest.raises(ImageError, match="`cmdline` is 2064 bytes once resolved"):
        uki.build(given, table(cmdline=long), OPTIONS, str(tmp_path / "o4"))
    with pytest.raises(ImageError, match="@initrd is not a verity image"):
        uki.build(given, table(cmdline="roothash=@initrd"), OPTIONS, str(tmp_path / "o5"))
    shutil.rmtree(tmp_path / "arm")
    line = "uki,1,UKI,uki,1,https://x"  # this stub leaves 30 bytes before .sdmagic
    uki.build(given, table(sbat=f"sbat,1,SBAT Version,sbat,1,x\n{line}\n"), OPTIONS,
              str(tmp_path / "sbat"))
    sbat = _objdump_sections(tmp_path / "sbat" / "uki.efi")[".sbat"]
    data = (tmp_path / "sbat" / "uki.efi").read_bytes()
    lines = data[sbat[2]:sbat[2] + sbat[0]].decode().splitlines()
    assert lines[-1] == line and sum(x.startswith("sbat,") for x in lines) == 1
    assert lines[0].startswith("sbat,1,") and any("systemd" in x for x in lines)
    with pytest.raises(ImageError,
                       match=r"the \.sbat section \(\d+ bytes\) does not fit in the stub's "
                             r"\.sbat \(256"):
        uki.build(given, table(sbat=line * 10), OPTIONS, str(tmp_path / "big"))
    uki.build(given, table(), OPTIONS, str(tmp_path / "ok"))
    ok = tmp_path / "ok" / "uki.efi"
    size, _, offset = _objdump_sections(ok)[".uname"]  # no `uname`: the kernel's own
    assert ok.read_bytes()[offset:offset + size] == b"6.1.0-57-cloud-amd64"
    assert uki.kernel_release(b"MZ" + bytes(0x300)) == ""
    again = tmp_path / "again"
    uki.build(given, table(), OPTIONS, str(again))
    assert (again / "uki.efi").read_bytes() == (tmp_path / "ok" / "uki.efi").read_bytes()


@pytest.mark.slow
@pytest.mark.userns
@pytest.mark.tool
def test_uki_esp_and_disk_are_identical_under_check(bootable_disk: BootableDisk) -> None:
    """`check` rebuilds them under every variation: the same bytes."""
    result = bootable_disk.reprobuild("check", "--store", bootable_disk.store,
                                      "recipes/bootable-disk.toml", "uki", "esp", "disk")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
@pytest.mark.userns
@pytest.mark.tool
def test_disk_holds_the_uki_on_its_esp(bootable_disk: BootableDisk, tmp_path: Path) -> None:
    """sgdisk finds the table clean, fsck.fat the ESP, and mcopy reads back the UKI as
    EFI/BOOT/BOOTX64.EFI; disk.roothash beside disk.raw is the root's verity hash."""
    need_tool("sgdisk", "fsck.fat", "mcopy")
    disk = bootable_disk.paths["disk"]
    check = subprocess.run(["sgdisk", "-v", str(disk / "disk.raw")], capture_output=True,
                           text=True)
    assert "No problems found" in check.stdout, check.stdout
    table = gpt.read_table(disk)
    assert [(e.name, gpt_layout.TYPE_NAMES[e.type_guid]) for e in table.entries] == [
        ("ESP", "esp"), ("root", "root-x86-64"), ("root-verity", "root-x86-64-verity")]
    root_hash = (bootable_disk.paths["root-verity"] / "roothash").read_text()
    assert (disk / "disk.roothash").read_text() == root_hash
    esp = table.entries[0]
    partition = tmp_path / "esp.img"
    with (disk / "disk.raw").open("rb") as f:
        f.seek(esp.first_lba * 512)
        partition.write_bytes(f.read((esp.last_lba - esp.first_lba + 1) * 512))
    fsck = subprocess.run(["fsck.fat", "-n", str(partition)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    copied = tmp_path / "BOOTX64.EFI"
    subprocess.run(["mcopy", "-i", str(partition), "::/EFI/BOOT/BOOTX64.EFI", str(copied)],
                   check=True, capture_output=True)
    assert copied.read_bytes() == (bootable_disk.paths["uki"] / "uki.efi").read_bytes()
