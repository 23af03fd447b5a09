"""Names on FAT: 8.3 names with their case bits, long names and their aliases as Windows
and Linux make them, and the names and entries FAT cannot hold."""

from __future__ import annotations

from pathlib import Path

import pytest

from reprobuild.errors import ImageError
from reprobuild.images.vfat.names import directory_names
from reprobuild.trees.tree import Entry, EntryType
from tests.images.vfat_images import file, image_of, read_bytes, tree_with
from tests.images.vfat_trees import NAMES, fat_seconds, fat_view


def test_names_and_aliases() -> None:
    names = sorted(NAMES)
    stored = directory_names(names, "/")
    assert [s.short.decode() for s in stored] == [NAMES[n] for n in names]
    by_name = dict(zip(names, stored, strict=True))
    assert by_name[b"readme.txt"].slots == () and by_name[b"readme.txt"].case_bits == 0x18
    assert by_name[b"boot.EFI"].slots == () and by_name[b"boot.EFI"].case_bits == 0x08
    assert by_name[b"NOTES.TXT"].slots == () and by_name[b"NOTES.TXT"].case_bits == 0
    assert len(by_name[b"Makefile"].slots) == 1
    # An alias never takes a name a sibling holds as its own 8.3 name.
    taken = directory_names([b"ABC~1.TXT", b"a b c.txt", b"abc~2.txt"], "/")
    assert [s.short for s in taken] == [b"ABC~1   TXT", b"ABC~3   TXT", b"ABC~2   TXT"]
    # A lossless name keeps its own 8.3 form as alias, with a tail only when taken.
    assert [s.short for s in directory_names([b"MAKEFILE.X", b"Makefile.x1"], "/")] == [
        b"MAKEFILEX  ", b"MAKEFILEX1 "]
    assert [s.short for s in directory_names([b"MAKEFI~1.X", b"MAKEFILE.X",
                                              b"MakeFile.Xy"], "/")] == [
        b"MAKEFI~1X  ", b"MAKEFILEX  ", b"MAKEFILEXY "]
    assert [s.short for s in directory_names([b"MAKEFILE", b"Makefile2",
                                              b"makefile.tXt"], "/")] == [
        b"MAKEFILE   ", b"MAKEFI~1   ", b"MAKEFILETXT"]


def test_letters_that_upper_case_to_ascii_keep_a_long_name(tmp_path: Path) -> None:
    # U+0131 and U+017F upper-case to "I" and "S": an 8.3 name alone gives back "i", "s".
    (dotless, long_s) = directory_names(["\u0131".encode(), "\u017ft".encode()], "/")
    assert dotless.slots and long_s.slots
    tree = tree_with(file("dir/\u0131".encode()), file("dir/\u017ft".encode()))
    back = read_bytes(image_of(tree))
    assert {"dir/\u0131".encode(), "dir/\u017ft".encode()} <= set(fat_view(back))


def test_many_similar_names_get_distinct_numbered_aliases() -> None:
    names = sorted(b"some-long-file-name-%05d.txt" % number for number in range(12_000))
    shorts = [stored.short for stored in directory_names(names, "/wide")]
    assert len(set(shorts)) == len(shorts)
    assert shorts[0] == b"SOME-L~1TXT" and shorts[9] == b"SOME-~10TXT"
    assert shorts[99] == b"SOME~100TXT" and shorts[-1] == b"SO~12000TXT"


def test_long_name_slots_carry_the_alias_checksum() -> None:
    (stored,) = directory_names([b"The quick brown fox.txt"], "/")
    assert stored.short == b"THEQUI~1TXT"
    assert [slot[0] for slot in stored.slots] == [0x42, 0x01]
    total = 0
    for byte in stored.short:
        total = (((total & 1) << 7) + (total >> 1) + byte) & 0xFF
    assert {slot[13] for slot in stored.slots} == {total}
    units = b"".join(slot[1:11] + slot[14:26] + slot[28:32] for slot in reversed(stored.slots))
    assert units.decode("utf-16-le").split("\0")[0] == "The quick brown fox.txt"


@pytest.mark.parametrize(("entry", "message"), [
    (file(b"dir/a:b"), r"/dir/a:b: FAT names cannot hold the characters ':'"),
    (file(b'dir/q?"*'), r"""/dir/q\?"\*: FAT names cannot hold the characters '"' '\*' '\?'"""),
    (file(b"dir/tab\there"), r"cannot hold the characters '\\t'"),
    (file(b"dir/back\\slash"), r"cannot hold the characters '\\\\'"),
    (file(b"dir/trailing."), r"/dir/trailing\.: FAT drops dots and spaces at the end"),
    (file(b"dir/trailing "), r"/dir/trailing : FAT drops dots and spaces at the end"),
    (file(b"dir/" + b"n" * 256), r"longer than FAT's 255 UTF-16 units"),
    (file(b"dir/" + "\U0001f600".encode() * 128), r"longer than FAT's 255 UTF-16 units"),
    (file(b"dir/\xff\xfe"), r"/dir/\\xff\\xfe: the name is not UTF-8"),
    (file(b"dir/FILE"), r"/dir/FILE and /dir/file: FAT names ignore case"),
    (Entry(b"dir/link", EntryType.SYMLINK, 0o777, target=b"file"),
     r"/dir/link is a symlink, which FAT cannot hold"),
    (Entry(b"dir/hard", EntryType.HARDLINK, 0o644, target=b"dir/file"),
     r"/dir/hard is a hardlink, which FAT cannot hold"),
    (Entry(b"dir/null", EntryType.CHAR, 0o666, rdev_major=1, rdev_minor=3),
     r"/dir/null is a character device"),
    (Entry(b"dir/sda", EntryType.BLOCK, 0o660, rdev_major=8), r"/dir/sda is a block device"),
    (Entry(b"dir/pipe", EntryType.FIFO, 0o644), r"/dir/pipe is a fifo"),
    (Entry(b"dir/sock", EntryType.SOCKET, 0o644), r"/dir/sock is a socket"),
], ids=lambda value: value.path.decode(errors="replace")[4:12] if isinstance(value, Entry)
    else "")
def test_what_fat_cannot_hold_is_refused(entry: Entry, message: str) -> None:
    with pytest.raises(ImageError, match=message) as caught:
        image_of(tree_with(entry))
    assert caught.value.hint


def test_hardlinks_are_copies_when_asked() -> None:
    tree = tree_with(Entry(b"dir/hard", EntryType.HARDLINK, 0o644, target=b"dir/file"))
    back = fat_view(read_bytes(image_of(tree, hardlinks="copy")))
    assert back[b"dir/hard"] == back[b"dir/file"] == ("regular", b"x", fat_seconds(0))
    with pytest.raises(ImageError, match="is a hardlink") as caught:
        image_of(tree, hardlinks="refuse")
    assert caught.value.hint == 'set hardlinks = "copy" to store a copy of the file'


def test_a_name_of_255_units_fits() -> None:
    back = fat_view(read_bytes(image_of(tree_with(file(b"dir/" + "\u00e9".encode() * 255)))))
    assert b"dir/" + "\u00e9".encode() * 255 in back


@pytest.mark.parametrize(("bad_name_in", "message"), [
    (b"a", r"/a/x:y: FAT names cannot hold"), (b"c", r"/b/link is a symlink")])
def test_the_first_problem_in_canonical_order_is_refused(bad_name_in: bytes,
                                                         message: str) -> None:
    # A directory's names are checked where the directory lies in canonical order.
    tree = tree_with(Entry(b"a", EntryType.DIRECTORY, 0o755),
                     Entry(b"b", EntryType.DIRECTORY, 0o755),
                     Entry(b"b/link", EntryType.SYMLINK, 0o777, target=b"x"),
                     Entry(b"c", EntryType.DIRECTORY, 0o755))
    tree.add(file(bad_name_in + b"/x:y"))
    with pytest.raises(ImageError, match=message):
        image_of(tree)
