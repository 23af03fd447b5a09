"""``file:///DIR``: a cache in a plain directory (local disk, NFS).

Writes go to a temporary file in the target directory, are fsynced and renamed into
place, so a reader sees a blob whole or not at all.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import urllib.parse
from typing import BinaryIO

from reprobuild.cache.backend import Cache, CacheError, CacheMissing, Timeouts, check_name


class FileCache(Cache):
    """A cache directory."""

    def __init__(self, url: str, root: str) -> None:
        super().__init__(url)
        self.root = root

    def _path(self, name: str) -> str:
        return os.path.join(self.root, check_name(name))

    def _error(self, action: str, name: str, exc: OSError) -> CacheError:
        return CacheError(f"cache {self.url}: cannot {action} {name}: {exc.strerror}",
                          hint="check that the directory exists and is readable/writable")

    def open_read(self, name: str) -> BinaryIO:
        try:
            return open(self._path(name), "rb")
        except FileNotFoundError:
            raise CacheMissing(f"cache {self.url} has no {name}") from None
        except OSError as exc:
            raise self._error("read", name, exc) from None

    def _write(self, name: str, fill: object) -> None:
        path = self._path(name)
        directory = os.path.dirname(path)
        try:
            os.makedirs(directory, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
        except OSError as exc:
            raise self._error("write", name, exc) from None
        try:
            with os.fdopen(fd, "wb") as out:
                if isinstance(fill, bytes):
                    out.write(fill)
                else:
                    with open(str(fill), "rb") as source:
                        shutil.copyfileobj(source, out, 1 << 20)
                out.flush()
                os.fsync(out.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise self._error("write", name, exc) from None
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def write_file(self, name: str, path: str) -> None:
        self._write(name, path)

    def write_bytes(self, name: str, data: bytes) -> None:
        self._write(name, data)

    def exists(self, name: str) -> bool:
        return os.path.isfile(self._path(name))

    def list(self, directory: str) -> list[str]:
        path = self._path(directory)
        try:
            names = os.listdir(path)  # nondet-ok: sorted below
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise self._error("list", directory, exc) from None
        return sorted(n for n in names if not n.startswith("."))


def open_url(url: str, timeouts: Timeouts) -> Cache:
    parts = urllib.parse.urlsplit(url)
    if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
        raise CacheError(f"cache URL {url!r}: a file cache is file:///ABSOLUTE/DIR")
    return FileCache(url, urllib.parse.unquote(parts.path))
