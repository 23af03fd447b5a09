"""Pax extended records of a tar member that become entry values: exact mtimes, xattrs
(``SCHILY.xattr.NAME`` raw, ``LIBARCHIVE.xattr.NAME`` URL-encoded name and base64 value)
and text ACLs (``SCHILY.acl.*``, numeric ids only) as the kernel's xattr values."""

from __future__ import annotations

import base64
import struct
import tarfile
import urllib.parse

from reprobuild.errors import ImageError
from reprobuild.trees.tar_headers import Header

TarHeader = tarfile.TarInfo | Header
"""A member's header: tarfile's, or the fast parser's with the same values."""

SCHILY_XATTR = "SCHILY.xattr."
LIBARCHIVE_XATTR = "LIBARCHIVE.xattr."
SCHILY_ACL = {"SCHILY.acl.access": b"system.posix_acl_access",
              "SCHILY.acl.default": b"system.posix_acl_default"}
# struct posix_acl_xattr_header / _entry (include/uapi/linux/posix_acl_xattr.h):
# le32 a_version (2), then { le16 e_tag, le16 e_perm, le32 e_id } per entry.
ACL_TAGS = {"user": (0x01, 0x02), "group": (0x04, 0x08), "mask": (0x10, 0x10),
            "other": (0x20, 0x20)}
ACL_UNDEFINED_ID = 0xFFFFFFFF



def _raw(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def parse_pax_time(value: str, what: str) -> int:
    """A pax time record ("1700000000.123456789", maybe negative) in exact nanoseconds."""
    text = value.strip()
    negative = text.startswith("-")
    digits = text[1:] if negative else text
    whole, _, frac = digits.partition(".")
    if not whole.isdigit() or (frac and not frac.isdigit()):
        raise ImageError(f"{what}: bad pax time record {value!r}")
    ns = int(whole) * 1_000_000_000 + int((frac + "000000000")[:9])
    return -ns if negative else ns


def acl_text_to_xattr(text: str, what: str, *, default: bool) -> bytes | None:
    """A POSIX.1e ACL in text form (``SCHILY.acl.*``) as the kernel's xattr value.

    None for a trivial access ACL (owner, group and other only: the mode bits say it
    all); a default ACL is kept whatever its entries.
    Named users and groups must be numeric, or carry star's trailing numeric id field
    (``user:name:rwx:1000``): resolving names would depend on the host's passwd.
    """
    entries: list[tuple[int, int, int]] = []
    for raw in text.replace(",", "\n").split("\n"):
        item = raw.split("#", 1)[0].strip()
        if not item:
            continue
        fields = item.split(":")
        if len(fields) not in (3, 4) or fields[0] not in ACL_TAGS or \
                len(fields[2]) != 3 or any(c not in "rwx-" for c in fields[2]):
            raise ImageError(f"{what}: bad ACL entry {item!r}")
        tag, qualifier, perms = fields[0], fields[1], fields[2]
        perm = sum(bit for c, bit in zip(perms, (4, 2, 1), strict=True) if c != "-")
        if not qualifier:
            entries.append((ACL_TAGS[tag][0], perm, ACL_UNDEFINED_ID))
            continue
        number = fields[3] if len(fields) == 4 else qualifier
        if tag not in ("user", "group") or not number.isdigit():
            raise ImageError(f"{what}: ACL entry {item!r} names a {tag} without a numeric id",
                             hint="archive with numeric ids (e.g. star, or --xattrs with"
                                  " GNU tar, which also stores the binary ACL)")
        entries.append((ACL_TAGS[tag][1], perm, int(number)))
    if not entries or (not default and all(tag in (0x01, 0x04, 0x20)
                                            for tag, _, _ in entries)):
        return None
    entries.sort(key=lambda e: (e[0], e[2]))
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


def member_xattrs(info: TarHeader, what: str) -> tuple[tuple[bytes, bytes], ...]:
    """Xattrs from SCHILY.xattr.* and LIBARCHIVE.xattr.* pax records, sorted by name.

    ACLs stored only as text (``SCHILY.acl.access``/``default``) become the
    ``system.posix_acl_*`` xattrs; when the binary xattr is also present it wins.
    """
    found: dict[bytes, bytes] = {}
    for key, value in info.pax_headers.items():
        if key.startswith(SCHILY_XATTR):
            name, data = _raw(key[len(SCHILY_XATTR):]), _raw(value)
        elif key.startswith(LIBARCHIVE_XATTR):
            name = urllib.parse.unquote_to_bytes(_raw(key[len(LIBARCHIVE_XATTR):]))
            try:
                data = base64.b64decode(_raw(value) + b"=" * (-len(value) % 4), validate=True)
            except ValueError:
                raise ImageError(f"{what}: xattr record {key!r} is not base64") from None
        else:
            continue
        if not name:
            raise ImageError(f"{what}: empty xattr name in pax record {key!r}")
        if name in found and found[name] != data:
            raise ImageError(f"{what}: xattr {name!r} given twice with different values")
        found[name] = data
    for key, acl_name in SCHILY_ACL.items():
        if key in info.pax_headers and acl_name not in found:
            acl = acl_text_to_xattr(info.pax_headers[key], what,
                                    default=key.endswith("default"))
            if acl is not None:
                found[acl_name] = acl
    return tuple(sorted(found.items()))
