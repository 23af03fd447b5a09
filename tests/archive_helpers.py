"""Build tar members and archives for tests (hostile ones included) with :mod:`tarfile`."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class M:
    """A tar member to write: ``kind`` is a tarfile type constant."""

    name: str
    kind: bytes = tarfile.REGTYPE
    data: bytes = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime: int = 1_600_000_000
    linkname: str = ""
    major: int = 0
    minor: int = 0
    pax: dict[str, str] = field(default_factory=dict)


def file(name: str, data: bytes = b"", **kw: object) -> M:
    return M(name, tarfile.REGTYPE, data, **kw)  # type: ignore[arg-type]


def dir_(name: str, mode: int = 0o755, **kw: object) -> M:
    return M(name, tarfile.DIRTYPE, mode=mode, **kw)  # type: ignore[arg-type]


def symlink(name: str, target: str, **kw: object) -> M:
    return M(name, tarfile.SYMTYPE, mode=0o777, linkname=target, **kw)  # type: ignore[arg-type]


def hardlink(name: str, target: str, **kw: object) -> M:
    return M(name, tarfile.LNKTYPE, linkname=target, **kw)  # type: ignore[arg-type]


def tar_bytes(members: Iterable[M], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt, encoding="utf-8",
                      errors="surrogateescape") as archive:
        for m in members:
            info = tarfile.TarInfo(m.name)
            info.type = m.kind
            info.mode = m.mode
            info.uid, info.gid = m.uid, m.gid
            info.mtime = m.mtime
            info.linkname = m.linkname
            info.devmajor, info.devminor = m.major, m.minor
            info.pax_headers = dict(m.pax)
            info.size = len(m.data) if m.kind in (tarfile.REGTYPE, tarfile.AREGTYPE) else 0
            archive.addfile(info, io.BytesIO(m.data) if info.size else None)
    return buffer.getvalue()


def write_tar(path: Path, members: Iterable[M], fmt: int = tarfile.PAX_FORMAT) -> Path:
    path.write_bytes(tar_bytes(members, fmt))
    return path


def compress(data: bytes, method: str) -> bytes:
    """Compress with a fixed setting (gzip mtime 0) so test archives are stable."""
    import bz2
    import gzip
    import lzma

    import zstandard

    if method == "gzip":
        return gzip.compress(data, mtime=0)
    if method == "xz":
        return lzma.compress(data)
    if method == "bzip2":
        return bz2.compress(data)
    if method == "zstd":
        return zstandard.ZstdCompressor().compress(data)
    assert method == "none"
    return data
