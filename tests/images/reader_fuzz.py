"""A seeded mutation fuzzer for the image readers (ext4, squashfs, EROFS, cpio, tar, GPT,
FAT).

Small valid images of every format are mutated (bytes flipped, fields overwritten with
boundary values, the file truncated, a region spliced elsewhere) and each mutant is read
back the way ``reprobuild diff`` reads it: the tree is walked and every file's content is
read (up to a cap). Anything but a :class:`~reprobuild.errors.ReprobuildError` escaping is
a crash. The loop runs in a subprocess whose address space is limited
(``RLIMIT_AS``: what the interpreter already uses plus ``--memory``), so a reader that
allocates from an unchecked count fails with MemoryError, which is a crash too.

Run alone: ``python -m tests.images.reader_fuzz FORMAT --count N --seed S``; it prints a
JSON summary (mutants tried, crashes with their mutation and traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import signal
import struct
import sys
import tempfile
import traceback
import zlib
from collections.abc import Callable
from pathlib import Path
from types import FrameType

import crc32c

from reprobuild.errors import ReprobuildError
from reprobuild.images.composefs import image as composefs
from reprobuild.images.registry import ImageOptions, get_format
from reprobuild.proof.diffreport import diff_paths
from reprobuild.trees.tree import Content, Entry, EntryType, Tree

EPOCH = 1_700_000_000
READ_CAP = 4 << 20  # bytes of content read per file: a mutated size may claim terabytes
SECONDS_PER_MUTANT = 10
VARIANTS: dict[str, tuple[str, dict[str, object]]] = {
    "ext4": ("ext4", {}),
    "squashfs": ("squashfs", {"compress": "gzip"}),
    "squashfs-none": ("squashfs", {"compress": "none"}),
    "erofs": ("erofs", {}),
    "erofs-lz4": ("erofs", {"compress": "lz4"}),
    "composefs": ("composefs", {}),
    "cpio": ("cpio", {}),
    "cpio-zstd": ("cpio", {"compress": "zstd"}),
    "tar": ("tar", {}),
    "tar-gzip": ("tar", {"compress": "gzip"}),
    "gpt": ("gpt", {}),
    "vfat": ("vfat", {}),
}
INTERESTING = (b"\x00" * 4, b"\xff" * 4, b"\xff" * 8, b"\x7f\xff\xff\xff", b"\x00\x00\x00\x80",
               b"\x01\x00\x00\x00", b"\x00\x10\x00\x00", b"\xff\xff", b"\x00\x80",
               # text fields of tar (octal) and cpio (hex) headers
               b"77777777777\0", b"FFFFFFFF", b"00000000")


def sample_tree(*, xattrs: bool) -> Tree:
    """A little of everything: nested directories, small and multi-block files, links."""
    tree = Tree(Entry(b"", EntryType.DIRECTORY, 0o755, mtime_ns=EPOCH * 10**9))
    mtime = (EPOCH - 86400) * 10**9
    attrs = ((b"user.note", b"fuzz"),) if xattrs else ()
    tree.add(Entry(b"etc", EntryType.DIRECTORY, 0o755, mtime_ns=mtime, xattrs=attrs))
    tree.add(Entry(b"etc/hostname", EntryType.REGULAR, 0o644, mtime_ns=mtime,
                   content=Content.from_bytes(b"fuzzhost\n")))
    rng = random.Random(7)
    compressible = b"".join(b"line %d of a text file\n" % i for i in range(900))
    tree.add(Entry(b"etc/text", EntryType.REGULAR, 0o644, uid=1000, gid=100, mtime_ns=mtime,
                   content=Content.from_bytes(compressible), xattrs=attrs))
    tree.add(Entry(b"bin", EntryType.DIRECTORY, 0o755, mtime_ns=mtime))
    tree.add(Entry(b"bin/tool", EntryType.REGULAR, 0o755, mtime_ns=mtime,
                   content=Content.from_bytes(rng.randbytes(9000))))
    tree.add(Entry(b"bin/zlink", EntryType.HARDLINK, 0o755, target=b"bin/tool"))
    tree.add(Entry(b"bin/sh", EntryType.SYMLINK, 0o777, mtime_ns=mtime, target=b"tool"))
    tree.add(Entry(b"bin/long", EntryType.SYMLINK, 0o777, mtime_ns=mtime,
                   target=b"../" + b"x" * 90))
    tree.add(Entry(b"dev", EntryType.DIRECTORY, 0o755, mtime_ns=mtime))
    tree.add(Entry(b"dev/null", EntryType.CHAR, 0o666, mtime_ns=mtime, rdev_major=1,
                   rdev_minor=3))
    tree.add(Entry(b"dev/fifo", EntryType.FIFO, 0o600, mtime_ns=mtime))
    tree.add(Entry(b"empty", EntryType.REGULAR, 0o600, mtime_ns=mtime))
    for i in range(40):
        tree.add(Entry(b"etc/f%02d" % i, EntryType.REGULAR, 0o644, mtime_ns=mtime,
                       content=Content.from_bytes(b"%d\n" % i * (i + 1))))
    return tree


def files_and_directories(tree: Tree) -> Tree:
    out = Tree(tree.root)
    for entry in tree:
        if entry.path and entry.type in (EntryType.REGULAR, EntryType.DIRECTORY):
            out.add(entry)
    return out


def build_image(variant: str, directory: Path) -> Path:
    """The valid image ``variant`` names, written under ``directory``."""
    fmt, options = VARIANTS[variant]
    if fmt == "gpt":
        part = build_image("ext4", directory)
        module = get_format("gpt").load()
        out = directory / "disk"
        table = {"partitions": [{"from": "root", "type": "root-x86-64", "label": "root"},
                                {"type": "esp", "label": "ESP", "size": "64K"}],
                 "alignment": "4K"}
        module.build({"root": str(part)}, table, ImageOptions(epoch=EPOCH), str(out))
        return out / "disk.raw"
    path = directory / f"{variant}.img"
    module = get_format(fmt).load()
    tree = sample_tree(xattrs=fmt not in ("cpio",))
    if fmt == "composefs":  # its digest store beside it, where its reader looks
        with path.open("wb") as output:
            composefs.write_with_store(tree, output, ImageOptions(epoch=EPOCH),
                                       digest_store=str(directory / "objects"))
        return path
    if fmt == "vfat":  # FAT holds files and directories only
        tree = files_and_directories(tree)
    with path.open("wb") as output:
        module.write(tree, output, ImageOptions(epoch=EPOCH, **options))  # type: ignore[arg-type]
    return path


def mutate(original: bytes, rng: random.Random) -> tuple[bytes, str]:
    """One mutant of ``original`` and a description of what was done to it."""
    data = bytearray(original)
    live = [i for i in range(0, len(data), 4) if data[i:i + 4] != b"\0\0\0\0"] or [0]

    def spot() -> int:
        base = rng.choice(live) if rng.random() < 0.8 else rng.randrange(len(data))
        return min(len(data) - 1, base + rng.randrange(4))

    choice = rng.random()
    if choice < 0.35:
        spots = [spot() for _ in range(rng.randint(1, 6))]
        for at in spots:
            data[at] ^= 1 << rng.randrange(8)
        return bytes(data), f"flip bits at {spots}"
    if choice < 0.65:
        at = spot() & ~1
        value = rng.choice(INTERESTING)
        data[at:at + len(value)] = value
        return bytes(data[:len(original)]), f"write {value.hex()} at {at}"
    if choice < 0.72:
        at = rng.randrange(len(data))
        return bytes(data[:at]), f"truncate to {at}"
    if choice < 0.86:
        at = spot()
        data[at] = rng.randrange(256)
        return bytes(data), f"set byte {at} to {data[at]}"
    length = rng.randint(4, 512)
    src, dst = spot(), spot()
    data[dst:dst + length] = original[src:src + length]
    return bytes(data[:len(original)]), f"splice {length} bytes from {src} to {dst}"


def fix_checksums(fmt: str, data: bytes) -> bytes:
    """Recompute the checksums a reader verifies first, so mutants reach the fields behind.

    GPT: the primary header's CRC and the entry array's CRC (512-byte sectors); EROFS:
    the superblock's crc32c. A truncated image is left as it is.
    """
    out = bytearray(data)
    if fmt == "gpt" and len(out) >= 2 * 512 + 128 * 128:
        header = out[512:512 + 92]
        count, entry_size = struct.unpack_from("<II", header, 80)
        start = struct.unpack_from("<Q", header, 72)[0] * 512
        array = bytes(out[start:start + count * entry_size]) if count * entry_size < 1 << 20 \
            else b""
        struct.pack_into("<I", header, 88, zlib.crc32(array))
        struct.pack_into("<I", header, 16, 0)
        struct.pack_into("<I", header, 16, zlib.crc32(bytes(header)))
        out[512:512 + 92] = header
    if fmt == "erofs" and len(out) >= 4096:
        block = bytearray(out[1024:4096])
        block[4:8] = bytes(4)
        struct.pack_into("<I", out, 1028, crc32c.crc32c(bytes(block)) ^ 0xFFFFFFFF)
    return bytes(out)


def read_everything(fmt: str, path: Path) -> None:
    """Read ``path`` as ``diff`` does: the tree, every link target, every file's bytes."""
    module = get_format(fmt).load()
    tree: Tree = module.read(str(path))
    for entry in tree:
        inode = tree.resolve(entry)
        if inode.content is None:
            continue
        left = READ_CAP
        with inode.content.source.open() as stream:
            while left > 0:
                chunk = stream.read(min(left, 1 << 20))
                if not chunk:
                    break
                left -= len(chunk)


def diff_against(original: Path) -> Callable[[str, Path], None]:
    """A reader that runs ``reprobuild diff ORIGINAL MUTANT`` (as a library call)."""
    def read(fmt: str, path: Path) -> None:
        report = diff_paths(original, path)
        report.render()
        json.dumps(report.to_json())
    return read


class _Timeout(Exception):
    pass


def _alarm(signum: int, frame: FrameType | None) -> None:
    raise _Timeout(f"no answer within {SECONDS_PER_MUTANT} s (a loop?)")


def fuzz(variant: str, count: int, seed: int, *, via_diff: bool = False) -> dict[str, object]:
    """Try ``count`` mutants of the ``variant`` image; the crashes found.

    ``via_diff`` compares each mutant with the original through ``diff`` instead of
    reading it alone.
    """
    fmt = VARIANTS[variant][0]
    crashes: list[dict[str, str]] = []
    refused = 0
    signal.signal(signal.SIGALRM, _alarm)
    with tempfile.TemporaryDirectory(prefix="reprobuild-fuzz-") as tmp:
        original_path = build_image(variant, Path(tmp))
        original = original_path.read_bytes()
        reader = diff_against(original_path) if via_diff else read_everything
        mutant_path = Path(tmp) / "mutant.img"
        rng = random.Random(seed)
        for _ in range(count):
            data, how = mutate(original, rng)
            if rng.random() < 0.7:
                data = fix_checksums(fmt, data)
            mutant_path.write_bytes(data)
            signal.alarm(SECONDS_PER_MUTANT)
            try:
                reader(fmt, mutant_path)
            except ReprobuildError:
                refused += 1
            except (Exception, MemoryError, RecursionError) as exc:
                crashes.append({"mutation": how, "error": f"{type(exc).__name__}: {exc}"[:300],
                                "where": "".join(traceback.format_tb(exc.__traceback__)[-2:])})
            finally:
                signal.alarm(0)
    return {"variant": variant, "mutants": count, "refused": refused, "crashes": crashes}


def limit_memory(extra: int) -> None:
    """Cap the address space at what is mapped now plus ``extra`` bytes."""
    with open("/proc/self/statm", encoding="ascii") as statm:
        mapped = int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    resource.setrlimit(resource.RLIMIT_AS, (mapped + extra, mapped + extra))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variant", choices=sorted(VARIANTS))
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--memory", type=int, default=256 << 20,
                        help="bytes the readers may map beyond the interpreter's start")
    parser.add_argument("--via-diff", action="store_true",
                        help="compare each mutant with the original as `reprobuild diff` does")
    args = parser.parse_args(argv)
    # Build the original image before the cap: only the readers are bounded.
    limit_memory(args.memory)
    result = fuzz(args.variant, args.count, args.seed, via_diff=args.via_diff)
    json.dump(result, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
