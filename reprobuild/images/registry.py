"""The one table of image formats, imported lazily (as diffoscope lists its comparators).

A *tree* format module (ext4, squashfs, erofs, cpio, tar) provides:

* ``VERSION: str`` - the writer's own code version; it enters every derivation id.
* ``write(tree: Tree, output: BinaryIO, options: ImageOptions) -> None`` - write the
  image to a seekable, writable, initially empty binary file. Plans the layout first,
  then serialises; reads file bytes only through ``Content.chunks()``.
* ``read(path: str | bytes) -> Tree`` - read an image back into a tree (used by
  ``reprobuild diff`` and the tests); contents stream from the image file.
* ``identity(options: ImageOptions) -> dict[str, str]`` - anything besides the options
  and VERSION that changes the bytes (a compressor library's name and version).

A *disk* format module (gpt) composes other images; see its module docstring.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from types import ModuleType

from reprobuild.errors import ImageError

OptionValue = str | int | bool


@dataclass(frozen=True)
class ImageOptions:
    """Everything that shapes an image besides the tree. No field has a host default."""

    epoch: int
    size: int | None = None  # bytes; None means the smallest size that fits
    uuid: str | None = None  # derived from the content when None
    label: str | None = None
    compress: str | None = None  # format default when None
    block_size: int | None = None  # format default when None
    extra: tuple[tuple[str, OptionValue], ...] = field(default=())

    def __post_init__(self) -> None:
        check_image_size("an", self.size)

    def get(self, key: str, default: OptionValue | None = None) -> OptionValue | None:
        for name, value in self.extra:
            if name == key:
                return value
        return default


# The largest image any writer is asked for (16 TiB): a larger size is a typo far more
# often than a wish, and the ext4 writer's per-group tables grow with the size (1000 TiB
# took 4 GB of memory before it failed).
MAX_IMAGE_SIZE = 16 << 40


def sane_size(format_name: str, size: int | None) -> int | None:
    """``size`` unless it is above :data:`MAX_IMAGE_SIZE` (ValueError saying what to do)."""
    if size is not None and size > MAX_IMAGE_SIZE:
        raise ValueError(f"{format_name} image size {size} bytes is above the largest image "
                         f"reprobuild writes ({MAX_IMAGE_SIZE >> 40} TiB): give a size like "
                         '"64M" or "2G", or "min" for the smallest')
    return size


def check_image_size(format_name: str, size: int | None) -> None:
    """Refuse an image size no writer should try, before any byte is written."""
    try:
        sane_size(format_name, size)
    except ValueError as exc:
        raise ImageError(str(exc)) from None


@dataclass(frozen=True)
class Format:
    name: str
    module: str
    kind: str  # "tree" or "disk"
    description: str

    def load(self) -> ModuleType:
        return importlib.import_module(self.module)


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format("ext4", "reprobuild.images.ext4.image", "tree", "ext4, read-only, no journal"),
        Format("squashfs", "reprobuild.images.squashfs.image", "tree", "squashfs 4.0"),
        Format("erofs", "reprobuild.images.erofs.image", "tree", "EROFS, uncompressed or lz4"),
        Format("cpio", "reprobuild.images.cpio", "tree", "cpio newc (initramfs)"),
        Format("tar", "reprobuild.images.tar", "tree", "POSIX pax tar"),
        Format("gpt", "reprobuild.images.gpt.image", "disk", "GPT disk from other images"),
        Format("verity", "reprobuild.images.verity", "disk", "dm-verity hash tree of an image"),
    )
}


def get_format(name: str) -> Format:
    try:
        return FORMATS[name]
    except KeyError:
        known = ", ".join(sorted(FORMATS))
        raise ImageError(f"unknown image format {name!r}", hint=f"known formats: {known}") from None
