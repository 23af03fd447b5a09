"""The seccomp filter every sandboxed process runs under, assembled by hand (no libseccomp).

As Nix's build sandbox does, it refuses to make files setuid or setgid (chmod, fchmod,
fchmodat, fchmodat2 with S_ISUID or S_ISGID: EPERM) and to write extended attributes
(setxattr, lsetxattr, fsetxattr, setxattrat: ENOTSUP). It also refuses to create
character or block device nodes (mknod, mknodat: EPERM); the kernel already refuses most
of them in a user namespace, but not the 0:0 "whiteout" character device. Everything
else is allowed. Syscalls of an architecture the filter does not know fail with ENOSYS,
so a 32-bit or x32 binary cannot slip past it.
"""

from __future__ import annotations

import errno
import functools
import platform
import stat
import struct
from dataclasses import dataclass

# struct sock_filter (<linux/filter.h>): __u16 code, __u8 jt, __u8 jf, __u32 k.
SOCK_FILTER = struct.Struct("=HBBI")

# Classic BPF opcodes (<linux/bpf_common.h>).
BPF_LD_W_ABS = 0x20
BPF_ALU_AND_K = 0x54
BPF_JMP_JEQ_K = 0x15
BPF_JMP_JSET_K = 0x45
BPF_RET_K = 0x06

# struct seccomp_data (<linux/seccomp.h>): int nr @0, __u32 arch @4, __u64 ip @8,
# __u64 args[6] @16 (little endian: an argument's low 32 bits come first).
SECCOMP_DATA_NR = 0
SECCOMP_DATA_ARCH = 4
SECCOMP_DATA_ARGS = 16

SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ERRNO = 0x00050000

AUDIT_ARCH_X86_64 = 0xC000003E
AUDIT_ARCH_I386 = 0x40000003
AUDIT_ARCH_AARCH64 = 0xC00000B7
X32_SYSCALL_BIT = 0x40000000

S_IFMT = 0o170000  # <sys/stat.h>; stat.S_IFMT is a function

MODE = "mode"  # refuse when the mode argument has S_ISUID or S_ISGID
DEVICE = "device"  # refuse when the mode argument makes a character or block device
XATTR = "xattr"  # always refuse with ENOTSUP


@dataclass(frozen=True)
class Rule:
    """One syscall the filter inspects: its number, what it checks, which argument."""

    name: str
    number: int
    check: str
    argument: int = 0


def _rules(table: dict[str, int], kinds: dict[str, tuple[str, int]]) -> tuple[Rule, ...]:
    return tuple(Rule(name, table[name], *kinds[name]) for name in sorted(table))


_KINDS: dict[str, tuple[str, int]] = {
    "chmod": (MODE, 1), "fchmod": (MODE, 1), "fchmodat": (MODE, 2), "fchmodat2": (MODE, 2),
    "mknod": (DEVICE, 1), "mknodat": (DEVICE, 2),
    "setxattr": (XATTR, 0), "lsetxattr": (XATTR, 0), "fsetxattr": (XATTR, 0),
    "setxattrat": (XATTR, 0),
}

# Syscall numbers from each architecture's unistd table.
_X86_64 = {"chmod": 90, "fchmod": 91, "fchmodat": 268, "fchmodat2": 452, "mknod": 133,
           "mknodat": 259, "setxattr": 188, "lsetxattr": 189, "fsetxattr": 190,
           "setxattrat": 463}
_I386 = {"chmod": 15, "fchmod": 94, "fchmodat": 306, "fchmodat2": 452, "mknod": 14,
         "mknodat": 297, "setxattr": 226, "lsetxattr": 227, "fsetxattr": 228,
         "setxattrat": 463}
_AARCH64 = {"fchmod": 52, "fchmodat": 53, "fchmodat2": 452, "mknodat": 33, "setxattr": 5,
            "lsetxattr": 6, "fsetxattr": 7, "setxattrat": 463}

ARCHITECTURES: dict[str, tuple[tuple[int, tuple[Rule, ...], bool], ...]] = {
    # machine -> (audit arch, rules, strip the x32 bit) for each ABI a process may use
    "x86_64": ((AUDIT_ARCH_X86_64, _rules(_X86_64, _KINDS), True),
               (AUDIT_ARCH_I386, _rules(_I386, _KINDS), False)),
    "aarch64": ((AUDIT_ARCH_AARCH64, _rules(_AARCH64, _KINDS), False),),
}


class _Assembler:
    """Collects instructions whose jump targets are labels, then resolves them."""

    def __init__(self) -> None:
        self.code: list[tuple[int, str | None, str | None, int]] = []
        self.labels: dict[str, int] = {}

    def label(self, name: str) -> None:
        self.labels[name] = len(self.code)

    def emit(self, code: int, k: int, jt: str | None = None, jf: str | None = None) -> None:
        self.code.append((code, jt, jf, k))

    def ret(self, value: int) -> None:
        self.emit(BPF_RET_K, value)

    def assemble(self) -> bytes:
        out = bytearray()
        for index, (code, jt, jf, k) in enumerate(self.code):
            offsets = [0 if t is None else self.labels[t] - index - 1 for t in (jt, jf)]
            if not all(0 <= o <= 255 for o in offsets):
                raise ValueError("seccomp program jump out of range")
            out += SOCK_FILTER.pack(code, offsets[0], offsets[1], k)
        return bytes(out)


def _errno(number: int) -> int:
    return SECCOMP_RET_ERRNO | number


@functools.cache
def build_filter(machine: str | None = None) -> bytes:
    """The filter program for ``machine`` (default: this host) as packed sock_filters."""
    machine = machine or platform.machine()
    abis = ARCHITECTURES.get(machine)
    if abis is None:
        raise ValueError(f"no seccomp syscall table for architecture {machine}")
    asm = _Assembler()
    asm.emit(BPF_LD_W_ABS, SECCOMP_DATA_ARCH)
    for audit_arch in (abi[0] for abi in abis):
        asm.emit(BPF_JMP_JEQ_K, audit_arch, jt=f"abi{audit_arch:x}", jf=None)
    asm.ret(_errno(errno.ENOSYS))
    for audit_arch, rules, strip_x32 in abis:
        asm.label(f"abi{audit_arch:x}")
        asm.emit(BPF_LD_W_ABS, SECCOMP_DATA_NR)
        if strip_x32:
            # x32 uses the x86_64 numbers plus X32_SYSCALL_BIT for these calls.
            asm.emit(BPF_ALU_AND_K, ~X32_SYSCALL_BIT & 0xFFFFFFFF)
        for rule in rules:
            asm.emit(BPF_JMP_JEQ_K, rule.number, jt=f"{audit_arch:x}:{rule.name}")
        asm.ret(SECCOMP_RET_ALLOW)
        for rule in rules:
            asm.label(f"{audit_arch:x}:{rule.name}")
            if rule.check == XATTR:
                asm.ret(_errno(errno.ENOTSUP))
                continue
            asm.emit(BPF_LD_W_ABS, SECCOMP_DATA_ARGS + 8 * rule.argument)
            if rule.check == MODE:
                asm.emit(BPF_JMP_JSET_K, stat.S_ISUID | stat.S_ISGID, jt="eperm")
            else:
                asm.emit(BPF_ALU_AND_K, S_IFMT)
                asm.emit(BPF_JMP_JEQ_K, stat.S_IFCHR, jt="eperm")
                asm.emit(BPF_JMP_JEQ_K, stat.S_IFBLK, jt="eperm")
            asm.ret(SECCOMP_RET_ALLOW)
    asm.label("eperm")
    asm.ret(_errno(errno.EPERM))
    return asm.assemble()
