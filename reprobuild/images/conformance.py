"""Static proof that every format module in the registry implements its protocol.

Never imported at run time (it would import every writer); ``mypy --strict`` checks the
assignments below, so a module missing ``identity`` or with a wrong ``write`` signature
fails the type check. ``tests/images/test_registry.py`` checks at run time that this
list and :data:`reprobuild.images.registry.FORMATS` name the same modules.
"""

from __future__ import annotations

from reprobuild.images import cpio, tar, verity
from reprobuild.images.composefs import image as composefs
from reprobuild.images.erofs import image as erofs
from reprobuild.images.ext4 import image as ext4
from reprobuild.images.gpt import image as gpt
from reprobuild.images.protocol import DiskFormat, TreeFormat
from reprobuild.images.squashfs import image as squashfs
from reprobuild.images.uki import image as uki
from reprobuild.images.vfat import image as vfat

TREE_FORMATS: dict[str, TreeFormat] = {
    "ext4": ext4, "squashfs": squashfs, "erofs": erofs, "cpio": cpio, "tar": tar,
    "composefs": composefs,
    "vfat": vfat,
}
DISK_FORMATS: dict[str, DiskFormat] = {"gpt": gpt, "verity": verity,
                                        "uki": uki}
