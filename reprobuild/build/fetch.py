"""Fixed-output sources: Debian packages fetched outside the sandbox and unpacked in userspace.

``apt-get download NAME=VERSION`` runs in a temporary directory; the file's sha256 must
equal the recipe's pin before it is stored (by that hash: the fetch derivation's id
depends only on it). Unpacking reads the ``ar`` archive and its ``data.tar.{xz,zst,gz}``
member in Python (lzma, zstandard, gzip) and never runs dpkg. Members that would escape
the output, or are not regular files, directories, symlinks or hardlinks, are refused.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import lzma
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from typing import IO, BinaryIO, cast

from reprobuild.errors import FetchError

UNPACK_VERSION = "1"
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


@contextlib.contextmanager
def _data_tar(deb: str) -> Iterator[IO[bytes]]:
    """The decompressed ``data.tar`` stream of a .deb (the member is spooled to a file)."""
    with open(deb, "rb") as f, tempfile.TemporaryFile() as member:
        for name, offset, size in _ar_members(f):
            if not name.startswith("data.tar"):
                continue
            f.seek(offset)
            remaining = size
            while remaining:
                chunk = f.read(min(remaining, 1 << 20))
                if not chunk:
                    raise FetchError(f"{os.path.basename(deb)}: truncated {name}")
                member.write(chunk)
                remaining -= len(chunk)
            member.seek(0)
            if name == "data.tar.xz":
                with lzma.LZMAFile(member) as xz:
                    yield cast(IO[bytes], xz)
            elif name == "data.tar.gz":
                with gzip.GzipFile(fileobj=member) as gz:
                    yield cast(IO[bytes], gz)
            elif name == "data.tar.zst":
                import zstandard

                with zstandard.ZstdDecompressor().stream_reader(member) as zst:
                    yield cast(IO[bytes], zst)
            elif name == "data.tar":
                yield member
            else:
                raise FetchError(f"{os.path.basename(deb)}: unsupported member {name}")
            return
    raise FetchError(f"{os.path.basename(deb)}: no data.tar member")


def _safe_name(name: str) -> str:
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts or name.startswith("/"):
        raise FetchError(f"refusing package member {name!r} (it escapes the output)")
    return "/".join(parts)


def unpack_deb(deb: str, dest: str) -> None:
    """Unpack the data of a .deb into the new directory ``dest`` (no dpkg, no scripts)."""
    os.makedirs(dest)
    with _data_tar(deb) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
        for member in tar:
            rel = _safe_name(member.name)
            if not rel:
                continue
            target = os.path.join(dest, rel)
            parent = os.path.dirname(target)
            if os.path.islink(parent) or not os.path.isdir(parent):
                os.makedirs(parent, exist_ok=True)
                if os.path.islink(parent):
                    raise FetchError(f"refusing package member {member.name!r} (through a "
                                     "symlink)")
            if member.isdir():
                os.makedirs(target, exist_ok=True)
                os.chmod(target, 0o755)
            elif member.isfile():
                src = tar.extractfile(member)
                assert src is not None
                with open(target, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
                os.chmod(target, 0o755 if member.mode & 0o111 else 0o644)
            elif member.issym():
                os.symlink(member.linkname, target)  # noqa: PTH211
            elif member.islnk():
                os.link(os.path.join(dest, _safe_name(member.linkname)), target)
            else:
                raise FetchError(f"refusing package member {member.name!r}: "
                                 "not a file, directory or link")
