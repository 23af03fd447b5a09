"""A recipe's ``[tests.NAME]`` tables: what to boot under QEMU and what it must print.

Two shapes::

    [tests.uefi]                        # a disk through UEFI firmware (OVMF)
    disk = "disk"                       # a gpt image (or any image that is one file)
    expect = ["reprobuild: booted the verified root"]
    timeout = "60s"                     # default 120s

    [tests.direct]                      # a kernel and an initramfs, no firmware
    kernel = "kernel/boot/vmlinuz-6.1.0-57-cloud-amd64"   # INPUT/path, as for a uki
    initrd = "initrd"
    cmdline = "console=ttyS0 roothash=@root-verity"       # @NAME: a verity root hash
    disk = "disk"                       # optional: attached as a virtio disk
    expect = ["reprobuild: booted the verified root"]

Optional keys: ``memory`` (default "512M") and ``corrupt = { partition = "root",
offset = 1024 }``, which boots a copy of the disk with the byte at that offset of the
partition (by GPT label) inverted: the kernel must then refuse it. Each line of
``expect`` must appear in the serial console's output, in that order. This module only
validates; :mod:`reprobuild.proof.boottest` builds and boots.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from reprobuild.errors import RecipeError, suggest
from reprobuild.units import parse_duration, parse_size

TEST_KEYS = ("disk", "kernel", "initrd", "cmdline", "expect", "timeout", "memory", "corrupt")
CORRUPT_KEYS = ("partition", "offset")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")
_HASH_REF = re.compile(r"@([A-Za-z_][A-Za-z0-9_.-]*)")
DEFAULT_TIMEOUT = 120.0
DEFAULT_MEMORY = 512 << 20


@dataclass(frozen=True)
class Corruption:
    partition: str  # GPT partition label
    offset: int  # byte inside the partition


@dataclass(frozen=True)
class BootTest:
    """One boot test of a recipe."""

    name: str
    expect: tuple[str, ...]
    timeout: float = DEFAULT_TIMEOUT
    memory: int = DEFAULT_MEMORY
    disk: str | None = None
    kernel: str | None = None  # INPUT or INPUT/path
    initrd: str | None = None
    cmdline: str = ""
    corrupt: Corruption | None = None

    @property
    def direct(self) -> bool:
        """True when QEMU loads the kernel itself, False when firmware boots the disk."""
        return self.kernel is not None

    def inputs(self) -> list[str]:
        """The recipe names this test needs built, in first-use order."""
        names = [ref.split("/", 1)[0] for ref in (self.disk, self.kernel, self.initrd)
                 if ref is not None]
        return list(dict.fromkeys(names + _HASH_REF.findall(self.cmdline)))


def parse_tests(path: str, raw: object, names: set[str]) -> dict[str, BootTest]:
    """Validate the ``[tests]`` table; every reference must name a source, step or image
    of the recipe (``names``)."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: [tests] must be a table of tests")
    return {name: _test(path, name, table, names) for name, table in raw.items()}


def _test(path: str, name: str, table: object, names: set[str]) -> BootTest:
    where = f"{path}: [tests.{name}]"
    if not _NAME.fullmatch(name):
        raise RecipeError(f"{where}: invalid test name {name!r}")
    if not isinstance(table, dict):
        raise RecipeError(f"{where} must be a table")
    for key in table:
        if key not in TEST_KEYS:
            raise RecipeError(f"{where}: unknown key {key!r}",
                              hint=suggest(key, TEST_KEYS, "keys"))

    def text(key: str) -> str | None:
        value = table.get(key)
        if value is not None and (not isinstance(value, str) or not value or "\0" in value):
            raise RecipeError(f"{where} {key}: must be a non-empty string, not {value!r}")
        return value

    def reference(key: str) -> str | None:
        value = text(key)
        if value is not None and value.split("/", 1)[0] not in names:
            raise RecipeError(f"{where} {key}: {value!r} names no source, step or image",
                              hint=suggest(value.split("/", 1)[0], sorted(names), "names"))
        return value

    disk, kernel, initrd = reference("disk"), reference("kernel"), reference("initrd")
    if (kernel is None) != (initrd is None):
        raise RecipeError(f"{where}: `kernel` and `initrd` go together",
                          hint="give both for a direct boot, or neither to boot `disk` "
                               "through UEFI firmware")
    if kernel is None and disk is None:
        raise RecipeError(f"{where}: nothing to boot",
                          hint='give disk = "IMAGE" (UEFI) or kernel and initrd (direct)')
    cmdline = text("cmdline") or ""
    if kernel is None and cmdline:
        raise RecipeError(f"{where} cmdline: only a direct boot takes a command line",
                          hint="a disk booted through firmware carries its own (in its UKI)")
    for ref in _HASH_REF.findall(cmdline):
        if ref not in names:
            raise RecipeError(f"{where} cmdline: @{ref} names no image",
                              hint=suggest(ref, sorted(names), "names"))
    expect = table.get("expect")
    if (not isinstance(expect, list) or not expect
            or not all(isinstance(line, str) and line for line in expect)):
        raise RecipeError(f"{where} expect: must be a non-empty list of console lines",
                          hint='expect = ["reprobuild: booted"]')
    try:
        timeout = (parse_duration(table["timeout"]) if "timeout" in table
                   else DEFAULT_TIMEOUT)
        memory = parse_size(table["memory"]) if "memory" in table else DEFAULT_MEMORY
    except ValueError as exc:
        raise RecipeError(f"{where}: {exc}") from None
    if memory is None or memory < 64 << 20:
        raise RecipeError(f"{where} memory: give at least \"64M\"")
    return BootTest(name, tuple(expect), timeout, memory, disk, kernel, initrd, cmdline,
                    _corruption(where, table.get("corrupt"), disk))


def _corruption(where: str, raw: object, disk: str | None) -> Corruption | None:
    if raw is None:
        return None
    if disk is None:
        raise RecipeError(f"{where} corrupt: there is no `disk` to corrupt")
    if not isinstance(raw, Mapping) or set(raw) != set(CORRUPT_KEYS):
        raise RecipeError(f"{where} corrupt: must be {{ partition = \"LABEL\", offset = N }}")
    partition, offset = raw["partition"], raw["offset"]
    if not isinstance(partition, str) or not isinstance(offset, int) \
            or isinstance(offset, bool) or offset < 0:
        raise RecipeError(f"{where} corrupt: partition is a label, offset a byte count")
    return Corruption(partition, offset)
