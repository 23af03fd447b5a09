"""Whole-stream compression of tar and cpio archives (``compress = "zstd" | "gzip"``).

The compressed bytes depend on the compressor library's build and version (zlib and
zlib-ng, or two libzstd releases, compress the same input differently), so
:func:`compressor_identity` names it for the derivation id: zstd comes from the
``zstandard`` wheel our dependency pins (level 9, one thread, content size unknown to
the frame header as the archive is streamed); gzip uses the host's zlib (level 6, mtime
0, no file name, OS byte 255). Without ``compress`` (or ``"none"``) archives are plain.

The compressor modules are loaded when a compressor is asked for: a plain archive costs
neither ``gzip`` nor ``zstandard`` at start-up.
"""

from __future__ import annotations

import contextlib
import importlib
import zlib
from collections.abc import Iterator
from typing import BinaryIO, cast

from reprobuild.errors import ImageError

GZIP = "gzip"
ZSTANDARD = "zstandard"

COMPRESSORS = ("none", "zstd", "gzip")
ZSTD_LEVEL = 9
GZIP_LEVEL = 6


def check_compress(compress: str | None, fmt: str) -> str:
    """The compressor to use ("none" for None); an unknown name is an ImageError."""
    name = compress or "none"
    if name not in COMPRESSORS:
        raise ImageError(f"the {fmt} format cannot be compressed with {compress!r}",
                         hint=f"use one of: {', '.join(COMPRESSORS)}")
    return name


def compressor_identity(compress: str | None) -> dict[str, str]:
    """What besides the options changes the compressed bytes: the library and version."""
    name = compress or "none"
    if name == "zstd":
        zstandard = importlib.import_module(ZSTANDARD)
        return {"compressor": f"zstandard {zstandard.__version__}, libzstd "
                              f"{zstandard.ZSTD_VERSION[0]}.{zstandard.ZSTD_VERSION[1]}."
                              f"{zstandard.ZSTD_VERSION[2]}"}
    if name == "gzip":
        return {"compressor": f"zlib {zlib.ZLIB_RUNTIME_VERSION}"}
    return {}


@contextlib.contextmanager
def compressed_writer(output: BinaryIO, compress: str) -> Iterator[BinaryIO]:
    """A writable stream whose bytes reach ``output`` compressed with ``compress``.

    ``output`` stays open; everything is flushed to it when the block ends.
    """
    if compress == "none":
        yield output
        return
    if compress == "gzip":
        gzip = importlib.import_module(GZIP)
        with gzip.GzipFile(filename="", mode="wb", fileobj=output, compresslevel=GZIP_LEVEL,
                           mtime=0) as stream:
            yield cast(BinaryIO, stream)
        return
    zstandard = importlib.import_module(ZSTANDARD)
    params = zstandard.ZstdCompressor(level=ZSTD_LEVEL, threads=0, write_checksum=True)
    with params.stream_writer(output, closefd=False, write_size=1 << 20) as writer:
        yield cast(BinaryIO, writer)
