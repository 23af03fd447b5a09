"""Fixed-output sources: Debian packages fetched outside the sandbox and unpacked in userspace.

``apt-get download NAME=VERSION`` runs in a temporary directory; the file's sha256 must
equal the recipe's pin before it is stored (by that hash: the fetch derivation's id
depends only on it). Unpacking reads the ``ar`` archive and its ``data.tar.{xz,zst,gz}``
member in Python (lzma, zstandard, gzip), never runs dpkg, and goes through the hardened
tar reader that ``reprobuild image`` uses (:mod:`reprobuild.trees.tar_reader`): names are
bytes whatever the locale, and members that would escape the output (``..``, absolute
names, through a symlink), duplicates, dangling hardlinks and anything but regular files,
directories, symlinks and hardlinks are refused before a byte is written.
"""

from __future__ import annotations

import hashlib
import io
import lzma
import os
import shutil
import subprocess
import tempfile
import zlib
from collections.abc import Iterator
from typing import BinaryIO, cast

import zstandard

from reprobuild.build.unpack import write_tree_below
from reprobuild.errors import FetchError, ImageError
from reprobuild.trees.tar_reader import Spool, open_decompressed, tree_from_tar
from reprobuild.trees.tree import EntryType, Tree

UNPACK_VERSION = "1"
MAX_DATA_TAR = 16 << 30
"""The largest decompressed data.tar accepted (Debian's largest packages are far smaller)."""
UNPACKED_TYPES = (EntryType.REGULAR, EntryType.DIRECTORY, EntryType.SYMLINK,
                  EntryType.HARDLINK)
AR_MAGIC = b"!<arch>\n"
# struct ar_hdr: ar_name[16] ar_date[12] ar_uid[6] ar_gid[6] ar_mode[8] ar_size[10] ar_fmag[2]
AR_HEADER_SIZE = 60


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def apt_download(package: str, version: str, sha256: str, dest: str) -> None:
    """Download ``package=version`` with apt-get, check its sha256 and move it to ``dest``."""
    if package.startswith("-") or version.startswith("-"):
        raise FetchError(f"refusing to fetch {package}={version}: apt-get would read it "
                         "as an option")
    if shutil.which("apt-get") is None:
        raise FetchError(f"cannot fetch {package}={version}: apt-get is not installed",
                         hint="fetch on a Debian host, or copy the store from one")
    with tempfile.TemporaryDirectory(prefix="reprobuild-fetch-") as tmp:
        os.chmod(tmp, 0o777)  # apt-get drops to the _apt user when it can
        result = subprocess.run(["apt-get", "download", "-q", f"{package}={version}"],
                                cwd=tmp, capture_output=True, text=True, check=False,
                                stdin=subprocess.DEVNULL)
        debs = sorted(n for n in os.listdir(tmp) if n.endswith(".deb"))
        if result.returncode != 0 or len(debs) != 1:
            detail = (result.stderr or result.stdout).strip().splitlines()[-3:]
            raise FetchError(f"apt-get download {package}={version} failed: "
                             + " / ".join(detail),
                             hint="check the package name and version (apt-cache policy "
                                  f"{package}); run apt-get update if the lists are old")
        path = os.path.join(tmp, debs[0])
        actual = sha256_file(path)
        if actual != sha256:
            raise FetchError(f"{package}={version}: sha256 mismatch: the recipe pins {sha256}, "
                             f"the download is {actual}",
                             hint="update the recipe's sha256 only if you trust the new file")
        shutil.move(path, dest)


def _ar_members(f: BinaryIO) -> Iterator[tuple[str, int, int]]:
    """(name, offset, size) of each member of an ar archive."""
    if f.read(8) != AR_MAGIC:
        raise FetchError("not a Debian package (no ar magic)")
    offset = 8
    while True:
        f.seek(offset)
        header = f.read(AR_HEADER_SIZE)
        if len(header) < AR_HEADER_SIZE:
            return
        if header[58:60] != b"`\n":
            raise FetchError("corrupt ar header in the Debian package")
        name = header[:16].decode("ascii", "replace").strip().rstrip("/")
        size = int(header[48:58].decode("ascii").strip())
        yield name, offset + AR_HEADER_SIZE, size
        offset += AR_HEADER_SIZE + size + (size & 1)


def _copy_data_tar(deb: str, target: str, label: str) -> None:
    """Write the decompressed ``data.tar`` of a .deb to ``target``."""
    with open(deb, "rb") as f:
        for name, offset, size in _ar_members(f):
            if not name.startswith("data.tar"):
                continue
            compression = {"data.tar": None, "data.tar.xz": "xz", "data.tar.gz": "gzip",
                           "data.tar.zst": "zstd"}.get(name, "?")
            if compression == "?":
                raise FetchError(f"{label}: unsupported member {name}")
            f.seek(offset)
            member = cast(BinaryIO, _Bounded(f, size))
            try:
                with open_decompressed(member, compression) as stream, \
                        open(target, "wb") as out:
                    while chunk := stream.read(1 << 20):
                        out.write(chunk)
                        if out.tell() > MAX_DATA_TAR:
                            raise FetchError(
                                f"{label}: {name} unpacks to more than "
                                f"{MAX_DATA_TAR >> 30} GiB", hint="refusing what looks like "
                                "a decompression bomb; no Debian package is that large")
            except (OSError, EOFError, lzma.LZMAError, zlib.error, zstandard.ZstdError) as exc:
                raise FetchError(f"{label}: cannot decompress {name} ({exc})") from None
            return
    raise FetchError(f"{label}: no data.tar member")


class _Bounded(io.RawIOBase):
    """``size`` bytes of a file from its current position (an ar member)."""

    def __init__(self, f: BinaryIO, size: int) -> None:
        self._file = f
        self._left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        want = min(len(buffer), self._left)
        if not want:
            return 0
        chunk = self._file.read(want)
        if not chunk:
            raise FetchError("the Debian package ends inside its data.tar member")
        buffer[: len(chunk)] = chunk
        self._left -= len(chunk)
        return len(chunk)


def package_tree(data_tar: str, label: str, spool: Spool) -> Tree:
    """The tree a package's data.tar describes, read by the one hardened tar reader.

    Refused (naming the member and the package): absolute or ``..`` names, a member
    under a symlink, a path given twice, a hardlink to a missing or later member, and
    anything but files, directories, symlinks and hardlinks. Names stay bytes.
    """
    try:
        tree = tree_from_tar(data_tar, what=f"package {label}", spool=spool)
    except ImageError as exc:
        raise FetchError(exc.message, hint=exc.hint) from None
    for entry in tree:
        if entry.type not in UNPACKED_TYPES:
            raise FetchError(f"package {label}: refusing member {entry.display()!r}: "
                             f"a {entry.type.value} is not a file, directory or link",
                             hint="a package's devices belong in an image's [files] overrides")
    return tree


def unpack_deb(deb: str, dest: str, *, label: str | None = None) -> None:
    """Unpack the data of a .deb into the new directory ``dest`` (no dpkg, no scripts).

    The whole member list is read and checked (:func:`package_tree`) before anything is
    written; then the tree is written below the fresh ``dest`` only, each entry created
    relative to its parent's directory descriptor, opened without following symlinks,
    and never over an existing name (``openat``-style: ``O_EXCL``, ``O_NOFOLLOW``,
    ``mkdirat``, ``symlinkat``). Directories are 0755, files 0755 or 0644 after their
    execute bit; owners, setuid bits, times and xattrs are not kept (the store
    canonicalises them). This runs in the engine's process rather than in the sandbox:
    it executes nothing from the package, and the descriptor-relative writes keep it
    inside ``dest`` even if the tree model had a bug.
    """
    label = label or os.path.basename(deb)
    parent = os.path.dirname(os.path.abspath(dest))
    with tempfile.TemporaryDirectory(dir=parent, prefix=".unpack-") as scratch:
        data_tar = os.path.join(scratch, "data.tar")
        _copy_data_tar(deb, data_tar, label)
        tree = package_tree(data_tar, label, Spool(os.path.join(scratch, "spool")))
        os.mkdir(dest, 0o755)
        write_tree_below(tree, dest)
