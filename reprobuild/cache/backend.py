"""One interface to a cache, whatever holds it: a directory, an HTTP server or S3.

A backend stores named blobs (``objects/…``, ``meta/…``, ``cache-info``); names are
relative, made by :mod:`reprobuild.cache.layout`, never taken from a server. Every
failure is a :class:`CacheError` naming the cache; a missing blob is not a failure
(``open_read`` raises :class:`CacheMissing`, ``read_bytes`` returns None).

Backends are chosen by URL scheme from an explicit table of lazy imports, so boto3 is
loaded only for ``s3://`` caches.
"""

from __future__ import annotations

import abc
import importlib
import re
import urllib.parse
from dataclasses import dataclass
from typing import BinaryIO

from reprobuild.errors import ReprobuildError

BACKENDS: dict[str, str] = {
    "file": "reprobuild.cache.filecache",
    "http": "reprobuild.cache.httpcache",
    "https": "reprobuild.cache.httpcache",
    "s3": "reprobuild.cache.s3cache",
}

_NAME = re.compile(r"^[a-z0-9-]+(/[A-Za-z0-9][A-Za-z0-9._-]*)*$")


class CacheError(ReprobuildError):
    """A cache cannot be reached, refused a request or holds something unusable."""


class CacheMissing(CacheError):
    """The cache does not hold the blob asked for."""


@dataclass(frozen=True)
class Timeouts:
    """Seconds to wait: for a connection, and for each read or write on it."""

    connect: float = 10.0
    read: float = 60.0


def check_name(name: str) -> str:
    """A blob name as the layout makes them: relative, no ``..``, no empty parts."""
    if not _NAME.match(name) or ".." in name:
        raise CacheError(f"bad cache blob name {name!r}")
    return name


class Cache(abc.ABC):
    """A cache at ``url``. Safe to use from several threads at once."""

    def __init__(self, url: str) -> None:
        self.url = url

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.url}>"

    @abc.abstractmethod
    def open_read(self, name: str) -> BinaryIO:
        """A stream of the blob's bytes; :class:`CacheMissing` when it is absent.

        Reading may raise :class:`CacheError` (a timeout, a dropped connection).
        """

    @abc.abstractmethod
    def write_file(self, name: str, path: str) -> None:
        """Store the file at ``path`` as ``name``, replacing it; readers see it whole."""

    @abc.abstractmethod
    def write_bytes(self, name: str, data: bytes) -> None:
        """Store ``data`` as ``name``, replacing it; readers see it whole."""

    @abc.abstractmethod
    def exists(self, name: str) -> bool:
        """Whether the cache holds ``name``."""

    @abc.abstractmethod
    def list(self, directory: str) -> list[str]:
        """The names of the blobs directly in ``directory`` (e.g. ``"objects"``), sorted."""

    def close(self) -> None:  # noqa: B027 - most backends hold nothing to release
        """Release connections (the cache is not used afterwards)."""

    def read_bytes(self, name: str, *, limit: int) -> bytes | None:
        """The whole blob (None when absent); more than ``limit`` bytes is an error."""
        try:
            stream = self.open_read(name)
        except CacheMissing:
            return None
        with stream:
            data = stream.read(limit + 1)
        if len(data) > limit:
            raise CacheError(f"cache {self.url}: {name} is larger than {limit} bytes",
                             hint="this is not a reprobuild cache, or it was tampered with")
        return data

    def where(self, name: str) -> str:
        """The blob's URL, for messages."""
        return self.url.rstrip("/") + "/" + name


def open_cache(url: str, *, timeouts: Timeouts | None = None) -> Cache:
    """The cache at ``url`` (``file://``, ``http(s)://`` or ``s3://``)."""
    scheme = urllib.parse.urlsplit(url).scheme
    module_name = BACKENDS.get(scheme)
    if module_name is None:
        raise CacheError(f"cache URL {url!r}: unknown scheme {scheme!r}",
                         hint="use file:///DIR, http://HOST/PREFIX, https://… or "
                              "s3://BUCKET/PREFIX")
    module = importlib.import_module(module_name)
    cache: Cache = module.open_url(url, timeouts or Timeouts())
    return cache
