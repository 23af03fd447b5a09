"""Unified kernel images: the ``uki`` disk format (a systemd stub, a kernel, an initrd).

Implements :class:`reprobuild.images.protocol.DiskFormat`. Recipe shape::

    [images.uki]
    format = "uki"
    stub = "systemd-boot/usr/lib/systemd/boot/efi/linuxx64.efi.stub"
    kernel = "kernel/boot/vmlinuz-6.1.0-57-cloud-amd64"
    initrd = "initrd"                   # a cpio image (or INPUT/path)
    cmdline = "console=ttyS0 roothash=@root-verity"
    osrel = "ID=reprobuild\\nPRETTY_NAME=\\"sealed\\"\\n"   # optional
    uname = "6.1.0-57-cloud-amd64"      # optional: default the kernel's own release
    sbat = "uki.reprobuild,1,reprobuild,uki,1,https://example.invalid\\n"  # optional

``stub``, ``kernel`` and ``initrd`` name an input (``NAME``: its output is one file) or a
file inside one (``NAME/path``). In ``cmdline``, ``@NAME`` stands for the root hash of
the ``verity`` image ``NAME`` (its ``roothash`` file), so the UKI carries the hash of the
very image it will open; the text, once resolved, may be at most 2047 bytes (the x86
kernel's ``COMMAND_LINE_SIZE`` with its NUL).

The sections are ``.osrel``, ``.cmdline``, ``.uname``, ``.initrd`` and ``.linux`` (last,
so the kernel has room to decompress), appended after the stub's own as ukify places
them; ``sbat`` lines are appended to the stub's ``.sbat``, rewritten in place. The PE
timestamp is zero and the checksum is computed, so the bytes depend on the inputs only.

Output: a directory with ``uki.efi`` and ``uki.json`` (every section's name, virtual
address, virtual size, file offset and raw size, and the resolved command line).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping

from reprobuild.errors import ImageError
from reprobuild.images.registry import ImageOptions
from reprobuild.images.uki import pe
from reprobuild.trees.region import file_region
from reprobuild.trees.tree import Content, Entry, EntryType, FileSource, Tree

VERSION = "1"
UKI_FILE = "uki.efi"
SUMMARY_FILE = "uki.json"
ROOTHASH_FILE = "roothash"  # written by reprobuild.images.verity
FILE_KEYS = ("stub", "kernel", "initrd")
TEXT_KEYS = ("cmdline", "osrel", "uname", "sbat")
MAX_CMDLINE = 2047
_HASH_REF = re.compile(r"@([A-Za-z_][A-Za-z0-9_.-]*)")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")


def _reference(table: Mapping[str, object], key: str) -> tuple[str, str | None]:
    """(input name, path inside it or None) of a file key."""
    value = table.get(key)
    if value is None:
        raise ImageError(f"a uki image needs `{key}`, an input or a file inside one",
                         hint=f'e.g. {key} = "{_EXAMPLES[key]}"')
    if not isinstance(value, str) or not value:
        raise ImageError(f"`{key}` must be a string like \"{_EXAMPLES[key]}\"")
    name, _, inner = value.partition("/")
    if not _NAME.fullmatch(name) or inner.startswith("/") or ".." in inner.split("/"):
        raise ImageError(f"`{key}` = {value!r} must be NAME or NAME/relative/path",
                         hint=f'e.g. {key} = "{_EXAMPLES[key]}"')
    return name, inner or None


_EXAMPLES = {"stub": "systemd-boot/usr/lib/systemd/boot/efi/linuxx64.efi.stub",
             "kernel": "kernel/boot/vmlinuz-6.1.0-57-cloud-amd64", "initrd": "initrd"}


def _text(table: Mapping[str, object], key: str) -> str:
    value = table.get(key, "")
    if not isinstance(value, str):
        raise ImageError(f"`{key}` must be a string")
    return value


def inputs_of(table: Mapping[str, object]) -> list[str]:
    """The stub's, kernel's and initrd's inputs, then each ``@NAME`` of the cmdline."""
    names = [_reference(table, key)[0] for key in FILE_KEYS]
    cmdline = _text(table, "cmdline")
    if len(cmdline.encode()) > MAX_CMDLINE:
        raise ImageError(f"`cmdline` is {len(cmdline.encode())} bytes, more than the "
                         f"kernel's {MAX_CMDLINE}", hint="shorten `cmdline`")
    for key in TEXT_KEYS:
        _text(table, key)
    names += _HASH_REF.findall(cmdline)
    return list(dict.fromkeys(names))


def main_file(table: Mapping[str, object]) -> str:
    return UKI_FILE


def identity(options: ImageOptions) -> dict[str, str]:
    return {}


def _file_of(inputs: Mapping[str, str], table: Mapping[str, object], key: str) -> str:
    name, inner = _reference(table, key)
    if name not in inputs:
        raise ImageError(f"`{key}`: input {name!r} was not provided")
    path = inputs[name] if inner is None else os.path.join(inputs[name], inner)
    if inner is None and os.path.isdir(path):
        files = sorted(n for n in os.listdir(path) if os.path.isfile(os.path.join(path, n)))
        if len(files) != 1:
            raise ImageError(f"`{key}`: input {name!r} is a directory of {len(files)} files",
                             hint=f'name the file: {key} = "{name}/PATH"')
        path = os.path.join(path, files[0])
    if not os.path.isfile(path):
        raise ImageError(f"`{key}`: input {name!r} has no file {inner!r}",
                         hint="check the path inside the input (e.g. the kernel's version)")
    return path


def resolve_cmdline(inputs: Mapping[str, str], table: Mapping[str, object]) -> str:
    """The command line with every ``@NAME`` replaced by that verity image's root hash."""
    def root_hash(match: re.Match[str]) -> str:
        name = match.group(1)
        path = os.path.join(inputs.get(name, ""), ROOTHASH_FILE)
        if name not in inputs or not os.path.isfile(path):
            raise ImageError(f"`cmdline`: @{name} is not a verity image",
                             hint="@NAME names a `format = \"verity\"` image")
        with open(path, encoding="ascii") as f:
            return f.read().strip()
    cmdline = _HASH_REF.sub(root_hash, _text(table, "cmdline"))
    if len(cmdline.encode()) > MAX_CMDLINE:
        raise ImageError(f"`cmdline` is {len(cmdline.encode())} bytes once resolved, more "
                         f"than the kernel's {MAX_CMDLINE}", hint="shorten `cmdline`")
    return cmdline


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


# The x86 boot protocol's setup header: kernel_version (le16) at 0x20e points, from 0x200,
# at a NUL-terminated "RELEASE (builder) #1 SMP ..." string.
SETUP_KERNEL_VERSION = 0x20E
SETUP_BASE = 0x200


def kernel_release(kernel: bytes) -> str:
    """The release (``uname -r``) a bzImage names in its setup header, or "" if none."""
    if len(kernel) < SETUP_KERNEL_VERSION + 2:
        return ""
    pointer = pe.U16.unpack_from(kernel, SETUP_KERNEL_VERSION)[0]
    if not pointer:
        return ""
    start = SETUP_BASE + pointer
    text = kernel[start:start + 256].split(b"\0", 1)[0].split(b" ", 1)[0]
    try:
        release = text.decode("ascii")
    except UnicodeDecodeError:
        return ""
    return release if release.isprintable() else ""


def _sbat(stub: bytes, layout: pe.PeImage, extra: str) -> bytes:
    """The stub's .sbat followed by ``extra`` lines (without a second header line)."""
    sections = [s for s in layout.sections if s.name == ".sbat"]
    if not sections:
        raise ImageError("`sbat`: the stub has no .sbat section to extend")
    section = sections[0]
    own = stub[section.raw_offset:section.raw_offset + section.virtual_size].rstrip(b"\0")
    lines = [line for line in extra.encode().splitlines() if not line.startswith(b"sbat,")]
    return own.rstrip(b"\n") + b"\n" + b"".join(line + b"\n" for line in lines)


def build(inputs: dict[str, str], table: Mapping[str, object], options: ImageOptions,
          output: str) -> None:
    """Write ``output``/uki.efi and uki.json (see the module docstring)."""
    stub_path = _file_of(inputs, table, "stub")
    stub = _read(stub_path)
    stub_pe = pe.parse_stub(stub, f"`stub` ({os.path.basename(stub_path)})")
    if stub_pe.machine != pe.IMAGE_FILE_MACHINE_AMD64:
        machine = pe.MACHINES.get(stub_pe.machine, hex(stub_pe.machine))
        raise ImageError(f"`stub` is a UEFI stub for {machine}, not x86-64",
                         hint="use linuxx64.efi.stub (the kernel is x86-64)")
    kernel = _read(_file_of(inputs, table, "kernel"))
    if kernel[:2] != pe.IMAGE_DOS_SIGNATURE or kernel[0x202:0x206] != b"HdrS":
        raise ImageError("`kernel` is not an x86 EFI-stub kernel (no MZ and HdrS headers)",
                         hint="point `kernel` at boot/vmlinuz-* of a linux-image package")
    initrd = _read(_file_of(inputs, table, "initrd"))
    cmdline = resolve_cmdline(inputs, table)
    payloads: list[tuple[str, bytes]] = []
    for name, text in ((".osrel", _text(table, "osrel")), (".cmdline", cmdline),
                       (".uname", _text(table, "uname") or kernel_release(kernel))):
        if text:
            payloads.append((name, text.encode()))
    payloads += [(".initrd", initrd), (".linux", kernel)]
    if _text(table, "sbat"):
        payloads.append((".sbat", _sbat(stub, stub_pe, _text(table, "sbat"))))
    layout = pe.plan(stub_pe, len(stub), [(name, len(data)) for name, data in payloads])
    image = pe.assemble_headers(stub, layout)
    image += bytes(layout.file_size - len(image))
    by_name = {s.name: s for s in layout.sections}
    for name, data in payloads:
        section = by_name[name]
        image[section.raw_offset:section.raw_offset + section.raw_size] = \
            data + bytes(section.raw_size - len(data))
    at = pe.checksum_offset(layout)
    pe.U32.pack_into(image, at, pe.pe_checksum(image, checksum_at=at))
    os.mkdir(output)
    with open(os.path.join(output, UKI_FILE), "xb") as f:
        f.write(image)
    with open(os.path.join(output, SUMMARY_FILE), "w", encoding="utf-8") as f:
        json.dump(summary(layout, cmdline), f, indent=2, sort_keys=True)
        f.write("\n")


def summary(layout: pe.UkiLayout, cmdline: str) -> dict[str, object]:
    return {
        "cmdline": cmdline, "size_of_image": layout.size_of_image,
        "sections": [{"name": s.name, "virtual_address": s.virtual_address,
                      "virtual_size": s.virtual_size, "raw_offset": s.raw_offset,
                      "raw_size": s.raw_size} for s in layout.sections],
    }


def read(path: str | bytes | os.PathLike[str]) -> Tree:
    """An output directory as a tree of its files; a UKI file (any PE32+ image) as a tree
    of ``headers`` and one file per section (named as the section, or ``N-NAME`` when the
    name is empty, repeated or not a file name), so a diff names the section that differs.
    """
    root = os.fsencode(path)
    if os.path.isfile(root):
        return _sections_tree(root)
    tree = Tree(Entry(b"", EntryType.DIRECTORY, 0o555))
    for name in (UKI_FILE, SUMMARY_FILE):  # bytewise order
        file_path = os.path.join(root, name.encode())
        if os.path.exists(file_path):
            tree.add(Entry(name.encode(), EntryType.REGULAR, 0o444,
                           content=Content(os.path.getsize(file_path),
                                           FileSource(file_path))))
    return tree


HEADER_READ = 1 << 16  # headers beyond this are refused by parse_stub's bounds


def _sections_tree(path: bytes) -> Tree:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(HEADER_READ)
    what = os.fsdecode(path)
    parsed = pe.parse_stub(head, what, file_size=size)
    tree = Tree(Entry(b"", EntryType.DIRECTORY, 0o555))
    pieces: list[tuple[bytes, int, int]] = [(b"headers", 0, parsed.size_of_headers)]
    names = [s.name.encode("latin-1") for s in parsed.sections]
    for index, (section, name) in enumerate(zip(parsed.sections, names, strict=True)):
        if not name or names.count(name) > 1 or b"/" in name or b"\0" in name \
                or name in (b".", b"..", b"headers"):
            name = f"{index}-".encode() + name.replace(b"/", b"_").replace(b"\0", b"_")
        pieces.append((name, section.raw_offset, section.raw_size))
    for name, offset, length in pieces:
        region = file_region(path, ((offset, length),), file_size=size,
                             what=f"{what}: {name.decode('latin-1')}")
        tree.add(Entry(name, EntryType.REGULAR, 0o444, content=Content(length, region)))
    return tree
