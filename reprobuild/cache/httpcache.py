"""``http://HOST[:PORT]/PREFIX`` and ``https://…``: GET to read, PUT to write, through urllib3.

Any static server can serve a cache read-only; writing needs PUT (nginx with
``dav_methods PUT`` and ``create_full_put_path on``). Listing (for ``cache verify``) reads
nginx's JSON directory index (``autoindex on; autoindex_format json``).

One connection pool per cache, reused by every thread; connect and read timeouts on
every request; idempotent requests (GET, HEAD, PUT) are retried a few times after a
connection error or a 5xx answer, with a short backoff.
"""

from __future__ import annotations

import io
import json
import os
import urllib.parse
from typing import Any, BinaryIO, cast

import urllib3
from urllib3.exceptions import HTTPError
from urllib3.util import Retry, Timeout

from reprobuild.cache.backend import Cache, CacheError, CacheMissing, Timeouts, check_name

BLOCK = 1 << 20
POOL_SIZE = 16
RETRIES = Retry(total=3, connect=3, read=2, status=3, backoff_factor=0.2,
                status_forcelist=(429, 500, 502, 503, 504),
                allowed_methods=frozenset({"GET", "HEAD", "PUT"}),
                raise_on_status=False, respect_retry_after_header=False)


class _Body(io.RawIOBase):
    """A response body as a stream; transport failures become :class:`CacheError`."""

    def __init__(self, response: urllib3.BaseHTTPResponse, where: str) -> None:
        self._response = response
        self._where = where

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        try:
            data = self._response.read(len(view))
        except (HTTPError, OSError) as exc:
            raise CacheError(f"{self._where}: download failed: {exc}",
                             hint="the server timed out or dropped the connection") from None
        view[:len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._response.release_conn()
        super().close()


class HttpCache(Cache):
    """A cache behind an HTTP server."""

    def __init__(self, url: str, base: str, timeouts: Timeouts) -> None:
        super().__init__(url)
        self.base = base.rstrip("/") + "/"
        self.pool = urllib3.PoolManager(
            num_pools=4, maxsize=POOL_SIZE, block=False, retries=RETRIES,
            timeout=Timeout(connect=timeouts.connect, read=timeouts.read),
            blocksize=BLOCK)

    def _url(self, name: str) -> str:
        if name.endswith("/"):
            return self.base + urllib.parse.quote(check_name(name[:-1])) + "/"
        return self.base + urllib.parse.quote(check_name(name))

    def _request(self, method: str, name: str, **kwargs: Any) -> urllib3.BaseHTTPResponse:
        url = self._url(name)
        try:
            return self.pool.request(method, url, decode_content=False, **kwargs)
        except (HTTPError, OSError) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise CacheError(f"cache {self.url}: {method} {name} failed: {reason}",
                             hint="check that the server is running and reachable") from None

    def _status_error(self, method: str, name: str, response: urllib3.BaseHTTPResponse
                      ) -> CacheError:
        return CacheError(f"cache {self.url}: {method} {name} answered HTTP "
                          f"{response.status} {response.reason or ''}".rstrip(),
                          hint="the server refused or failed; see its error log")

    def open_read(self, name: str) -> BinaryIO:
        response = self._request("GET", name, preload_content=False)
        if response.status == 404:
            response.release_conn()
            raise CacheMissing(f"cache {self.url} has no {name}")
        if response.status != 200:
            response.drain_conn()
            response.release_conn()
            raise self._status_error("GET", name, response)
        return cast(BinaryIO, io.BufferedReader(_Body(response, self.where(name)), BLOCK))

    def _put(self, name: str, body: Any, size: int) -> None:
        response = self._request("PUT", name, body=body,
                                 headers={"Content-Length": str(size),
                                          "Content-Type": "application/octet-stream"})
        if response.status not in (200, 201, 204):
            raise self._status_error("PUT", name, response)

    def write_file(self, name: str, path: str) -> None:
        with open(path, "rb") as body:
            self._put(name, body, os.fstat(body.fileno()).st_size)

    def write_bytes(self, name: str, data: bytes) -> None:
        self._put(name, data, len(data))

    def exists(self, name: str) -> bool:
        response = self._request("HEAD", name)
        if response.status == 404:
            return False
        if response.status != 200:
            raise self._status_error("HEAD", name, response)
        return True

    def list(self, directory: str) -> list[str]:
        response = self._request("GET", directory + "/", headers={"Accept": "application/json"})
        if response.status == 404:
            return []
        if response.status != 200:
            raise self._status_error("GET", directory + "/", response)
        try:
            listing = json.loads(response.data)
            names = [str(item["name"]) for item in listing if item.get("type") == "file"]
        except (ValueError, TypeError, KeyError, AttributeError):
            raise CacheError(f"cache {self.url}: the server does not list {directory}/ as "
                             "JSON", hint="for nginx: autoindex on; autoindex_format json;"
                             ) from None
        return sorted(n for n in names if not n.startswith("."))

    def close(self) -> None:
        self.pool.clear()


def open_url(url: str, timeouts: Timeouts) -> Cache:
    parts = urllib.parse.urlsplit(url)
    if not parts.hostname or parts.query or parts.fragment:
        raise CacheError(f"cache URL {url!r}: expected http(s)://HOST[:PORT]/PREFIX")
    base = urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))
    return HttpCache(url, base, timeouts)
