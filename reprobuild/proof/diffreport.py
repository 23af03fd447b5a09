"""Difference reports: say where and why two outputs (trees or images) differ.

Both sides are identified by their magic numbers (directory, tar, cpio, ext4, squashfs,
EROFS, GPT disk, FAT, or plain file), read back into trees through the format table's
readers, and compared with :func:`reprobuild.trees.diff.diff_trees`. Files that are not
images get the first differing offset and a hexdump around it; two images whose trees
are equal but whose bytes differ get the same. A GPT disk is compared table first, then
partition by partition, recursively.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from reprobuild.errors import ImageError
from reprobuild.images.registry import get_format
from reprobuild.proof.bytediff import HEX_LINES as HEX_LINES  # re-exported for callers
from reprobuild.proof.bytediff import (
    ORDER_HINT_LIMIT,
    ByteDifference,
    ChunkStream,
    compare_bytes,
    compare_streams,
    order_hint,
)
from reprobuild.trees.diff import Difference, diff_trees
from reprobuild.trees.directory import tree_from_directory
from reprobuild.trees.load import load_tree
from reprobuild.trees.tree import EntryType, Tree

TREE_FORMATS = ("tar", "cpio", "ext4", "squashfs", "erofs", "composefs", "vfat")
MAX_HEXDUMPS = 8  # content differences inside a tree that get a hexdump
MAX_NESTED = 8  # differing image files inside a directory that are compared as images


class ReaderMissing(ImageError):
    """No reader for an image format is available (yet)."""


# -- what a path is -------------------------------------------------------------------
def detect(path: str | os.PathLike[str]) -> str:
    """The kind of ``path``: directory, tar, cpio, ext4, squashfs, erofs, composefs, gpt,
    vfat, uki (a PE image) or file."""
    st = os.lstat(path)
    if stat.S_ISDIR(st.st_mode):
        return "directory"
    if stat.S_ISLNK(st.st_mode):
        return "symlink"
    if not stat.S_ISREG(st.st_mode):
        return "special"
    with open(path, "rb") as stream:
        head = stream.read(4096 + 8)
    if head[:4] == b"hsqs":
        return "squashfs"
    if head[:6] in (b"070701", b"070702"):
        return "cpio"
    if head[512:520] == b"EFI PART" or head[4096:4104] == b"EFI PART":
        return "gpt"
    # struct fat_boot_sector: 55 AA at 510; fs_type "FAT12"/"FAT16" at 54, "FAT32" at 82
    if head[510:512] == b"\x55\xaa" and (head[54:59] in (b"FAT12", b"FAT16")
                                          or head[82:87] == b"FAT32"):
        return "vfat"
    # struct ext4_super_block at 1024: s_magic (le16 0xEF53) at offset 0x38
    if head[1024 + 0x38:1024 + 0x3A] == b"\x53\xef":
        return "ext4"
    # struct erofs_super_block at 1024: magic le32 0xE0F5E1E2 at offset 0; composefs puts
    # its header (magic le32 0xD078629A) before it
    if head[1024:1028] == b"\xe2\xe1\xf5\xe0":
        return "composefs" if head[:4] == b"\x9a\x62\x78\xd0" else "erofs"
    if head[257:262] == b"ustar":
        return "tar"
    # IMAGE_DOS_HEADER: "MZ", e_lfanew at 0x3c pointing at "PE\0\0" (a UKI, any PE)
    pe_at = int.from_bytes(head[0x3C:0x40], "little") if head[:2] == b"MZ" else -1
    if 0 <= pe_at <= len(head) - 4 and head[pe_at:pe_at + 4] == b"PE\0\0":
        return "uki"
    return "file"


def read_tree(path: str | os.PathLike[str], kind: str, *, store_output: bool = False) -> Tree:
    """Read a directory or a tree image into a tree, through the format table's reader."""
    if kind == "directory":
        if store_output:
            # Store outputs are canonical; ownership is the store's, not the output's,
            # and the store may share identical files between outputs.
            return tree_from_directory(path, preserve_mtime=True, detect_hardlinks=False)
        return tree_from_directory(path, preserve_owner=True, preserve_mtime=True,
                                   read_xattrs=True)
    fmt = get_format(kind)
    try:
        module = fmt.load()
        reader = module.read
    except (ImportError, AttributeError):
        raise ReaderMissing(
            f"{os.fspath(path)}: cannot read {kind} images yet (no reader in {fmt.module})",
            hint="compare the files byte by byte, or use --diffoscope") from None
    tree: Tree = reader(os.fspath(path))
    return tree


# -- the report -----------------------------------------------------------------------
@dataclass(frozen=True)
class DiffReport:
    """How ``a`` and ``b`` differ. Empty differences and no byte difference = identical."""

    a: str
    b: str
    kind_a: str
    kind_b: str
    differences: tuple[Difference, ...] = ()
    byte_difference: ByteDifference | None = None
    content_dumps: tuple[tuple[bytes, ByteDifference], ...] = ()
    notes: tuple[str, ...] = ()
    parts: tuple[tuple[str, DiffReport], ...] = field(default=())

    @property
    def identical(self) -> bool:
        return (not self.differences and self.byte_difference is None
                and all(part.identical for _, part in self.parts))

    def render(self, indent: str = "") -> str:
        """A report for people: every differing path and how, hexdumps where useful."""
        lines = [f"{indent}--- {self.a} ({self.kind_a})", f"{indent}+++ {self.b} ({self.kind_b})"]
        if self.identical:
            lines.append(f"{indent}identical")
        lines.extend(f"{indent}{note}" for note in self.notes)
        dumps = dict(self.content_dumps)
        for diff in self.differences:
            lines.append(f"{indent}{diff.display()}")
            if diff.kind == "content" and diff.path in dumps:
                lines.extend(dumps[diff.path].render(indent + "    "))
        if self.byte_difference is not None:
            lines.append(f"{indent}bytes differ:")
            lines.extend(self.byte_difference.render(indent + "  "))
        for label, part in self.parts:
            if part.identical:
                lines.append(f"{indent}{label}: identical")
            else:
                lines.append(f"{indent}{label}:")
                lines.append(part.render(indent + "  ").rstrip("\n"))
        return "\n".join(lines) + "\n"

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "a": self.a, "b": self.b, "kind_a": self.kind_a, "kind_b": self.kind_b,
            "identical": self.identical,
            "differences": [{"path": "/" + d.path.decode("utf-8", "backslashreplace"),
                             "kind": d.kind, "detail": d.detail} for d in self.differences],
            "notes": list(self.notes),
        }
        if self.byte_difference is not None:
            doc["bytes"] = self.byte_difference.to_json()
        if self.content_dumps:
            doc["contents"] = {"/" + p.decode("utf-8", "backslashreplace"): d.to_json()
                               for p, d in self.content_dumps}
        if self.parts:
            doc["parts"] = {label: part.to_json() for label, part in self.parts}
        return doc

    def summary(self) -> list[tuple[str, str]]:
        """(path, kind) of every difference, partitions prefixed by their label."""
        items = [("/" + d.path.decode("utf-8", "backslashreplace"), d.kind)
                 for d in self.differences]
        if self.byte_difference is not None:
            items.append(("", "bytes"))
        for label, part in self.parts:
            items.extend((f"{label}:{p}", k) for p, k in part.summary())
        return items


def diff_paths(
    a: str | os.PathLike[str],
    b: str | os.PathLike[str],
    *,
    compare_owner: bool = True,
    store_outputs: bool = False,
    exact: bool = False,
    follow_symlinks: bool = False,
    workdir: str | os.PathLike[str] | None = None,
) -> DiffReport:
    """Compare two outputs of any supported kind and say how they differ.

    ``store_outputs`` reads directories as store outputs (ownership ignored, no hardlink
    detection). ``follow_symlinks`` compares what ``a`` and ``b`` point at when they are
    symlinks (result links), not the links. ``workdir`` is where GPT partitions are
    extracted (a temporary directory, removed afterwards, when None). A directory
    compared with a tree image is read as ``reprobuild image`` reads its source (owners
    root, mtimes the image's epoch) unless ``exact``.
    """
    pa, pb = Path(a), Path(b)
    if follow_symlinks:
        pa, pb = (Path(os.path.realpath(p)) if p.is_symlink() else p for p in (pa, pb))
    if workdir is not None:
        report = _diff(pa, pb, compare_owner=compare_owner, store_outputs=store_outputs,
                       workdir=Path(workdir), exact=exact)
    else:
        with tempfile.TemporaryDirectory(prefix="reprobuild-diff-") as tmp:
            report = _diff(pa, pb, compare_owner=compare_owner, store_outputs=store_outputs,
                           workdir=Path(tmp), exact=exact)
    return _with(report, a=os.fspath(a), b=os.fspath(b))


def _diff(a: Path, b: Path, *, compare_owner: bool, store_outputs: bool,
          workdir: Path, exact: bool = False) -> DiffReport:
    for p in (a, b):
        if not os.path.lexists(p):
            raise ImageError(f"{p} does not exist")
    kind_a, kind_b = detect(a), detect(b)
    base = DiffReport(str(a), str(b), kind_a, kind_b)
    if kind_a == "symlink" or kind_b == "symlink":
        ta = os.readlink(a) if kind_a == "symlink" else None
        tb = os.readlink(b) if kind_b == "symlink" else None
        if ta == tb:
            return base
        return _with(base, differences=(Difference(b"", "target", f"{ta!r} vs {tb!r}"),))
    byte_diff = None
    if kind_a != "directory" and kind_b != "directory":
        byte_diff = compare_bytes(a, b)
        if byte_diff is None:
            return base
    if kind_a == kind_b == "gpt":
        return _diff_gpt(base, a, b, byte_diff, compare_owner=compare_owner, workdir=workdir)
    treeish = ("directory", *TREE_FORMATS, "uki")  # a UKI reads as its PE sections
    if kind_a in treeish and kind_b in treeish:
        try:
            tree_a = read_tree(a, kind_a, store_output=store_outputs)
            tree_b = read_tree(b, kind_b, store_output=store_outputs)
        except ImageError as exc:
            # No reader yet, or an image the reader refuses: the bytes still tell.
            reason = exc.message if isinstance(exc, ReaderMissing) else \
                f"cannot read both sides as trees ({exc.message})"
            return _with(base, byte_difference=byte_diff,
                         notes=(f"{reason}; comparing bytes only",))
        notes: tuple[str, ...] = ()
        if not exact and not store_outputs and (kind_a == "directory") != (kind_b == "directory"):
            if kind_a == "directory":
                tree_a, tree_b, notes = _as_image_source(a, tree_b, kind_b)
            else:
                tree_b, tree_a, notes = _as_image_source(b, tree_a, kind_a)
        diffs = diff_trees(tree_a, tree_b, compare_owner=compare_owner)
        if not diffs and byte_diff is not None:
            notes += (f"the {kind_a} trees are identical, but the image bytes differ "
                     "(image metadata: superblock, layout, padding)",)
        elif diffs:
            byte_diff = None  # the tree differences are the useful explanation
        parts: tuple[tuple[str, DiffReport], ...] = ()
        if kind_a == kind_b == "directory":
            parts = _nested_images(a, b, diffs, compare_owner=compare_owner, workdir=workdir)
        return _with(base, differences=tuple(diffs), byte_difference=byte_diff, notes=notes,
                     content_dumps=_content_dumps(tree_a, tree_b, diffs), parts=parts)
    if kind_a != kind_b:
        note = f"different kinds: {kind_a} vs {kind_b}"
        return _with(base, differences=(Difference(b"", "type", f"{kind_a} vs {kind_b}"),),
                     byte_difference=byte_diff, notes=(note,))
    return _with(base, byte_difference=byte_diff)


def _as_image_source(directory: Path, image: Tree, kind: str
                     ) -> tuple[Tree, Tree, tuple[str, ...]]:
    """The directory as ``reprobuild image`` would read it for ``image``; the image tree.

    The epoch is the image's newest mtime (a directory source gets every mtime equal to
    it). ext4's ``lost+found`` is left out when the directory has none: mke2fs and our
    writer add it.
    """
    epoch = max(0, max(entry.mtime_ns for entry in image) // 1_000_000_000)
    tree = load_tree(os.fsencode(directory), epoch=epoch)
    if kind == "ext4" and b"lost+found" in image and b"lost+found" not in tree:
        image.remove(b"lost+found")
    note = (f"{directory} read as `reprobuild image` reads a directory (owners root, mtimes "
            f"the epoch {epoch}, taken from the image); --exact compares it as it is")
    return tree, image, (note,)


def _nested_images(a: Path, b: Path, diffs: list[Difference], *, compare_owner: bool,
                   workdir: Path) -> tuple[tuple[str, DiffReport], ...]:
    """Differing files that are images on both sides, compared as images (recursively)."""
    parts: list[tuple[str, DiffReport]] = []
    for diff in diffs:
        if diff.kind != "content" or len(parts) >= MAX_NESTED:
            continue
        fa, fb = a / os.fsdecode(diff.path), b / os.fsdecode(diff.path)
        if fa.is_symlink() or fb.is_symlink() or not (fa.is_file() and fb.is_file()):
            continue
        kind = detect(fa)
        if kind == "file" or detect(fb) != kind:
            continue
        sub = workdir / f"nested{len(parts)}"
        sub.mkdir(exist_ok=True)
        parts.append((f"{kind} image /{os.fsdecode(diff.path)}",
                      _diff(fa, fb, compare_owner=compare_owner, store_outputs=False,
                            workdir=sub)))
    return tuple(parts)


def _with(report: DiffReport, **changes: Any) -> DiffReport:
    return replace(report, **changes)


def _content_dumps(a: Tree, b: Tree, diffs: list[Difference]
                   ) -> tuple[tuple[bytes, ByteDifference], ...]:
    dumps: list[tuple[bytes, ByteDifference]] = []
    for diff in diffs:
        if diff.kind != "content" or len(dumps) >= MAX_HEXDUMPS:
            continue
        ea, eb = a.get(diff.path), b.get(diff.path)
        if ea is None or eb is None:
            continue
        ra, rb = a.resolve(ea), b.resolve(eb)
        if ra.type is not EntryType.REGULAR or rb.type is not EntryType.REGULAR:
            continue
        if max(ra.size, rb.size) > 64 << 20:
            continue  # the offset is in the detail; do not pull huge files into memory
        sa, sb = ChunkStream(ra), ChunkStream(rb)
        found = compare_streams(sa, sb)  # type: ignore[arg-type]
        if found is not None:
            if max(ra.size, rb.size) <= ORDER_HINT_LIMIT:
                found = replace(found, hint=order_hint(sa.all(), sb.all()))
            dumps.append((diff.path, found))
    return tuple(dumps)


# -- GPT ------------------------------------------------------------------------------
def read_gpt(path: str | os.PathLike[str]) -> Any:
    """The primary GPT of a disk image, read (CRCs checked) by the gpt format module."""
    return get_format("gpt").load_module().read_table(os.fspath(path))


_TABLE_FIELDS = ("sector_size", "disk_guid", "first_usable_lba", "last_usable_lba",
                 "alternate_lba")
_ENTRY_FIELDS = ("type_guid", "uuid", "first_lba", "last_lba", "attributes", "name")


def _gpt_table_diffs(ta: Any, tb: Any) -> list[Difference]:
    diffs = []
    for name in _TABLE_FIELDS:
        va, vb = getattr(ta, name), getattr(tb, name)
        if va != vb:
            diffs.append(Difference(f"gpt/{name}".encode(), "table", f"{va} vs {vb}"))
    pa = {p.number: p for p in ta.entries}
    pb = {p.number: p for p in tb.entries}
    for number in sorted(set(pa) | set(pb)):
        label = f"gpt/partition{number}".encode()
        if number not in pb:
            diffs.append(Difference(label, "only-in-a", pa[number].name))
            continue
        if number not in pa:
            diffs.append(Difference(label, "only-in-b", pb[number].name))
            continue
        for name in _ENTRY_FIELDS:
            va, vb = getattr(pa[number], name), getattr(pb[number], name)
            if va != vb:
                diffs.append(Difference(label + b"/" + name.encode(), "table",
                                        f"{va} vs {vb}"))
    return diffs


def _extract(region: Any, target: Path) -> Path:
    """Copy a partition (a checked region of its disk) to ``target``."""
    with region.open() as src, open(target, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    return target


def _diff_gpt(base: DiffReport, a: Path, b: Path, byte_diff: ByteDifference | None, *,
              compare_owner: bool, workdir: Path) -> DiffReport:
    module = get_format("gpt").load_module()
    try:
        ta, tb = read_gpt(a), read_gpt(b)
        ra = {p.number: module.partition_region(a, ta, p) for p in ta.entries}
        rb = {p.number: module.partition_region(b, tb, p) for p in tb.entries}
    except ImageError as exc:  # a corrupt table (bad CRC): the bytes still tell
        return _with(base, byte_difference=byte_diff,
                     notes=(f"cannot read both partition tables ({exc.message}); "
                            "comparing bytes only",))
    diffs = _gpt_table_diffs(ta, tb)
    parts = []
    pb = {p.number: p for p in tb.entries}
    for part in ta.entries:
        other = pb.get(part.number)
        if other is None:
            continue
        label = f"partition {part.number} ({part.name or part.type_guid})"
        fa = _extract(ra[part.number], workdir / f"a-partition{part.number}.img")
        fb = _extract(rb[other.number], workdir / f"b-partition{other.number}.img")
        sub = workdir / f"partition{part.number}"
        sub.mkdir(exist_ok=True)
        found = _diff(fa, fb, compare_owner=compare_owner, store_outputs=False, workdir=sub)
        # Name the partitions by their disk, not by the temporary extracted files.
        parts.append((label, _with(found, a=f"{a} partition {part.number}",
                                   b=f"{b} partition {other.number}")))
    report = _with(base, differences=tuple(diffs), parts=tuple(parts))
    if not diffs and all(p.identical for _, p in parts):
        # Same table, same partitions: the bytes outside them differ (headers, gaps).
        report = _with(report, byte_difference=byte_diff,
                       notes=("the partition tables and partitions are identical, but the "
                              "disk bytes differ outside them",))
    return report


# -- diffoscope -----------------------------------------------------------------------
def run_diffoscope(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> tuple[int, str]:
    """Hand the pair to diffoscope; (its exit code, its text output)."""
    tool = shutil.which("diffoscope")
    if tool is None:
        raise ImageError("diffoscope is not installed",
                         hint="install the diffoscope (or diffoscope-minimal) package")
    result = subprocess.run([tool, "--no-progress", "--text", "-", os.fspath(a), os.fspath(b)],
                            capture_output=True, text=True, check=False)
    if result.returncode not in (0, 1):
        raise ImageError(f"diffoscope failed (exit {result.returncode}): "
                         f"{result.stderr.strip()[-2000:]}")
    return result.returncode, result.stdout
