"""``s3://BUCKET[/PREFIX][?endpoint=URL&region=NAME]``: a cache in an S3 bucket, via boto3.

Credentials come from boto3's usual places (``AWS_ACCESS_KEY_ID`` and
``AWS_SECRET_ACCESS_KEY``, ``~/.aws``, …), never from the URL. ``endpoint`` points at an
S3-compatible server (path-style addressing). Checksums are sent and checked only where
the protocol requires them, which every S3-compatible server accepts; our own blake3
check of every object is what matters.
"""

from __future__ import annotations

import urllib.parse
from typing import Any, BinaryIO, cast

import boto3
import botocore.config
import botocore.exceptions

from reprobuild.cache.backend import Cache, CacheError, CacheMissing, Timeouts, check_name

_FAILURES = (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError, OSError)
_MISSING = ("404", "NoSuchKey", "NotFound")


class _Body:
    """A StreamingBody whose transport failures become :class:`CacheError`."""

    def __init__(self, body: Any, where: str) -> None:
        self._body = body
        self._where = where

    def read(self, size: int = -1) -> bytes:
        try:
            data: bytes = self._body.read(None if size < 0 else size)
        except _FAILURES as exc:
            raise CacheError(f"{self._where}: download failed: {exc}") from None
        return data

    def close(self) -> None:
        self._body.close()

    def __enter__(self) -> _Body:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class S3Cache(Cache):
    """A cache under a prefix of an S3 bucket."""

    def __init__(self, url: str, bucket: str, prefix: str, *, endpoint: str | None,
                 region: str | None, timeouts: Timeouts) -> None:
        super().__init__(url)
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        config = botocore.config.Config(
            connect_timeout=timeouts.connect, read_timeout=timeouts.read,
            retries={"max_attempts": 4, "mode": "standard"},
            s3={"addressing_style": "path"}, max_pool_connections=16,
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required")
        try:
            self.client = boto3.session.Session().client(
                "s3", endpoint_url=endpoint, region_name=region or "us-east-1", config=config)
        except _FAILURES as exc:
            raise CacheError(f"cache {url}: cannot set up S3: {exc}") from None

    def _key(self, name: str) -> str:
        return self.prefix + check_name(name)

    def _error(self, action: str, name: str, exc: Exception) -> CacheError:
        return CacheError(f"cache {self.url}: {action} {name} failed: {exc}",
                          hint="check the endpoint, the bucket and the credentials")

    @staticmethod
    def _missing(exc: Exception) -> bool:
        if not isinstance(exc, botocore.exceptions.ClientError):
            return False
        return str(exc.response.get("Error", {}).get("Code")) in _MISSING

    def open_read(self, name: str) -> BinaryIO:
        try:
            answer = self.client.get_object(Bucket=self.bucket, Key=self._key(name))
        except _FAILURES as exc:
            if self._missing(exc):
                raise CacheMissing(f"cache {self.url} has no {name}") from None
            raise self._error("GET", name, exc) from None
        return cast(BinaryIO, _Body(answer["Body"], self.where(name)))

    def write_file(self, name: str, path: str) -> None:
        try:
            self.client.upload_file(path, self.bucket, self._key(name))
        except (*_FAILURES, boto3.exceptions.S3UploadFailedError) as exc:
            raise self._error("PUT", name, exc) from None

    def write_bytes(self, name: str, data: bytes) -> None:
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(name), Body=data)
        except _FAILURES as exc:
            raise self._error("PUT", name, exc) from None

    def exists(self, name: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(name))
        except _FAILURES as exc:
            if self._missing(exc):
                return False
            raise self._error("HEAD", name, exc) from None
        return True

    def list(self, directory: str) -> list[str]:
        prefix = self._key(directory) + "/"
        names: list[str] = []
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=prefix, Delimiter="/")
            for page in pages:
                names.extend(str(item["Key"])[len(prefix):] for item in page.get("Contents", []))
        except _FAILURES as exc:
            raise self._error("LIST", directory + "/", exc) from None
        return sorted(n for n in names if n and not n.startswith("."))

    def close(self) -> None:
        self.client.close()


def open_url(url: str, timeouts: Timeouts) -> Cache:
    parts = urllib.parse.urlsplit(url)
    if not parts.netloc:
        raise CacheError(f"cache URL {url!r}: expected s3://BUCKET[/PREFIX]")
    query = urllib.parse.parse_qs(parts.query)
    unknown = sorted(set(query) - {"endpoint", "region"})
    if unknown:
        raise CacheError(f"cache URL {url!r}: unknown parameter {unknown[0]!r}",
                         hint="s3 cache URLs take ?endpoint=URL&region=NAME")
    return S3Cache(url, parts.netloc, urllib.parse.unquote(parts.path),
                   endpoint=query.get("endpoint", [None])[0],
                   region=query.get("region", [None])[0], timeouts=timeouts)
