"""ELF closures read from the files, never found by running anything.

The closure of a program is the program, its interpreter (``PT_INTERP``) and every shared
object the dynamic loader would map for it. :func:`elf_closure` finds them the way glibc's
``ld.so`` does, but by reading the files with pyelftools: breadth-first over
``DT_NEEDED``, a name already loaded (as a path, a requested name or a ``DT_SONAME``) or a
file already loaded under another name is not loaded again; each name without a slash is
searched in the ``DT_RPATH`` of the requesting object and of the objects that loaded it
(only where an object has no ``DT_RUNPATH``) and of the main program, then the requesting
object's ``DT_RUNPATH``, then the directories of ``/etc/ld.so.conf`` (with its ``include``
globs, as ``ldconfig`` puts them in the cache) and the loader's default directories for
the ELF class and machine, unless ``DF_1_NODEFLIB``. ``$ORIGIN``, ``$LIB`` and
``$PLATFORM`` are expanded; a candidate of another ELF class, byte order or machine is
skipped, as ``ld.so`` skips it. ``LD_LIBRARY_PATH`` and ``glibc-hwcaps`` subdirectories
are not searched: the sandbox sets no such variable, and which hwcaps subdirectory the
loader would pick depends on the CPU.

Paths are the ones the loader opens (a symlink is recorded under its own name; its
target's bytes are what is read and imported), so the result equals the file names
``ld.so --list`` prints.
"""

from __future__ import annotations

import glob
import os
import stat
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO, NoReturn

from elftools.common.exceptions import ELFError
from elftools.common.utils import struct_parse
from elftools.construct.core import ConstructError
from elftools.construct.lib.container import Container
from elftools.elf.elffile import ELFFile

from reprobuild.errors import RecipeError

LD_SO_CONF = "/etc/ld.so.conf"
DF_1_NODEFLIB = 0x800
MAX_OBJECTS = 4096
MAX_CONF_INCLUDES = 64
MAX_PROGRAM_HEADERS = 4096
MAX_DYNAMIC_ENTRIES = 65536
MAX_STRING = 4096
STRING_TAGS = ("DT_NEEDED", "DT_RPATH", "DT_RUNPATH", "DT_SONAME")
REFUSED_ROOTS = ("/proc", "/sys", "/dev")
"""Pseudo-filesystems: a path through them is no file a recipe may import."""

# (ELF class, e_machine) -> (multiarch triplet, $PLATFORM). Debian's loader searches the
# multiarch directories first; other distributions' 64-bit loaders search /lib64.
MACHINES: dict[tuple[int, str], tuple[str, str]] = {
    (64, "EM_X86_64"): ("x86_64-linux-gnu", "x86_64"),
    (32, "EM_386"): ("i386-linux-gnu", "i686"),
    (32, "EM_X86_64"): ("x86_64-linux-gnux32", "x86_64"),
    (64, "EM_AARCH64"): ("aarch64-linux-gnu", "aarch64"),
    (32, "EM_ARM"): ("arm-linux-gnueabihf", "v7l"),
    (64, "EM_RISCV"): ("riscv64-linux-gnu", "riscv64"),
    (64, "EM_PPC64"): ("powerpc64le-linux-gnu", "powerpc64le"),
    (64, "EM_S390"): ("s390x-linux-gnu", "s390x"),
}

ELF_ERRORS = (ELFError, ConstructError, struct.error, ValueError, KeyError, IndexError,
              OverflowError, UnicodeDecodeError, AssertionError, AttributeError, TypeError)
"""What pyelftools raises on a malformed file (it trusts its input)."""


@dataclass(frozen=True)
class ElfObject:
    """What the loader reads from one ELF file; strings are file-system strings."""

    path: str
    elf_class: int
    little_endian: bool
    machine: str
    interpreter: str | None
    needed: tuple[str, ...]
    rpath: tuple[str, ...]
    runpath: tuple[str, ...]
    soname: str | None
    nodeflib: bool

    def same_kind(self, other: ElfObject) -> bool:
        return (self.elf_class, self.little_endian, self.machine) == \
            (other.elf_class, other.little_endian, other.machine)


_cache: dict[tuple[str, int, int, int, int, int], ElfObject | None] = {}
"""Readings by path and identity (planning reads libc once, not once per program)."""


def _cstring(f: BinaryIO, offset: int, limit: int) -> str:
    """A NUL-terminated string at ``offset``, at most ``limit`` bytes, fs-decoded."""
    f.seek(offset)
    raw = f.read(max(0, min(limit, MAX_STRING)))
    end = raw.find(b"\0")
    if end < 0:
        raise ELFError(f"unterminated string at offset {offset}")
    return os.fsdecode(raw[:end])


def _program_headers(elf: ELFFile, f: BinaryIO) -> list[Container]:
    count, size = elf["e_phnum"], elf["e_phentsize"]
    if count > MAX_PROGRAM_HEADERS or (count and size < elf.structs.Elf_Phdr.sizeof()):
        raise ELFError(f"{count} program headers of {size} bytes")
    return [struct_parse(elf.structs.Elf_Phdr, f, elf["e_phoff"] + i * size)
            for i in range(count)]


def _file_offset(headers: list[Container], address: int) -> int:
    """The file offset of a virtual address, through the PT_LOAD segments."""
    for ph in headers:
        if ph["p_type"] == "PT_LOAD" and ph["p_vaddr"] <= address < ph["p_vaddr"] + \
                ph["p_filesz"]:
            return int(address - ph["p_vaddr"] + ph["p_offset"])
    raise ELFError(f"address {address:#x} is in no loaded segment")


def _dynamic_entries(elf: ELFFile, f: BinaryIO, headers: list[Container]
                     ) -> list[tuple[str, int]]:
    """(d_tag, d_val) of the PT_DYNAMIC segment, up to DT_NULL."""
    dynamic = next((ph for ph in headers if ph["p_type"] == "PT_DYNAMIC"), None)
    if dynamic is None:
        return []
    size = elf.structs.Elf_Dyn.sizeof()
    count = min(dynamic["p_filesz"] // size, MAX_DYNAMIC_ENTRIES)
    entries = []
    for i in range(count):
        entry = struct_parse(elf.structs.Elf_Dyn, f, dynamic["p_offset"] + i * size)
        if entry["d_tag"] == "DT_NULL":
            break
        entries.append((str(entry["d_tag"]), int(entry["d_val"])))
    return entries


def _parse(path: str, f: BinaryIO) -> ElfObject:
    elf = ELFFile(f)
    headers = _program_headers(elf, f)
    interpreter = None
    for ph in headers:
        if ph["p_type"] == "PT_INTERP":
            interpreter = _cstring(f, ph["p_offset"], ph["p_filesz"])
    entries = _dynamic_entries(elf, f, headers)
    values = dict(entries)
    strings: dict[str, list[str]] = {}
    if any(tag in STRING_TAGS for tag, _ in entries):
        if "DT_STRTAB" not in values:
            raise ELFError("dynamic strings without DT_STRTAB")
        strtab = _file_offset(headers, values["DT_STRTAB"])
        strsz = values.get("DT_STRSZ", MAX_STRING)
        for tag, value in entries:
            if tag in STRING_TAGS:
                if value >= strsz:
                    raise ELFError(f"{tag} string at {value} beyond the string table")
                strings.setdefault(tag, []).append(_cstring(f, strtab + value, strsz - value))

    def split(tag: str) -> tuple[str, ...]:
        return tuple(d for text in strings.get(tag, []) for d in text.split(":"))

    soname = strings["DT_SONAME"][0] if "DT_SONAME" in strings else None
    return ElfObject(path, elf.elfclass, elf.little_endian, str(elf["e_machine"]),
                     interpreter, tuple(strings.get("DT_NEEDED", [])), split("DT_RPATH"),
                     split("DT_RUNPATH"), soname,
                     bool(values.get("DT_FLAGS_1", 0) & DF_1_NODEFLIB))


def read_elf(path: str) -> ElfObject | None:
    """The loader's view of the ELF file at ``path`` (None: not an ELF file).

    Only the ELF header, the program headers and the dynamic segment are read (with
    pyelftools' structures), never section headers: that is all the loader reads.
    Raises :class:`RecipeError` for a file that starts like an ELF file but is malformed.
    """
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            key = (path, st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size)
            if key in _cache:
                return _cache[key]
            found = _parse(path, f) if f.read(4) == b"\x7fELF" else None
    except OSError as exc:
        raise RecipeError(f"cannot read {path}: {exc.strerror}") from None
    except ELF_ERRORS as exc:
        raise RecipeError(f"{path} is not a well-formed ELF file ({exc})",
                          hint="host = names an ELF program built for this machine") from None
    _cache[key] = found
    return found


# -- where the loader looks ----------------------------------------------------------
def ld_so_conf_dirs(path: str = LD_SO_CONF) -> list[str]:
    """The directories of ld.so.conf in order, following ``include`` globs (sorted)."""
    found: list[str] = []
    seen: set[str] = set()

    def read(conf: str, depth: int) -> None:
        if depth > MAX_CONF_INCLUDES or conf in seen:
            return
        seen.add(conf)
        try:
            with open(conf, encoding="utf-8", errors="surrogateescape") as f:
                lines = f.read().splitlines()
        except OSError:
            return
        for raw in lines:
            line = raw.split("#", 1)[0].strip()
            if not line or line.startswith("hwcap "):
                continue
            if line.startswith("include") and line[7:8] in (" ", "\t"):
                for pattern in line[8:].split():
                    pattern = os.path.join(os.path.dirname(conf), pattern)
                    for included in sorted(glob.glob(pattern), key=os.fsencode):
                        read(included, depth + 1)
                continue
            for directory in line.replace(",", " ").split():
                directory = directory.split("=", 1)[0].rstrip("/") or "/"
                if directory.startswith("/") and directory not in found:
                    found.append(directory)

    read(path, 0)
    return found


def default_dirs(obj: ElfObject) -> list[str]:
    """The loader's built-in directories for the object's ELF class and machine."""
    triplet = MACHINES.get((obj.elf_class, obj.machine), ("", ""))[0]
    dirs = [f"/lib/{triplet}", f"/usr/lib/{triplet}"] if triplet else []
    if obj.elf_class == 64:
        dirs += ["/lib64", "/usr/lib64"]
    elif obj.machine == "EM_X86_64":  # x32
        dirs += ["/libx32", "/usr/libx32"]
    elif obj.machine == "EM_386":
        dirs += ["/lib32", "/usr/lib32"]
    return [*dirs, "/lib", "/usr/lib"]


def expand_tokens(text: str, obj: ElfObject, program: str) -> str:
    """``$ORIGIN`` (the directory of the object as loaded), ``$LIB`` and ``$PLATFORM``."""
    triplet, platform = MACHINES.get((obj.elf_class, obj.machine), ("", ""))
    lib = f"lib/{triplet}" if triplet else ("lib64" if obj.elf_class == 64 else "lib")
    values = {"ORIGIN": os.path.dirname(obj.path), "LIB": lib, "PLATFORM": platform}
    for name, value in values.items():
        for token in (f"${{{name}}}", f"${name}"):
            if token in text:
                if not value:
                    raise RecipeError(f"host program {program}: {obj.path} uses ${name}, "
                                      f"which is not known for {obj.machine}")
                text = text.replace(token, value)
    return text


# -- the closure ----------------------------------------------------------------------
@dataclass
class _Loaded:
    obj: ElfObject
    names: set[str]
    loader: _Loaded | None
    file_id: tuple[int, int]


def check_host_path(path: str, program: str) -> os.stat_result:
    """Stat a closure file, refusing pseudo-filesystems and anything not a regular file."""
    real = os.path.realpath(path)
    for root in REFUSED_ROOTS:
        for candidate in (os.path.normpath(path), real):
            if candidate == root or candidate.startswith(root + "/"):
                raise RecipeError(
                    f"host program {program}: {path} lies in {root}, which holds no "
                    "files a recipe may import",
                    hint="name the program by its path in the file system, e.g. "
                         "/usr/bin/tar")
    try:
        st = os.stat(path)
    except OSError as exc:
        raise RecipeError(f"host program {program}: {path}: {exc.strerror}",
                          hint="install it or change the recipe's host = path") from None
    if not stat.S_ISREG(st.st_mode):
        raise RecipeError(f"host program {program}: {path} is not a regular file")
    return st


class _Closure:
    def __init__(self, program: str, main: ElfObject) -> None:
        self.program = program
        self.main = main
        self.loaded: list[_Loaded] = []
        self.conf_dirs = ld_so_conf_dirs()

    def add(self, obj: ElfObject, names: set[str], loader: _Loaded | None) -> _Loaded:
        st = check_host_path(obj.path, self.program)
        if len(self.loaded) >= MAX_OBJECTS:
            raise RecipeError(f"host program {self.program} needs more than {MAX_OBJECTS} "
                              "shared objects")
        names = {*names, obj.path, *([obj.soname] if obj.soname else [])}
        loaded = _Loaded(obj, names, loader, (st.st_dev, st.st_ino))
        self.loaded.append(loaded)
        return loaded

    def find_loaded(self, name: str) -> _Loaded | None:
        for loaded in self.loaded:
            if name in loaded.names:
                return loaded
        return None

    def search_dirs(self, requester: _Loaded) -> Iterator[str]:
        if not requester.obj.runpath:
            chain: list[_Loaded] = []
            at: _Loaded | None = requester
            while at is not None:
                chain.append(at)
                at = at.loader
            if self.loaded[0] not in chain:
                chain.append(self.loaded[0])
            for holder in chain:
                if not holder.obj.runpath:
                    for d in holder.obj.rpath:
                        yield expand_tokens(d, holder.obj, self.program)
        for d in requester.obj.runpath:
            yield expand_tokens(d, requester.obj, self.program)
        if not requester.obj.nodeflib:
            yield from self.conf_dirs
            yield from default_dirs(self.main)

    def locate(self, name: str, requester: _Loaded) -> ElfObject:
        if "/" in name:
            path = expand_tokens(name, requester.obj, self.program)
            if not path.startswith("/"):
                raise RecipeError(f"host program {self.program}: {requester.obj.path} needs "
                                  f"{name!r} by a relative path, which depends on the "
                                  "working directory")
            candidates: Iterator[str] = iter([path])
        else:
            candidates = (os.path.join(d or ".", name) for d in self.search_dirs(requester))
        for path in candidates:
            if not path.startswith("/") or not os.path.isfile(path):
                continue
            check_host_path(path, self.program)  # refuses /proc before reading it
            obj = read_elf(path)
            if obj is not None and obj.same_kind(self.main):
                return obj
        raise RecipeError(f"host program {self.program}: shared library {name} (needed by "
                          f"{requester.obj.path}) not found",
                          hint="install the package that provides it, or name another "
                               "program")

    def walk(self) -> None:
        queue = 0
        while queue < len(self.loaded):
            requester = self.loaded[queue]
            queue += 1
            for name in requester.obj.needed:
                if self.find_loaded(name) is not None:
                    continue
                obj = self.locate(name, requester)
                st = check_host_path(obj.path, self.program)
                same = next((x for x in self.loaded if x.file_id == (st.st_dev, st.st_ino)),
                            None)
                if same is not None:  # the same file under another name: mapped once
                    same.names.add(name)
                    continue
                self.add(obj, {name}, requester)


def _refuse_non_elf(program: str) -> NoReturn:
    with open(program, "rb") as f:
        head = f.read(128)
    if head.startswith(b"#!"):
        line = head[2:].split(b"\n", 1)[0].strip().decode("utf-8", "backslashreplace")
        raise RecipeError(f"host program {program} is a script (#!{line}), not an ELF "
                          "program", hint="name its interpreter as the host source and "
                          "import the script with path = (run it as `INTERPRETER SCRIPT`)")
    raise RecipeError(f"host program {program} is not an ELF program",
                      hint="host = names a compiled program such as /usr/bin/tar")


def elf_interpreter(path: str) -> str | None:
    """The ``PT_INTERP`` of an ELF file, or None (static, not ELF)."""
    obj = read_elf(path)
    return obj.interpreter if obj is not None else None


def elf_closure(program: str, *, loader: str | None = None) -> list[str]:
    """``program``, its interpreter and the shared objects the loader maps, sorted.

    A shared library has no interpreter of its own: pass the ``loader`` that will load
    it. A static program (no interpreter) is its own closure. Nothing is executed.
    """
    check_host_path(program, program)
    main = read_elf(program)
    if main is None:
        _refuse_non_elf(program)
    interpreter = main.interpreter or loader
    if interpreter is None:
        return [program]
    if not interpreter.startswith("/"):
        raise RecipeError(f"host program {program}: its interpreter {interpreter!r} is not "
                          "an absolute path")
    check_host_path(interpreter, program)
    interp = read_elf(interpreter)
    if interp is None or not interp.same_kind(main):
        raise RecipeError(f"host program {program}: its interpreter {interpreter} is not an "
                          "ELF loader for the same machine",
                          hint="name a program built for this machine")
    closure = _Closure(program, main)
    closure.add(main, set(), None)
    if not os.path.samefile(program, interpreter):
        closure.add(interp, set(), None)
    closure.walk()
    return sorted({loaded.obj.path for loaded in closure.loaded}, key=os.fsencode)
