"""FAT images read by what boots from them: Debian's kernel in a QEMU guest (this host's
kernel has no vfat) and the UEFI firmware (OVMF)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from reprobuild.trees.tree import Content, Entry, EntryType
from tests.images.vfat_images import image_of
from tests.images.vfat_qemu import (
    expected_listing,
    fetch_kernel,
    firmware_console,
    kernel_listing,
    startup_script,
)
from tests.images.vfat_trees import fat_view, vfat_tree


# -- the kernel ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def debian_kernel(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    return fetch_kernel(tmp_path_factory.mktemp("kernel"))


@pytest.mark.slow
@pytest.mark.tool
def test_the_kernel_reads_the_same_tree(sample_image: Path, tmp_path: Path,
                                        debian_kernel: tuple[Path, dict[str, Path]]) -> None:
    # This host's kernel has no vfat, so a loop mount proves nothing here: the image is
    # mounted by Debian's kernel in a QEMU guest instead.
    listing = kernel_listing(sample_image, debian_kernel, tmp_path)
    assert listing == expected_listing(fat_view(vfat_tree()))


# -- the firmware -------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.tool
@pytest.mark.parametrize("bits", [None, 16, 32], ids=["auto", "fat16", "fat32"])
def test_uefi_firmware_reads_the_image(bits: int | None, tmp_path: Path) -> None:
    tree = vfat_tree()
    tree.add(Entry(b"startup.nsh", EntryType.REGULAR, 0o644, content=Content.from_bytes(
        startup_script(['type "\\loader\\entries\\entry-11-long-name.conf"',
                        'type "\\a\\b\\c\\deep.txt"', "ls \\wide", "ls \\EFI\\BOOT"]))))
    image = tmp_path / "esp.img"
    image.write_bytes(image_of(tree, **({} if bits is None else {"fat": bits})))
    console = firmware_console(image, tmp_path)
    assert "title 11" in console and "deep" in console
    listed = re.findall(r"^\d\d/\d\d/\d{4}\s+\d\d:\d\d\s+[\d,]+\s+(\S+)$", console, re.M)
    assert listed == [f"file-with-a-long-name-{number:03d}" for number in range(300)] + [
        "BOOTX64.EFI"]
    assert "70,001  BOOTX64.EFI" in console
