"""Boot tests: run a recipe's built disk or kernel under QEMU and watch its serial console.

:func:`prepare` turns a :class:`~reprobuild.build.boottests.BootTest` and the store paths
of what it needs into QEMU's argv (:func:`qemu_command`: TCG, or KVM on request; OVMF
from Debian's ``ovmf`` for a disk booted through UEFI; a corrupted copy of the disk when
the test asks for one); :func:`boot` runs it, unprivileged, until every expected line has
appeared (in order), QEMU exits or the timeout passes, and returns what the console
printed.
"""

from __future__ import annotations

import os
import re
import select
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from reprobuild.build.boottests import BootTest
from reprobuild.errors import BootTestError, ImageError
from reprobuild.images.gpt import image as gpt_image
from reprobuild.images.uki import image as uki_image

QEMU = "qemu-system-x86_64"
OVMF_CODE = "/usr/share/OVMF/OVMF_CODE_4M.fd"
OVMF_VARS = "/usr/share/OVMF/OVMF_VARS_4M.fd"
TAIL_LINES = 30
# Terminal control sequences (OVMF draws its menus with them) hide nothing we match.
_ESCAPES = re.compile(rb"\x1b\[[=0-9;?]*[A-Za-z]|\x1b[()][A-Z0-9]|\x1bc")


@dataclass(frozen=True)
class BootResult:
    """What one boot printed and whether every expected line appeared."""

    name: str
    ok: bool
    seconds: float
    console: tuple[str, ...]
    missing: tuple[str, ...]  # expected lines not seen, the first of them first
    reason: str  # "all lines seen", "timed out after 60 s", "QEMU exited (status 0)"

    def tail(self, count: int = TAIL_LINES) -> tuple[str, ...]:
        return self.console[-count:]


ACCELERATORS = ("tcg", "kvm")


def accelerators(accel: str) -> list[str]:
    """TCG, or KVM when asked for and this user may open /dev/kvm. KVM is never picked
    on its own: nested hosts offer a /dev/kvm under which the guest hangs silently."""
    if accel == "kvm":
        if not os.access("/dev/kvm", os.R_OK | os.W_OK):
            raise BootTestError("--accel kvm: /dev/kvm is not usable by this user",
                                hint="use --accel tcg (the default)")
        return ["-accel", "kvm"]
    return ["-accel", "tcg"]


def file_of(inputs: Mapping[str, str], reference: str, what: str) -> str:
    """The file ``reference`` (``NAME`` or ``NAME/path``) names among built ``inputs``."""
    name, _, inner = reference.partition("/")
    path = os.path.join(inputs[name], inner) if inner else inputs[name]
    if not os.path.isfile(path):
        raise BootTestError(f"{what}: {reference!r} is not a file of the built {name!r}",
                            hint="name a file inside the input, e.g. kernel/boot/vmlinuz-...")
    return path


def qemu_command(test: BootTest, *, kernel: str | None, initrd: str | None, cmdline: str,
                 disk: str | None, vars_copy: str | None, accel: str = "tcg") -> list[str]:
    """QEMU's argv for ``test`` (a disk read-only on virtio, the console on stdio)."""
    argv = [QEMU, "-machine", "q35", *accelerators(accel), "-m", f"{test.memory >> 20}M",
            "-smp", "1", "-nodefaults", "-no-user-config", "-display", "none",
            "-serial", "stdio", "-no-reboot"]
    if test.direct:
        assert kernel is not None and initrd is not None
        argv += ["-kernel", kernel, "-initrd", initrd, "-append", cmdline]
    else:
        assert vars_copy is not None
        argv += ["-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}",
                 "-drive", f"if=pflash,format=raw,unit=1,file={vars_copy}"]
    if disk is not None:
        argv += ["-drive", f"if=virtio,format=raw,readonly=on,file={disk}"]
    return argv


def corrupt_copy(disk: str, label: str, offset: int, target: str) -> int:
    """Copy ``disk`` to ``target`` with one byte of partition ``label`` inverted; return
    the byte's offset in the disk."""
    table = gpt_image.read_table(disk)
    entries = [e for e in table.entries if e.name == label]
    if not entries:
        raise BootTestError(f"corrupt: the disk has no partition labelled {label!r}",
                            hint="labels: " + ", ".join(e.name for e in table.entries))
    entry = entries[0]
    size = (entry.last_lba - entry.first_lba + 1) * table.sector_size
    if offset >= size:
        raise BootTestError(f"corrupt: offset {offset} is beyond partition {label!r} "
                            f"({size} bytes)")
    shutil.copyfile(disk, target)
    at = entry.first_lba * table.sector_size + offset
    with open(target, "r+b") as f:
        byte = os.pread(f.fileno(), 1, at)
        os.pwrite(f.fileno(), bytes([byte[0] ^ 0xFF]), at)
    return at


def disk_file(path: str) -> str:
    """The disk image of an output: the file itself, or a gpt output's disk."""
    if os.path.isdir(path):
        for name in (gpt_image.DISK_FILE, "disk.img"):
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
        raise BootTestError(f"{path} holds no disk image",
                            hint="point `disk` at a gpt image")
    return path


def prepare(test: BootTest, inputs: Mapping[str, str], workdir: str, *,
            accel: str = "tcg") -> list[str]:
    """Resolve the test's files among the built ``inputs`` and return QEMU's argv."""
    disk = None
    if test.disk is not None:
        disk = (file_of(inputs, test.disk, "disk") if "/" in test.disk
                else disk_file(inputs[test.disk]))
    if disk is not None and test.corrupt is not None:
        corrupted = os.path.join(workdir, "corrupted.raw")
        corrupt_copy(disk, test.corrupt.partition, test.corrupt.offset, corrupted)
        disk = corrupted
    kernel = initrd = None
    cmdline = ""
    vars_copy = None
    if test.direct:
        assert test.kernel is not None and test.initrd is not None
        kernel = file_of(inputs, test.kernel, "kernel")
        initrd = file_of(inputs, test.initrd, "initrd")
        try:
            cmdline = uki_image.resolve_cmdline(inputs, {"cmdline": test.cmdline})
        except ImageError as exc:
            raise BootTestError(f"test {test.name}: {exc.message}", hint=exc.hint) from None
    else:
        for firmware in (OVMF_CODE, OVMF_VARS):
            if not os.path.isfile(firmware):
                raise BootTestError(f"no UEFI firmware at {firmware}",
                                    hint="install Debian's ovmf package (scripts/setup.sh)")
        vars_copy = os.path.join(workdir, "OVMF_VARS.fd")
        shutil.copyfile(OVMF_VARS, vars_copy)
    return qemu_command(test, kernel=kernel, initrd=initrd, cmdline=cmdline, disk=disk,
                        vars_copy=vars_copy, accel=accel)


def boot(test: BootTest, argv: Sequence[str]) -> BootResult:
    """Run QEMU and watch its console until every line of ``test.expect`` appeared in
    order (then stop it), it exits, or ``test.timeout`` passes."""
    if shutil.which(argv[0]) is None:
        raise BootTestError(f"{argv[0]} is not installed",
                            hint="install Debian's qemu-system-x86 (scripts/setup.sh)")
    start = time.monotonic()
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, start_new_session=True)
    assert process.stdout is not None
    watcher = _Console(test.expect)
    reason = ""
    status: int | None = None
    try:
        while not reason:
            left = start + test.timeout - time.monotonic()
            if left <= 0:
                reason = f"timed out after {test.timeout:g} s"
                break
            ready, _, _ = select.select([process.stdout], [], [], min(left, 1.0))
            if not ready:
                continue
            chunk = os.read(process.stdout.fileno(), 65536)
            if not chunk:
                status = process.wait()
                reason = f"QEMU exited (status {status})"
                break
            if watcher.feed(chunk):
                reason = "all lines seen"
    finally:
        _stop(process)
    watcher.feed(b"\n")
    if status not in (None, 0) and watcher.missing():
        # A guest that powers off or panics (-no-reboot) leaves QEMU with status 0: this
        # is QEMU refusing its command line or firmware, not the image failing.
        raise BootTestError(f"QEMU failed (status {status}): "
                            + " / ".join(line for line in watcher.lines[-3:] if line),
                            hint="check the QEMU and OVMF installation (scripts/setup.sh)")
    return BootResult(test.name, not watcher.missing(), time.monotonic() - start,
                      tuple(watcher.lines), watcher.missing(), reason)


class _Console:
    """The console's lines so far and how many of the expected ones appeared in order."""

    def __init__(self, expect: Sequence[str]) -> None:
        self.expect = list(expect)
        self.seen = 0
        self.lines: list[str] = []
        self.partial = b""

    def feed(self, chunk: bytes) -> bool:
        """Add output; True once every expected line has appeared."""
        self.partial += chunk
        *complete, self.partial = self.partial.split(b"\n")
        for raw in complete:
            line = _ESCAPES.sub(b"", raw).replace(b"\r", b"").decode("utf-8", "replace")
            self.lines.append(line)
            if self.seen < len(self.expect) and self.expect[self.seen] in line:
                self.seen += 1
        return self.seen == len(self.expect)

    def missing(self) -> tuple[str, ...]:
        return tuple(self.expect[self.seen:])


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    if process.stdout is not None:
        process.stdout.close()
