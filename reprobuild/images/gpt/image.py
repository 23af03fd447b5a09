"""GPT disk images composed from other images: the ``gpt`` disk format.

Implements the disk format protocol (:class:`reprobuild.images.protocol.DiskFormat`;
its options schema is in :mod:`reprobuild.images.registry`):

* ``VERSION: str`` - the composer's own code version; it enters every derivation id.
* ``inputs_of(table: Mapping[str, object]) -> list[str]`` - the names of the other images
  or steps the image needs, read from its recipe table (here each partition's ``from``),
  in first-use order. Raises ImageError on a malformed table.
* ``build(inputs: dict[str, str], table: Mapping[str, object], options: ImageOptions,
  output: str) -> None`` - ``inputs`` maps those names to their store paths; ``output``
  is the file or directory to create (it does not exist yet). Reads nothing else.
* ``read(path) -> Tree`` - the image as a tree of files (for ``reprobuild diff`` and tests).
* ``identity(options: ImageOptions) -> dict[str, str]`` - anything besides the options
  and VERSION that changes the bytes (nothing here).
* ``main_file(table: Mapping[str, object]) -> str`` - the file of the output directory
  that is the image (here ``disk.raw``); the store records its fs-verity digest.

Recipe shape::

    [images.disk]
    format = "gpt"
    seed = "appliance-1"      # disk and partition GUIDs derive from seed + label;
                              # default: a hash of every partition's label, type and content
    size = "2G"               # optional; default: the partitions, aligned, plus backup GPT
    sector-size = 512         # optional: 512 (default) or 4096
    alignment = "1M"          # optional partition alignment (default 1 MiB)
    partitions = [
      { from = "root", type = "root-x86-64", label = "root", read-only = true },
      { from = "root-verity", type = "root-x86-64-verity", label = "root-verity",
        read-only = true },
      { type = "esp", label = "ESP", size = "64M" },          # no content: zeros
    ]

Partition keys: ``from`` (an image or step; a file output is the partition's bytes, a
``verity`` image contributes its ``hash`` file (or, made with ``append = true``, its
``image``: data and tree in one partition, not paired), a directory needs
``file = "name"`` unless it holds exactly one file), ``type`` (a name from
:data:`reprobuild.images.gpt.layout.PARTITION_TYPES` such as ``root-x86-64``,
``usr-arm64-verity``, ``esp``, ``xbootldr``, ``swap``, ``home``, ``srv``, ``var``, ``tmp``,
``linux-generic``, or a GUID), ``label`` (at most 36 UTF-16 units; default the ``from``
name or the type), ``size`` (default: the content rounded up to the alignment), ``uuid``,
and the attribute flags ``read-only`` (bit 60), ``no-auto`` (63), ``growfs`` (59),
``required`` (0), ``legacy-bios-bootable`` (2).

A ``*-verity`` partition fed by a ``verity`` image pairs with the partition of the matching
data type (``root-x86-64`` for ``root-x86-64-verity``): as the Discoverable Partitions
Specification says, the data partition's UUID is the first 128 bits of the root hash and
the verity partition's the last 128 bits, and the pair must agree (the hash tree was made
from that very data partition's content).

An ``esp`` partition fed by an image must hold a FAT file system (a ``vfat`` image, the
UKI at ``EFI/BOOT/BOOTX64.EFI``): firmware would take anything else for a broken ESP.

Output: a directory with ``disk.raw`` (the disk), for a verity pair ``disk.roothash``
and/or ``disk.usrhash`` (the root hash in hex and a newline: the sidecar names
systemd-dissect looks for beside ``disk.raw``), ``cmdline`` (the kernel command-line
fragment, ``roothash=HEX`` and/or ``usrhash=HEX`` separated by spaces and a newline; empty
without a verity pair) and ``disk.json`` (disk GUID, size, sector size, and for each
partition its number, label, type, type GUID, UUID, offset, size, attributes, source and
content blake3).

:func:`read` turns a disk (``disk.raw`` or the output directory) into a tree of one
read-only regular file per partition, named ``NUMBER-LABEL`` (``/`` in labels becomes
``_``; just ``NUMBER`` without a label), holding the partition's bytes.
"""

from __future__ import annotations

import json
import os
import uuid as uuidlib
from collections.abc import Mapping
from dataclasses import dataclass

import blake3

from reprobuild.errors import ImageError
from reprobuild.images.gpt import layout as layout_mod
from reprobuild.images.gpt.layout import (
    ATTRIBUTE_BITS,
    TYPE_NAMES,
    DiskLayout,
    GptEntry,
    GptTable,
    PartitionSpec,
)
from reprobuild.images.registry import ImageOptions
from reprobuild.integrity.verity import content_digest_of
from reprobuild.trees.region import FileRegion, file_region
from reprobuild.trees.tree import Content, Entry, EntryType, Tree
from reprobuild.units import parse_size

VERSION = "2"  # 2: the disk is disk.raw (was disk.img), beside disk.roothash/usrhash
PARTITION_KEYS = ("from", "type", "label", "size", "uuid", "file", *ATTRIBUTE_BITS)
DISK_FILE = "disk.raw"
OLD_DISK_FILE = "disk.img"  # gpt VERSION 1 outputs, still read
CMDLINE_FILE = "cmdline"
SUMMARY_FILE = "disk.json"
VERITY_SUMMARY = "verity.json"  # written by reprobuild.images.verity
_COPY_CHUNK = 8 << 20


def _partitions(table: Mapping[str, object]) -> list[Mapping[str, object]]:
    raw = table.get("partitions")
    if not isinstance(raw, list) or not raw:
        raise ImageError("a gpt image needs `partitions`, a list of tables",
                         hint='partitions = [{ from = "root", type = "root-x86-64" }]')
    out: list[Mapping[str, object]] = []
    for index, item in enumerate(raw):
        if not isinstance(item, Mapping):
            raise ImageError(f"partitions[{index}] must be a table")
        for key in item:
            if key not in PARTITION_KEYS:
                raise ImageError(f"partitions[{index}]: unknown key {key!r}",
                                 hint=f"known keys: {', '.join(PARTITION_KEYS)}")
        out.append(item)
    return out


def inputs_of(table: Mapping[str, object]) -> list[str]:
    """The images or steps the partitions come from, in order, without repeats."""
    names: list[str] = []
    for index, part in enumerate(_partitions(table)):
        where = f"partitions[{index}]"
        type_value = part.get("type")
        if not isinstance(type_value, str):
            raise ImageError(f"{where}: `type` is required", hint='e.g. type = "root-x86-64"')
        layout_mod.type_guid(type_value)  # a typo is a recipe error, found at load time
        for flag in ATTRIBUTE_BITS:
            _flag(part, flag, where)
        if "size" in part:
            _size(part["size"], f"{where}.size")
        source = part.get("from")
        if source is None:
            continue
        if not isinstance(source, str):
            raise ImageError(f"partitions[{index}].from must be a name")
        if source not in names:
            names.append(source)
    return names


def main_file(table: Mapping[str, object]) -> str:
    return DISK_FILE


def identity(options: ImageOptions) -> dict[str, str]:
    return {}


def _size(value: object, where: str) -> int:
    try:
        size = parse_size(value)
    except ValueError as exc:
        raise ImageError(f"{where}: {exc}") from None
    if size is None:
        raise ImageError(f"{where}: give a size, not \"min\"")
    return size


@dataclass(frozen=True)
class PartitionInput:
    """Where one partition's bytes come from, with what the recipe says about it."""

    index: int
    source: str | None
    path: str | None  # the file whose bytes fill the partition, None for zeros
    content_size: int
    type_guid: str
    label: str
    size: int | None
    uuid: str | None
    attributes: int
    root_hash: bytes | None  # for a verity image input
    verity_data_blake3: bytes | None


def _content_file(source: str, store_path: str, file_key: object, where: str
                  ) -> tuple[str, Mapping[str, object] | None]:
    if os.path.isfile(store_path):
        if file_key is not None:
            raise ImageError(f"{where}: `file` given but {source!r} is a single file")
        return store_path, None
    if not os.path.isdir(store_path):
        raise ImageError(f"{where}: input {source!r} is neither a file nor a directory")
    summary = os.path.join(store_path, VERITY_SUMMARY)
    if file_key is None and os.path.isfile(summary):
        appended = os.path.join(store_path, "image")
        if os.path.isfile(appended):  # data and tree in one: a plain partition
            return appended, None
        with open(summary, encoding="utf-8") as f:
            info = json.load(f)
        return os.path.join(store_path, "hash"), info
    if file_key is not None:
        if not isinstance(file_key, str) or file_key.startswith("/") or ".." in file_key:
            raise ImageError(f"{where}: `file` must be a relative path inside {source!r}")
        path = os.path.join(store_path, file_key)
        if not os.path.isfile(path):
            raise ImageError(f"{where}: {source!r} has no file {file_key!r}")
        return path, None
    files = sorted(name for name in os.listdir(store_path)
                   if os.path.isfile(os.path.join(store_path, name)))
    if len(files) != 1:
        raise ImageError(f"{where}: input {source!r} is a directory of {len(files)} files",
                         hint='name the one to use with `file = "..."`')
    return os.path.join(store_path, files[0]), None


def _flag(part: Mapping[str, object], key: str, where: str) -> bool:
    value = part.get(key, False)
    if not isinstance(value, bool):
        raise ImageError(f"{where}.{key} must be true or false")
    return value


def resolve_inputs(inputs: Mapping[str, str], table: Mapping[str, object]
                   ) -> list[PartitionInput]:
    """Check every partition of the table and find its bytes among ``inputs``."""
    resolved: list[PartitionInput] = []
    for index, part in enumerate(_partitions(table)):
        where = f"partitions[{index}]"
        source = part.get("from")
        type_value = part.get("type")
        if not isinstance(type_value, str):
            raise ImageError(f"{where}: `type` is required", hint='e.g. type = "root-x86-64"')
        type_guid = layout_mod.type_guid(type_value)
        path: str | None = None
        info: Mapping[str, object] | None = None
        content_size = 0
        if source is not None:
            assert isinstance(source, str)
            if source not in inputs:
                raise ImageError(f"{where}: input {source!r} was not provided")
            path, info = _content_file(source, inputs[source], part.get("file"), where)
            content_size = os.path.getsize(path)
        label = part.get("label", source if source is not None else type_value)
        if not isinstance(label, str):
            raise ImageError(f"{where}.label must be a string")
        size = _size(part["size"], f"{where}.size") if "size" in part else None
        if source is None and size is None:
            raise ImageError(f"{where}: a partition without `from` needs a `size`")
        uuid_value = part.get("uuid")
        if uuid_value is not None:
            try:
                uuid_value = str(uuidlib.UUID(str(uuid_value)))
            except ValueError:
                raise ImageError(f"{where}.uuid {uuid_value!r} is not a UUID") from None
        attributes = 0
        for name, bit in ATTRIBUTE_BITS.items():
            if _flag(part, name, where):
                attributes |= 1 << bit
        root_hash = data_digest = None
        if info is not None:
            root_hash = bytes.fromhex(str(info["root_hash"]))
            data_digest = bytes.fromhex(str(info["data_blake3"]))
        resolved.append(PartitionInput(index, source, path, content_size, type_guid, label,
                                       size, uuid_value, attributes, root_hash, data_digest))
    labels = [p.label for p in resolved]
    for label in labels:
        if labels.count(label) > 1:
            raise ImageError(f"two partitions are labelled {label!r}",
                             hint="labels name partitions and seed their GUIDs: make them "
                             "unique")
    return resolved


def check_esp(part: PartitionInput) -> None:
    """Refuse an ESP whose content is not a FAT file system (boot sector signature and
    a FAT12/16/32 type string where the BPB keeps it)."""
    if part.path is None or part.type_guid != layout_mod.PARTITION_TYPES["esp"]:
        return
    with open(part.path, "rb") as f:
        boot = f.read(512)
    if len(boot) < 512 or boot[510:512] != b"\x55\xaa" or not (
            boot[54:57] == b"FAT" or boot[82:87] == b"FAT32"):
        raise ImageError(f"partition {part.label!r} is an ESP but {part.source!r} is not a "
                         "FAT file system", hint='make it with format = "vfat"')


def _content_digest(part: PartitionInput) -> bytes:
    """blake3 of a partition's bytes (the same digest a verity image derives its salt from)."""
    if part.path is None:
        return blake3.blake3().digest()
    with open(part.path, "rb") as f:
        return content_digest_of(f.fileno(), part.content_size)


@dataclass(frozen=True)
class VerityPair:
    data: int  # index into the partitions
    verity: int
    root_hash: bytes
    kind: str  # "root" or "usr"


def verity_pairs(parts: list[PartitionInput]) -> list[VerityPair]:
    """Match each verity partition fed by a verity image to its data partition by type."""
    pairs = []
    for part in parts:
        name = TYPE_NAMES.get(part.type_guid, "")
        if not name.endswith("-verity") or part.root_hash is None:
            continue
        data_guid = layout_mod.PARTITION_TYPES.get(name[:-len("-verity")])
        matches = [p for p in parts if p.type_guid == data_guid]
        if len(matches) != 1:
            raise ImageError(f"partition {part.label!r} ({name}) needs exactly one "
                             f"{name[:-len('-verity')]} partition, found {len(matches)}")
        pairs.append(VerityPair(matches[0].index, part.index, part.root_hash,
                                name.split("-", 1)[0]))
    return pairs


def build(inputs: dict[str, str], table: Mapping[str, object], options: ImageOptions,
          output: str) -> None:
    """Write ``output``/disk.raw, its root hash sidecars, cmdline and disk.json (see the
    module docstring)."""
    parts = resolve_inputs(inputs, table)
    for part in parts:
        check_esp(part)
    digests = [_content_digest(p) for p in parts]
    pairs = verity_pairs(parts)
    uuids: dict[int, str] = {}
    for pair in pairs:
        data, hashes = parts[pair.data], parts[pair.verity]
        if hashes.verity_data_blake3 != digests[pair.data]:
            raise ImageError(f"partition {hashes.label!r} holds the hash tree of other data "
                             f"than partition {data.label!r}",
                             hint="feed the verity image `from` the same image")
        uuids[pair.data] = str(uuidlib.UUID(bytes=pair.root_hash[:16]))
        uuids[pair.verity] = str(uuidlib.UUID(bytes=pair.root_hash[-16:]))
    seed = table.get("seed")
    if seed is None:
        state = blake3.blake3()
        for part, digest in zip(parts, digests, strict=True):
            state.update(f"{part.label}\0{part.type_guid}\0".encode() + digest)
        seed = state.hexdigest()
    if not isinstance(seed, str):
        raise ImageError("`seed` must be a string")
    specs = [PartitionSpec(p.label, p.type_guid,
                           p.uuid or uuids.get(p.index)
                           or layout_mod.derive_guid(seed, f"partition\0{p.label}"),
                           p.content_size, p.size, p.attributes) for p in parts]
    sector_size = table.get("sector-size", 512)
    if not isinstance(sector_size, int) or isinstance(sector_size, bool):
        raise ImageError("`sector-size` must be 512 or 4096")
    alignment = _size(table["alignment"], "alignment") if "alignment" in table else 1 << 20
    disk_guid = options.uuid or layout_mod.derive_guid(seed, "disk")
    layout = layout_mod.plan(specs, disk_guid=str(uuidlib.UUID(disk_guid)),
                             sector_size=sector_size, alignment=alignment,
                             disk_size=options.size)
    os.mkdir(output)
    write_disk(os.path.join(output, DISK_FILE), layout, [p.path for p in parts])
    cmdline = " ".join(f"{pair.kind}hash={pair.root_hash.hex()}" for pair in pairs)
    with open(os.path.join(output, CMDLINE_FILE), "w", encoding="utf-8") as f:
        f.write(cmdline + "\n" if cmdline else "")
    for pair in pairs:
        with open(os.path.join(output, f"disk.{pair.kind}hash"), "x", encoding="ascii") as f:
            f.write(pair.root_hash.hex() + "\n")
    with open(os.path.join(output, SUMMARY_FILE), "w", encoding="utf-8") as f:
        json.dump(summary(layout, parts, digests, cmdline), f, indent=2, sort_keys=True)
        f.write("\n")


def summary(layout: DiskLayout, parts: list[PartitionInput], digests: list[bytes],
            cmdline: str) -> dict[str, object]:
    ss = layout.sector_size
    return {
        "disk_guid": layout.disk_guid, "size": layout.size, "sector_size": ss,
        "cmdline": cmdline,
        "partitions": [{
            "number": planned.number, "label": planned.spec.label,
            "type": TYPE_NAMES.get(planned.spec.type_guid, planned.spec.type_guid),
            "type_guid": planned.spec.type_guid, "uuid": planned.spec.uuid,
            "offset": planned.offset(ss), "size": planned.size(ss),
            "first_lba": planned.first_lba, "last_lba": planned.last_lba,
            "attributes": [name for name, bit in ATTRIBUTE_BITS.items()
                           if planned.spec.attributes >> bit & 1],
            "from": part.source, "content_size": part.content_size,
            "content_blake3": digest.hex(),
        } for planned, part, digest in zip(layout.partitions, parts, digests, strict=True)],
    }


def _copy(src_path: str, dst: int, offset: int, size: int) -> None:
    with open(src_path, "rb") as src:
        copied = 0
        while copied < size:
            try:
                n = os.copy_file_range(src.fileno(), dst, size - copied, copied,
                                       offset + copied)
            except OSError:
                n = 0
            if n == 0:  # no copy_file_range here, or a short file: copy by hand
                chunk = os.pread(src.fileno(), min(_COPY_CHUNK, size - copied), copied)
                if not chunk:
                    raise ImageError(f"{src_path} shrank while being copied")
                n = os.pwrite(dst, chunk, offset + copied)
            copied += n


def write_disk(path: str, layout: DiskLayout, contents: list[str | None]) -> None:
    """Serialise ``layout``: protective MBR, both GPTs and every partition's bytes."""
    entries = layout_mod.entry_array(layout)
    ss = layout.sector_size
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        os.ftruncate(fd, layout.size)
        os.pwrite(fd, layout_mod.protective_mbr(layout), 0)
        os.pwrite(fd, layout_mod.header(layout, entries, primary=True), ss)
        os.pwrite(fd, entries, 2 * ss)
        for planned, content in zip(layout.partitions, contents, strict=True):
            if content is not None:
                _copy(content, fd, planned.offset(ss), planned.spec.content_size)
        os.pwrite(fd, entries, layout.backup_entries_lba * ss)
        os.pwrite(fd, layout_mod.header(layout, entries, primary=False), layout.last_lba * ss)
    finally:
        os.close(fd)


def _disk_path(path: str | bytes | os.PathLike[str]) -> str:
    text = os.fsdecode(path)
    if os.path.isdir(text):
        if not os.path.exists(os.path.join(text, DISK_FILE)) and \
                os.path.exists(os.path.join(text, OLD_DISK_FILE)):
            return os.path.join(text, OLD_DISK_FILE)
        return os.path.join(text, DISK_FILE)
    return text


def read_table(path: str | bytes | os.PathLike[str]) -> GptTable:
    """The primary GPT of a disk (``disk.raw`` or a gpt output directory), CRCs checked."""
    disk = _disk_path(path)
    with open(disk, "rb") as f:
        head = f.read(4096 * 6)
    for sector_size in (512, 4096):
        if head[sector_size:sector_size + 8] == layout_mod.GPT_SIGNATURE:
            return layout_mod.parse(head, sector_size, disk)
    raise ImageError(f"{disk}: not a GPT disk", hint="no 'EFI PART' header at LBA 1")


def partition_file_name(number: int, label: str) -> bytes:
    clean = label.replace("/", "_").replace("\0", "_")
    return f"{number}-{clean}".encode() if clean else str(number).encode()


def read(path: str | bytes | os.PathLike[str]) -> Tree:
    """A tree of one regular file per partition (``NUMBER-LABEL``) with its bytes."""
    disk = _disk_path(path)
    table = read_table(disk)
    tree = Tree(Entry(b"", EntryType.DIRECTORY, 0o555))
    for entry in table.entries:
        region = partition_region(disk, table, entry)
        tree.add(Entry(partition_file_name(entry.number, entry.name), EntryType.REGULAR,
                       0o444, content=Content(region.size, region)))
    return tree


def partition_region(disk: str | bytes | os.PathLike[str], table: GptTable,
                     entry: GptEntry) -> FileRegion:
    """A partition's bytes as a region of the disk file, checked to lie inside it."""
    what = f"{os.fsdecode(disk)}: partition {entry.number}"
    if entry.last_lba < entry.first_lba:
        raise ImageError(f"{what} ends (LBA {entry.last_lba}) before it starts "
                         f"(LBA {entry.first_lba})", hint="the partition table is damaged")
    offset = entry.first_lba * table.sector_size
    size = (entry.last_lba - entry.first_lba + 1) * table.sector_size
    return file_region(os.fsencode(disk), ((offset, size),), file_size=os.path.getsize(disk),
                       what=what)
