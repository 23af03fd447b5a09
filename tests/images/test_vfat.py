"""The FAT writer: fsck.fat finds nothing, mtools reads back every file, the geometry is
mkfs.fat's, names and aliases are Windows' and Linux's, the bytes never depend on the host."""

from __future__ import annotations

import hashlib
import io
import os
import re
import subprocess
import textwrap
from pathlib import Path

import pytest

from reprobuild.errors import ImageError
from reprobuild.images.registry import ImageOptions, OptionValue
from reprobuild.images.vfat import image as vfat
from reprobuild.images.vfat.geometry import choose
from reprobuild.images.vfat.layout import plan
from reprobuild.images.vfat.names import directory_names
from reprobuild.images.vfat.ondisk import FAT_BOOT_SECTOR
from reprobuild.proof.diffreport import diff_paths
from reprobuild.trees.diff import diff_trees
from reprobuild.trees.tree import BytesSource, Content, Entry, EntryType, Tree
from tests.conftest import Unprivileged, need_tool
from tests.images.hostconditions import CONDITIONS, Condition, build_under_conditions, write_tree
from tests.images.vfat_qemu import expected_listing, fetch_kernel, kernel_listing
from tests.images.vfat_trees import (
    EPOCH,
    NAMES,
    SHORT_ONLY,
    fat_seconds,
    fat_view,
    vfat_tree,
)

TOOL_ENV = {**os.environ, "TZ": "UTC", "MTOOLS_SKIP_CHECK": "1", "LC_ALL": "C.UTF-8"}


def image_of(tree: Tree, **options: OptionValue) -> bytes:
    common = {key: options.pop(key) for key in ("size", "label", "uuid") if key in options}
    out = io.BytesIO()
    vfat.write(tree, out, ImageOptions(epoch=EPOCH, extra=tuple(sorted(options.items())),
                                       **common))  # type: ignore[arg-type]
    return out.getvalue()


@pytest.fixture(scope="module", params=[None, 16, 32], ids=["auto", "fat16", "fat32"])
def sample_image(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
                 ) -> Path:
    options: dict[str, OptionValue] = {} if request.param is None else {"fat": request.param}
    path = tmp_path_factory.mktemp("vfat") / "sample.img"
    path.write_bytes(image_of(vfat_tree(), label="ESP", **options))
    return path


def fat_bits(path: Path) -> int:
    head = path.read_bytes()[:512]
    return 32 if head[82:87] == b"FAT32" else int(head[54:59][3:])


# -- the reference tools --------------------------------------------------------------
@pytest.mark.tool
def test_fsck_fat_finds_nothing(sample_image: Path) -> None:
    need_tool("fsck.fat")
    result = subprocess.run(["fsck.fat", "-n", "-v", str(sample_image)], capture_output=True,
                            text=True, env=TOOL_ENV)
    assert result.returncode == 0, result.stdout + result.stderr
    problems = [line for line in result.stdout.splitlines()
                if re.search(r"(?i)wrong|invalid|differ|bad|mismatch|lost|correct", line)]
    assert problems == [], result.stdout


@pytest.mark.tool
def test_mcopy_reads_back_every_file(sample_image: Path, tmp_path: Path) -> None:
    need_tool("mcopy")
    out = tmp_path / "copy"
    out.mkdir()
    subprocess.run(["mcopy", "-s", "-m", "-i", str(sample_image), "::/", str(out)], check=True,
                   capture_output=True, env=TOOL_ENV)
    got = {}
    for dirpath, dirnames, filenames in os.walk(os.fsencode(out)):
        rel = os.path.relpath(dirpath, os.fsencode(out))
        for name in dirnames:
            got[os.path.normpath(os.path.join(rel, name))] = ("directory", b"", None)
        for name in filenames:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as stream:
                data = stream.read()
            got[os.path.normpath(os.path.join(rel, name))] = (
                "regular", data, int(os.stat(path).st_mtime))
    want = {path: (kind, data, mtime if kind == "regular" else None)
            for path, (kind, data, mtime) in fat_view(vfat_tree()).items()}
    assert got == want


@pytest.mark.tool
def test_mdir_shows_long_names_and_aliases(sample_image: Path) -> None:
    need_tool("mdir")
    listing = subprocess.run(["mdir", "-i", str(sample_image), "::/"], check=True,
                             capture_output=True, env=TOOL_ENV).stdout.decode()
    assert "Volume in drive : is ESP" in listing
    for name, short in NAMES.items():
        base, ext = short[:8].rstrip(), short[8:].rstrip()
        text = name.decode()
        if name in SHORT_ONLY:
            # No long name: mdir shows the 8.3 name with the NT case bits applied.
            shown_base, shown_ext = text.rsplit(".", 1)
            pattern = rf"^{re.escape(shown_base)}\s+{re.escape(shown_ext)}\s+\d+ [^A-Za-z]*$"
        else:
            pattern = rf"^{re.escape(base)}\s+{re.escape(ext)}\s+\d+ .* {re.escape(text)}$"
        assert re.search(pattern, listing, re.M), (name, short, listing)
    entries = subprocess.run(["mdir", "-i", str(sample_image), "::/loader/entries"],
                             check=True, capture_output=True, env=TOOL_ENV).stdout.decode()
    for number in range(12):
        alias = f"ENTRY-~{number + 1}" if number < 9 else f"ENTRY~{number + 1}"
        assert re.search(rf"^{alias}\s+CON .* entry-{number:02d}-long-name.conf$", entries,
                         re.M), entries


@pytest.mark.tool
@pytest.mark.parametrize("bits", ["12", "16", "32"])
def test_reader_reads_what_mkfs_fat_and_mcopy_write(bits: str, tmp_path: Path) -> None:
    need_tool("mkfs.fat", "mcopy")
    source = tmp_path / "source"
    tree = vfat_tree()
    tree.remove(b"times")  # mcopy has its own ideas about times FAT cannot hold
    write_tree(tree, source)
    image = tmp_path / "reference.img"
    subprocess.run(["mkfs.fat", "-C", "-F", bits, str(image), "40000"], check=True,
                   capture_output=True)
    subprocess.run(["mcopy", "-s", "-m", "-i", str(image),
                    *sorted(str(path) for path in source.iterdir()), "::/"],
                   check=True, capture_output=True, env=TOOL_ENV)
    assert fat_view(vfat.read(image)) == fat_view(tree)


# -- geometry ---------------------------------------------------------------------------
SIZES_KIB = (1024, 3000, 4100, 9000, 20_000, 65_536, 140_000, 270_000, 524_288, 600_000,
             1_048_576, 9_000_000)


@pytest.mark.tool
@pytest.mark.parametrize("bits", [None, 12, 16, 32])
def test_geometry_is_mkfs_fat_s(bits: int | None, tmp_path: Path) -> None:
    need_tool("mkfs.fat")
    for kib in SIZES_KIB:
        image = tmp_path / f"{kib}.img"
        result = subprocess.run(["mkfs.fat", "-C", str(image), str(kib),
                                 *(["-F", str(bits)] if bits else [])], capture_output=True)
        geometry = choose(kib * 1024, fat_bits=bits)
        if result.returncode:
            assert geometry is None, (kib, bits)
            continue
        head = image.read_bytes()[:512]
        image.unlink()
        (_, _, _, spc, reserved, _, root, total16, _, fat16, spt, heads, _, total32
         ) = FAT_BOOT_SECTOR.unpack_from(head)
        fat_length = fat16 or int.from_bytes(head[36:40], "little")
        theirs = (32 if fat16 == 0 else int(head[57:59]), total16 or total32, spc, reserved,
                  fat_length, root, spt, heads)
        assert geometry is not None, (kib, bits)
        assert (geometry.fat_bits, geometry.total_sectors, geometry.sectors_per_cluster,
                geometry.reserved_sectors, geometry.fat_length, geometry.root_entries,
                geometry.sectors_per_track, geometry.heads) == theirs, (kib, bits)


def test_min_size_and_fat_type() -> None:
    tree = vfat_tree()
    small = image_of(tree)
    assert len(small) % (1 << 20) == 0 and fat_bits_of(small) == 12
    assert fat_bits_of(image_of(tree, fat=16)) == 16
    fat32 = image_of(tree, fat=32)
    assert fat_bits_of(fat32) == 32 and len(fat32) >= 33 << 20
    assert fat_bits_of(image_of(tree, size=600 << 20)) == 32
    assert len(image_of(tree, size=5 << 20)) == 5 << 20


def fat_bits_of(data: bytes) -> int:
    return 32 if data[82:87] == b"FAT32" else int(data[57:59])


def test_plan_allocates_contiguously_in_canonical_order() -> None:
    tree = vfat_tree()
    layout = plan(tree, ImageOptions(epoch=EPOCH), fat_bits=None)
    extents = [(entry.path, layout.extents[entry.path]) for entry in tree
               if entry.path in layout.extents]
    assert extents[0][0] == b".hidden"  # the FAT12 root lies before the clusters
    next_cluster = 2
    for path, extent in extents:
        if extent.count:
            assert extent.first == next_cluster, path
            next_cluster += extent.count
        else:
            assert extent.first == 0 and tree.get(path).size == 0  # type: ignore[union-attr]
    assert next_cluster - 2 == layout.used_clusters
    assert [entry.path for entry in layout.files] == [
        entry.path for entry in tree if entry.type is EntryType.REGULAR and entry.size]


def test_content_changing_size_is_refused() -> None:
    tree = tree_with(Entry(b"grows", EntryType.REGULAR, 0o644,
                           content=Content(3, BytesSource(b"four"))))
    with pytest.raises(ImageError, match=r"/grows: content is 4 bytes, expected 3"):
        image_of(tree)


# -- names --------------------------------------------------------------------------------
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


# -- what FAT cannot hold ----------------------------------------------------------------
def tree_with(*entries: Entry) -> Tree:
    tree = Tree(Entry(b"", EntryType.DIRECTORY, 0o755))
    tree.add(Entry(b"dir", EntryType.DIRECTORY, 0o755))
    tree.add(Entry(b"dir/file", EntryType.REGULAR, 0o644, content=Content.from_bytes(b"x")))
    for entry in entries:
        tree.add(entry)
    return tree


def file(path: bytes) -> Entry:
    return Entry(path, EntryType.REGULAR, 0o644, content=Content.from_bytes(b"y"))


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


def read_bytes(data: bytes) -> Tree:
    path = Path(os.environ.get("TMPDIR", "/tmp"), f"vfat-{os.getpid()}.img")
    path.write_bytes(data)
    try:
        tree = vfat.read(path)
        return Tree() if tree is None else _materialised(tree)
    finally:
        path.unlink()


def _materialised(tree: Tree) -> Tree:
    out = Tree(tree.root)
    for entry in tree:
        if entry.path:
            content = (Content.from_bytes(entry.content.read()) if entry.content is not None
                       else None)
            out.add(Entry(entry.path, entry.type, entry.mode, mtime_ns=entry.mtime_ns,
                          content=content))
    return out


@pytest.mark.parametrize(("options", "message"), [
    ({"size": 1 << 20, "fat": 32}, r"no FAT32 file system fits in 1048576 bytes"),
    ({"size": 1 << 20}, r"the tree needs \d+ clusters of 2048 bytes, but 1048576 bytes hold 502"),
    ({"size": 1_000_001 * 512 + 1}, r"vfat size 512000513 is not a multiple of 512"),
    ({"fat": 12, "size": 512 << 20}, r"no FAT12 file system fits"),
    ({"label": "esp"}, r"vfat label 'esp' is not a FAT volume label"),
    ({"label": "TOO LONG NAME"}, r"is not a FAT volume label"),
    ({"label": "A.B"}, r"is not a FAT volume label"),
    ({"volume_id": "12345"}, r"vfat volume id '12345' is not 8 hex digits"),
    ({"volume_id": "XYZW-1234"}, r"is not 8 hex digits"),
    ({"volume_id": "1234-ABCD", "uuid": "1234ABCD"}, r"as uuid or as volume_id, not both"),
    ({"fat": 13}, r"vfat option fat = 13 is not 12, 16 or 32"),
])
def test_bad_options_are_refused(options: dict[str, OptionValue], message: str) -> None:
    tree = tree_with(Entry(b"big", EntryType.REGULAR, 0o644,
                           content=Content(2 << 20, BytesSource(b""))))
    with pytest.raises(ImageError, match=message):
        image_of(tree, **options)


def test_a_tree_too_big_for_fat12_is_refused() -> None:
    tree = tree_with(Entry(b"big", EntryType.REGULAR, 0o644,
                           content=Content(300 << 20, BytesSource(b""))))
    with pytest.raises(ImageError, match=r"does not fit in a FAT12 file system"):
        image_of(tree, fat=12)


def test_an_epoch_after_2107_is_refused() -> None:
    out = io.BytesIO()
    with pytest.raises(ImageError, match=r"epoch 4354819200 is after 2107-12-31"):
        vfat.write(tree_with(), out, ImageOptions(epoch=4354819200))


def test_a_root_with_more_than_512_entries(tmp_path: Path) -> None:
    tree = tree_with(*(file(b"root-file-%04d" % number) for number in range(400)))
    data = image_of(tree, fat=16)
    root_entries = int.from_bytes(data[17:19], "little")
    assert root_entries >= 400 * 3 + 1 and root_entries % 16 == 0
    assert len(fat_view(read_bytes(data))) == 402


# -- reading --------------------------------------------------------------------------------
def test_read_gives_back_the_tree(sample_image: Path) -> None:
    back = vfat.read(sample_image)
    assert fat_view(back) == fat_view(vfat_tree())
    read_only = back.get(b"sizes/read-only")
    assert read_only is not None and read_only.mode == 0o444


def test_times_are_utc_and_clamped(sample_image: Path) -> None:
    back = vfat.read(sample_image)
    times = {e.path: e.mtime_ns // 10**9 for e in back if e.path.startswith(b"times/")}
    assert times == {b"times/1970": 315532800, b"times/1979-12-31": 315532800,
                     b"times/future": EPOCH - 1, b"times/odd": EPOCH - 1001}
    assert fat_seconds(EPOCH * 10**9) == EPOCH - 1


def test_diff_reads_vfat_images(tmp_path: Path) -> None:
    tree = vfat_tree()
    (tmp_path / "a.img").write_bytes(image_of(tree))
    tree.replace_entry(Entry(b"readme.txt", EntryType.REGULAR, 0o644,
                             content=Content.from_bytes(b"changed")))
    (tmp_path / "b.img").write_bytes(image_of(tree))
    report = diff_paths(tmp_path / "a.img", tmp_path / "b.img")
    assert (report.kind_a, report.kind_b) == ("vfat", "vfat")
    assert [d.display() for d in report.differences] == [
        d.display() for d in diff_trees(vfat.read(tmp_path / "a.img"),
                                        vfat.read(tmp_path / "b.img"))]
    assert "/readme.txt" in report.render()


# -- determinism -------------------------------------------------------------------------
GOLDEN = "7318395d9ccb3dabc250ee49b50c4717c003406e33bdc577ff485f7d5c58caf2"


def test_golden_digest() -> None:
    data = image_of(vfat_tree(), label="ESP")
    assert hashlib.sha256(data).hexdigest() == GOLDEN


def test_volume_id_from_content_and_seed() -> None:
    tree = vfat_tree()
    first = image_of(tree)
    assert image_of(tree) == first
    assert image_of(tree, seed="other")[39:43] != first[39:43]
    changed = vfat_tree()
    changed.remove(b"empty-dir")
    assert image_of(changed)[39:43] != first[39:43]
    given = image_of(tree, volume_id="ABCD-1234")
    assert given[39:43] == bytes.fromhex("3412cdab")
    assert image_of(tree, uuid="abcd1234")[39:43] == bytes.fromhex("3412cdab")


BUILD_SCRIPT = textwrap.dedent("""
    import sys
    from reprobuild.images.vfat import image as vfat
    from reprobuild.images.registry import ImageOptions
    from reprobuild.trees.directory import tree_from_directory
    tree = tree_from_directory(sys.argv[1], epoch=EPOCH, preserve_mtime=True)
    with open(sys.argv[2], "wb") as out:
        vfat.write(tree, out, ImageOptions(epoch=EPOCH, label="HOST"))
""").replace("EPOCH", str(EPOCH))


def make_vfat_source(root: Path, condition: Condition) -> None:
    write_tree(vfat_tree(), root, condition)


@pytest.mark.userns
def test_host_conditions_give_identical_bytes(unprivileged: Unprivileged) -> None:
    # Odd time zones (Asia/Kolkata, America/St_Johns), locales, umasks, creation order,
    # holes, tmpfs or disk, root or nobody.
    paths = build_under_conditions(unprivileged, "vfat", BUILD_SCRIPT, make_vfat_source,
                                   (CONDITIONS[0], CONDITIONS[1], CONDITIONS[2]))
    images = [path.read_bytes() for path in paths]
    assert images[0] == images[1] == images[2]
    assert fat_view(vfat.read(paths[1])) == fat_view(vfat_tree())


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
