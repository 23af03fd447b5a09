"""The one table of image formats, imported lazily (as diffoscope lists its comparators).

Each entry names its module (loaded only when an image of that format is planned,
written or read) and the format's options schema (checked when a recipe is parsed,
without loading the module). A ``tree`` format module implements
:class:`~reprobuild.images.protocol.TreeFormat`, a ``disk`` format module
:class:`~reprobuild.images.protocol.DiskFormat`; :mod:`reprobuild.images.conformance`
makes mypy check that every module listed here does.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import cast

from reprobuild.errors import ImageError
from reprobuild.images.protocol import (
    MAX_IMAGE_SIZE,
    DiskFormat,
    ImageOptions,
    Option,
    OptionsSchema,
    OptionValue,
    TreeFormat,
    sane_size,
)

__all__ = ["FORMATS", "MAX_IMAGE_SIZE", "DiskFormat", "Format", "ImageOptions", "Option",
           "OptionValue", "OptionsSchema", "TreeFormat", "get_format", "sane_size"]


@dataclass(frozen=True)
class Format:
    name: str
    module: str
    kind: str  # "tree" or "disk"
    description: str
    options: OptionsSchema

    def load_tree(self) -> TreeFormat:
        """The writer module of a tree format (ImageError for a disk format)."""
        if self.kind != "tree":
            raise ImageError(f"{self.name} images are made from other images, not from a "
                             "tree", hint="use a recipe to compose disk images")
        return cast(TreeFormat, importlib.import_module(self.module))

    def load_disk(self) -> DiskFormat:
        """The composer module of a disk format (ImageError for a tree format)."""
        if self.kind != "disk":
            raise ImageError(f"{self.name} images are made from a tree, not composed")
        return cast(DiskFormat, importlib.import_module(self.module))

    def load_module(self) -> ModuleType:
        """The module itself, for its format-specific helpers (gpt's ``read_table``)."""
        return importlib.import_module(self.module)

    def load(self) -> TreeFormat | DiskFormat:
        return self.load_tree() if self.kind == "tree" else self.load_disk()


_EXT4 = OptionsSchema("ext4", (
    Option("hash_seed", str, "the htree hash seed, a UUID (default: derived from the content)"),
    Option("hash_version", str, "the htree hash", choices=("half_md4", "tea")),
    Option("inodes", int, "spare inodes beyond those the tree needs", minimum=0),
), common=("size", "uuid", "label", "block_size"))
_SQUASHFS = OptionsSchema("squashfs", (
    Option("compression_level", int, "zstd 1-22 (default 15), gzip 1-9 (default 9)",
           minimum=1, maximum=22),
    Option("exportable", bool, "write the NFS export table"),
    Option("tail_fragments", bool, "pack tails of files larger than a block into fragments"),
    Option("probe", bool, "store blocks zstd -1 cannot shrink without compressing them"),
    Option("threads", int, "compression threads (the bytes never depend on it)", minimum=1),
), common=("size", "compress", "block_size"))
_CPIO = OptionsSchema("cpio", (
    Option("xattrs", str, "\"ignore\" drops extended attributes", choices=("ignore",)),
), common=("compress",))
_GPT = OptionsSchema("gpt", (
    Option("seed", str, "disk and partition GUIDs derive from it"),
    Option("partitions", object, "the partition table (see reprobuild.images.gpt.image)"),
    Option("sector-size", int, "512 or 4096", minimum=512, maximum=4096),
    Option("alignment", object, "partition alignment, a size like \"1M\""),
), common=("size", "uuid"))
_VERITY = OptionsSchema("verity", (
    Option("hash-algorithm", str, "sha1, sha256 (default) or sha512"),
    Option("data-block-size", int, "data block size (default 4096)", minimum=512),
    Option("hash-block-size", int, "hash block size (default 4096)", minimum=512),
    Option("salt", str, "hex salt (default: derived from the data)"),
    Option("append", bool, "append the tree to a copy of the data"),
), common=("uuid", "block_size"))
_UKI = OptionsSchema("uki", (
    Option("stub", str, "the UEFI stub: INPUT/path of linuxx64.efi.stub"),
    Option("kernel", str, "the kernel: INPUT/path of a vmlinuz"),
    Option("initrd", str, "the initramfs: a cpio image, or INPUT/path"),
    Option("cmdline", str, "the kernel command line; @NAME is verity image NAME's root hash"),
    Option("osrel", str, "the text of the .osrel section (os-release)"),
    Option("uname", str, "the kernel release for .uname (default: read from the kernel)"),
    Option("sbat", str, "SBAT lines appended to the stub's .sbat"),
), common=())
_VFAT = OptionsSchema("vfat", (
    Option("fat", int, "12, 16 or 32 (default: by size, as mkfs.fat)", minimum=12,
           maximum=32),
    Option("volume_id", str, "8 hex digits like \"ABCD-1234\" (default: derived)"),
    Option("seed", str, "text mixed into the derived volume id"),
    Option("hardlinks", str, "\"refuse\" (default) or \"copy\" (each link a copy of its file)",
           choices=("refuse", "copy")),
), common=("size", "uuid", "label", "block_size"))

FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format("ext4", "reprobuild.images.ext4.image", "tree", "ext4, read-only, no journal",
               _EXT4),
        Format("squashfs", "reprobuild.images.squashfs.image", "tree", "squashfs 4.0",
               _SQUASHFS),
        Format("erofs", "reprobuild.images.erofs.image", "tree", "EROFS, uncompressed or lz4",
               OptionsSchema("erofs")),
        Format("cpio", "reprobuild.images.cpio", "tree", "cpio newc (initramfs)", _CPIO),
        Format("tar", "reprobuild.images.tar", "tree", "POSIX pax tar",
               OptionsSchema("tar", common=("compress",))),
        Format("composefs", "reprobuild.images.composefs.image", "tree",
               "composefs (as mkcomposefs writes it; files over 64 bytes in a digest store)",
               OptionsSchema("composefs", common=("block_size",))),
        Format("gpt", "reprobuild.images.gpt.image", "disk", "GPT disk from other images",
               _GPT),
        Format("verity", "reprobuild.images.verity", "disk", "dm-verity hash tree of an image",
               _VERITY),
        Format("uki", "reprobuild.images.uki.image", "disk", "unified kernel image (UEFI)",
               _UKI),
        Format("vfat", "reprobuild.images.vfat.image", "tree",
               "FAT12/16/32 with long names (EFI system partition)", _VFAT),
    )
}


def get_format(name: str) -> Format:
    try:
        return FORMATS[name]
    except KeyError:
        known = ", ".join(sorted(FORMATS))
        raise ImageError(f"unknown image format {name!r}", hint=f"known formats: {known}") from None
