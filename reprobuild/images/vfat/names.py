"""Directory names on FAT: 8.3 names, their NT case flags, VFAT long names and aliases.

A name that is a valid upper-case 8.3 name is stored as it is. A name whose base and
extension are each all lower case or all upper case (``readme.txt``, ``EFI``,
``boot.EFI``) is stored as its upper-case 8.3 name with the Windows NT case bits, as
Linux reads them. Any other name gets long-name slots (UTF-16, 13 units a slot, each
carrying the checksum of the 8.3 alias) and an alias made as Windows and Linux make it:
the upper-case name without the characters 8.3 names cannot hold, kept as it is when
that loses nothing and is free, else ``BASE~N.EXT`` with the smallest free ``N``.
Siblings are handled in bytewise name order, so the aliases of a directory depend on
its names only.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from reprobuild.errors import ImageError
from reprobuild.images.vfat.ondisk import (
    ATTR_EXT,
    CASE_LOWER_BASE,
    CASE_LOWER_EXT,
    LAST_LONG_ENTRY,
    LFN_UNITS,
    MAX_NAME_UNITS,
    MSDOS_DIR_SLOT,
    alias_checksum,
)

# Characters no FAT name may hold (the Linux vfat driver's vfat_bad_char), besides
# control characters.
LONG_NAME_FORBIDDEN = frozenset('"*/:<>?\\|')
_FORBIDDEN = re.compile(r'["*/:<>?\\|\x00-\x1f\x7f]')
# A character an 8.3 name may hold (the FAT specification; ASCII only here).
_SHORT = r"[A-Z0-9!#$%&'()\-@^_`{}~]"
_NOT_SHORT = re.compile(rf"(?!{_SHORT}).")
_SHORT_NAME = re.compile(rf"({_SHORT}{{1,8}})(?:\.({_SHORT}{{1,3}}))?")


class DirName(NamedTuple):
    """How one name is stored: the 11-byte 8.3 name, its case bits, and the long-name
    slots (already encoded, in on-disk order) that come before it. (A tuple: one is
    made for every entry of a tree, three times faster than a frozen dataclass.)"""

    short: bytes
    case_bits: int
    slots: tuple[bytes, ...]

    @property
    def entry_count(self) -> int:
        return len(self.slots) + 1


def check_name(name: bytes, shown: str) -> str:
    """The name as text, or an ImageError saying why FAT cannot hold it."""
    try:
        text = name.decode("utf-8")
    except UnicodeDecodeError:
        text = ""
    if (text and not _FORBIDDEN.search(text) and text[-1] not in ". "
            and (len(text) <= MAX_NAME_UNITS // 2
                 or len(text.encode("utf-16-le")) // 2 <= MAX_NAME_UNITS)):
        return text
    return _refuse_name(name, shown)


def _refuse_name(name: bytes, shown: str) -> str:
    try:
        text = name.decode("utf-8")
    except UnicodeDecodeError:
        raise ImageError(f"{shown}: the name is not UTF-8, which FAT long names need",
                         hint="rename the file with a UTF-8 name") from None
    bad = sorted({c for c in text if c in LONG_NAME_FORBIDDEN or ord(c) < 0x20 or c == "\x7f"})
    if bad:
        listed = " ".join(repr(c) for c in bad)
        raise ImageError(f"{shown}: FAT names cannot hold the characters {listed}",
                         hint='rename the file without any of \\ / : * ? " < > | or '
                              "control characters")
    if text.endswith((".", " ")):
        raise ImageError(f"{shown}: FAT drops dots and spaces at the end of a name",
                         hint="rename the file so it does not end with '.' or ' '")
    raise ImageError(f"{shown}: the name is longer than FAT's {MAX_NAME_UNITS} UTF-16 "
                     "units", hint="shorten the name")


def fold(text: str) -> str:
    """The case-insensitive form FAT compares names in (one character for one)."""
    upper = text.upper()
    if len(upper) == len(text):  # upper() never shortens: every character mapped alone
        return upper
    return "".join(c.upper() if len(c.upper()) == 1 else c for c in text)


def _split(text: str) -> tuple[str, str] | None:
    """(base, extension) when ``text`` has the 8.3 shape, else None."""
    # ASCII first: a few letters (U+0131, U+017F) upper-case to ASCII and would come back
    # as other letters from an 8.3 name.
    if len(text) > 12 or not text.isascii() or _SHORT_NAME.fullmatch(text.upper()) is None:
        return None
    base, _, ext = text.partition(".")
    return base, ext


def _single_case(part: str) -> int:
    """0 for upper case (or no letters), 1 for lower case, -1 for mixed case."""
    if part == part.upper():
        return 0
    return 1 if part == part.lower() else -1


def exact_short(text: str) -> tuple[bytes, int] | None:
    """(8.3 name, case bits) when ``text`` needs no long name, else None."""
    parts = _split(text)
    if parts is None:
        return None
    base, ext = parts
    base_case, ext_case = _single_case(base), _single_case(ext)
    if base_case < 0 or ext_case < 0:
        return None
    bits = (CASE_LOWER_BASE if base_case else 0) | (CASE_LOWER_EXT if ext_case else 0)
    return _pack(base.upper(), ext.upper()), bits


def _pack(base: str, ext: str) -> bytes:
    return base.encode("ascii").ljust(8) + ext.encode("ascii").ljust(3)


def _alias_part(part: str) -> tuple[str, bool]:
    """The part upper-cased with what 8.3 cannot hold dropped or replaced; True when
    something was lost."""
    upper = part.upper()
    if part.isascii() and part.isalnum():  # the common case: nothing to drop or replace
        return upper, False
    kept = upper.replace(" ", "").replace(".", "")
    out = _NOT_SHORT.sub("_", kept)
    return out, len(kept) != len(upper) or out != kept or len(upper) != len(part)


def alias_stem(text: str) -> tuple[str, str, bool]:
    """(base, extension, lossy) of an alias before any ``~N``, as Linux's
    vfat_create_shortname splits a name: the extension follows the last dot unless
    only dots and spaces come before it."""
    dot = text.rfind(".")
    if dot > 0 and text[:dot].strip(" ."):
        base, lossy = _alias_part(text[:dot])
        ext, lossy_ext = _alias_part(text[dot + 1:])
        lossy = lossy or lossy_ext
    else:
        (base, lossy), ext = _alias_part(text), ""
    # Leading dots and spaces are dropped, which loses something too.
    lossy = lossy or text[:1] in (" ", ".") or len(base) > 8 or len(ext) > 3
    return base or "_", ext[:3], lossy


def make_alias(text: str, taken: set[bytes], tails: dict[tuple[str, str], int]) -> bytes:
    """A free 8.3 alias of ``text``; adds it to ``taken``. ``tails`` remembers the next
    ``~N`` to try for each stem, so a directory of many similar names stays linear."""
    base, ext, lossy = alias_stem(text)
    if not lossy:
        candidate = _pack(base, ext)
        if candidate not in taken:
            taken.add(candidate)
            return candidate
    stem = (base[:6], ext)  # every ~N alias of this name starts with at most 6 of it
    number = tails.get(stem, 1)
    while number < 1_000_000:
        tail = f"~{number}"
        candidate = _pack(base[:8 - len(tail)] + tail, ext)
        number += 1
        if candidate not in taken:
            taken.add(candidate)
            tails[stem] = number
            return candidate
    raise ImageError(f"no free 8.3 alias for {text!r}")  # a directory holds < 65536


_SLOT_BYTES = LFN_UNITS * 2


def long_slots(text: str, short: bytes) -> tuple[bytes, ...]:
    """The long-name slots of ``text`` for the alias ``short``, last slot first."""
    units = text.encode("utf-16-le")
    if len(units) % _SLOT_BYTES:
        units += b"\0\0"
        units += b"\xff" * (-len(units) % _SLOT_BYTES)
    checksum = alias_checksum(short)
    count = len(units) // _SLOT_BYTES
    pack = MSDOS_DIR_SLOT.pack
    slots = []
    for index in range(count, 0, -1):
        at = (index - 1) * _SLOT_BYTES
        order = index | LAST_LONG_ENTRY if index == count else index
        slots.append(pack(order, units[at:at + 10], ATTR_EXT, 0, checksum,
                          units[at + 10:at + 22], 0, units[at + 22:at + 26]))
    return tuple(slots)


def directory_names(names: list[bytes], shown_dir: str) -> list[DirName]:
    """How each of a directory's children (bytewise sorted) is stored; two names that
    differ only in case are refused."""
    texts = []
    seen: dict[str, str] = {}
    forbidden = _FORBIDDEN.search
    for name in names:
        try:
            text = name.decode("utf-8")
        except UnicodeDecodeError:
            text = ""
        # check_name, inline: this loop runs once for every entry of the tree
        if (not text or forbidden(text) or text[-1] in ". "
                or (len(text) > MAX_NAME_UNITS // 2
                    and len(text.encode("utf-16-le")) // 2 > MAX_NAME_UNITS)):
            _refuse_name(name, _shown(shown_dir, name))
        upper = text.upper()
        key = upper if len(upper) == len(text) else fold(text)
        other = seen.setdefault(key, text)
        if other is not text and other != text:
            raise ImageError(f"{shown_dir.rstrip('/')}/{other} and "
                             f"{_shown(shown_dir, name)}: FAT names ignore case, so these "
                             "are the same name", hint="rename one of them")
        texts.append(text)
    exact = [exact_short(text) for text in texts]
    taken = {found[0] for found in exact if found is not None}
    out = []
    tails: dict[tuple[str, str], int] = {}
    for text, found in zip(texts, exact, strict=True):
        if found is not None:
            out.append(DirName(found[0], found[1], ()))
            continue
        short = make_alias(text, taken, tails)
        out.append(DirName(short, 0, long_slots(text, short)))
    return out


def _shown(shown_dir: str, name: bytes) -> str:
    return f"{shown_dir.rstrip('/')}/{name.decode('utf-8', 'backslashreplace')}"
