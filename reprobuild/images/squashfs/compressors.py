"""The squashfs compressors: gzip (zlib), xz (liblzma), lz4, zstd, and none.

Each compressor knows its squashfs id, the compressor-options block it writes (only when
its settings differ from what the kernel and unsquashfs assume, except lz4 which always
has one), how to compress one block from any thread, how to decompress one, and its
library's name and version (they change the bytes - mksquashfs -comp zstd differs
between libzstd 1.5.4 and 1.5.7 - so they enter the derivation id).

``compress`` is called from worker threads: zlib, liblzma, lz4 and libzstd release the
GIL while they work, so blocks compress in parallel. Stateful compressor objects are kept
per thread.
"""

from __future__ import annotations

import _lzma
import ctypes
import ctypes.util
import functools
import importlib.util
import lzma
import struct
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType

import lz4
import lz4.block
import zstandard

from reprobuild import native
from reprobuild.errors import ImageError
from reprobuild.images.squashfs.ondisk import (
    LZ4_COMPRESSION,
    SQUASHFS_COMPRESSED_BIT_BLOCK,
    XZ_COMPRESSION,
    ZLIB_COMPRESSION,
    ZSTD_COMPRESSION,
)

NAMES = ("zstd", "gzip", "xz", "lz4", "none")
DEFAULT = "zstd"
# Default levels are mksquashfs's, so images compare like for like with it.
DEFAULT_LEVELS = {"zstd": 15, "gzip": 9}
LEVEL_RANGES = {"zstd": (1, 22), "gzip": (1, 9)}

# Compressor options (format.adoc "Compression Options").
GZIP_OPTIONS = struct.Struct("<IHH")  # compression_level, window_size, strategies
ZSTD_OPTIONS = struct.Struct("<I")  # compression_level
LZ4_OPTIONS = struct.Struct("<II")  # version (1 = legacy), flags (1 = high compression)
PROBE_SAMPLE = 16384


@dataclass(frozen=True)
class Compressor:
    """One configured compressor; ``compress`` is safe to call from many threads."""

    name: str
    squashfs_id: int
    level: int | None
    block_size: int
    options: bytes | None  # the compressor-options block's payload, when one is written
    probe: bool = True  # skip blocks that zstd level 1 cannot shrink at all
    _local: threading.local = field(default_factory=threading.local, compare=False,
                                    repr=False)

    @property
    def compresses(self) -> bool:
        return self.name != "none"

    def incompressible(self, data: bytes) -> bool:
        """True when a fast zstd pass cannot shrink ``data`` by a single byte.

        Such blocks (already-compressed or random data) are stored uncompressed without
        running the slow configured compressor, which would gain next to nothing on them.
        The probe is libzstd from the pinned zstandard wheel, so it is a deterministic
        function of the block; it is part of ``library_identity``.
        """
        if not self.probe or self.name in ("none", "lz4"):
            return False
        probe = getattr(self._local, "probe", None)
        if probe is None:
            probe = zstandard.ZstdCompressor(level=1, write_content_size=True)
            self._local.probe = probe
        # A compressible block is nearly always compressible in its first 16 KiB: test
        # that first, so the probe costs little where it does not help.
        if len(data) > PROBE_SAMPLE and len(probe.compress(data[:PROBE_SAMPLE])) < PROBE_SAMPLE:
            return False
        return len(probe.compress(data)) >= len(data)

    def store(self, raw: bytes) -> tuple[bytes, int]:
        """A data or fragment block as stored, and its size field (bit 24: uncompressed).

        Compressed when the probe lets it and the compressed form is smaller. gzip goes
        through the compiled _blockpack when it is built: the same probe and deflate
        in one call without the GIL, with the same bytes.
        """
        if self.name == "gzip" and len(raw) <= DEFLATE_MAX_INPUT:
            blockpack = _blockpack()
            if blockpack is not None:
                return blockpack.compress_gzip(raw, self.level or 9, self.probe)  # type: ignore[no-any-return]
        if self.compresses and not self.incompressible(raw):
            packed = self.compress(raw)
            if len(packed) < len(raw):
                return packed, len(packed)
        return raw, len(raw) | SQUASHFS_COMPRESSED_BIT_BLOCK

    def compress(self, data: bytes) -> bytes:
        """The compressed form of one block (the caller keeps it only if smaller)."""
        if self.name == "zstd":
            cctx = getattr(self._local, "cctx", None)
            if cctx is None:
                cctx = zstandard.ZstdCompressor(level=self.level or 15,
                                                write_content_size=True)
                self._local.cctx = cctx
            return cctx.compress(data)  # type: ignore[no-any-return]
        if self.name == "gzip":
            return deflate(data, self.level or 9)
        if self.name == "xz":
            return lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32,
                                 filters=[{"id": lzma.FILTER_LZMA2, "preset": 6,
                                           "dict_size": self.block_size}])
        if self.name == "lz4":
            return lz4.block.compress(data, mode="default", store_size=False)  # type: ignore[no-any-return]
        return data

    def decompress(self, data: bytes, limit: int) -> bytes:
        """The bytes of one compressed block, at most ``limit`` of them."""
        try:
            if self.name == "zstd":
                dctx = getattr(self._local, "dctx", None)
                if dctx is None:
                    dctx = zstandard.ZstdDecompressor()
                    self._local.dctx = dctx
                out = dctx.decompress(data, max_output_size=limit)
            elif self.name == "gzip":  # bounded: a damaged block must not inflate to GBs
                out = zlib.decompressobj().decompress(data, limit + 1)
            elif self.name == "xz":
                out = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(
                    data, max_length=limit + 1)
            elif self.name == "lz4":
                out = lz4.block.decompress(data, uncompressed_size=limit)
            else:
                out = data
        except (zlib.error, lzma.LZMAError, zstandard.ZstdError, lz4.block.LZ4BlockError) as err:
            raise ImageError(f"squashfs: a {self.name} block does not decompress: {err}",
                             hint="the image is corrupt or truncated") from None
        if len(out) > limit:
            raise ImageError(f"squashfs: a {self.name} block decompresses to {len(out)}"
                             f" bytes, more than {limit}")
        return bytes(out)


class _ZStream(ctypes.Structure):
    """zlib's z_stream (zlib.h), for deflateInit2_, deflateReset, deflate, deflateEnd."""

    _fields_ = [("next_in", ctypes.c_void_p), ("avail_in", ctypes.c_uint),
                ("total_in", ctypes.c_ulong), ("next_out", ctypes.c_void_p),
                ("avail_out", ctypes.c_uint), ("total_out", ctypes.c_ulong),
                ("msg", ctypes.c_char_p), ("state", ctypes.c_void_p),
                ("zalloc", ctypes.c_void_p), ("zfree", ctypes.c_void_p),
                ("opaque", ctypes.c_void_p), ("data_type", ctypes.c_int),
                ("adler", ctypes.c_ulong), ("reserved", ctypes.c_ulong)]


Z_OK, Z_STREAM_END, Z_FINISH, Z_DEFLATED = 0, 1, 4, 8
DEFLATE_MAX_INPUT = 1 << 20  # squashfs's largest block; a kept stream's output fits it


class _Libz:
    """zlib through ctypes: deflate calls that run without the GIL.

    Python's own zlib functions either hold the GIL (zlib.compress on 3.11) or give it
    back and take it again for every 32 KiB of output, which under load makes the
    compression threads queue for it. Each thread keeps one deflate stream per level and
    resets it for every block, as mksquashfs does: a new stream per block (compress2)
    allocates and clears about 270 KB each time. The settings are zlib.compress's (15-bit
    window, memLevel 8, default strategy), so the bytes are too, from the same shared
    library the interpreter's zlib module uses.
    """

    def __init__(self) -> None:
        lib = ctypes.CDLL(ctypes.util.find_library("z") or "libz.so.1")
        stream = ctypes.POINTER(_ZStream)
        self.init2 = lib.deflateInit2_
        self.init2.argtypes = [stream, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                               ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        self.init2.restype = ctypes.c_int
        self.reset = lib.deflateReset
        self.deflate = lib.deflate
        self.end = lib.deflateEnd
        for function in (self.reset, self.deflate, self.end):
            function.restype = ctypes.c_int
        self.reset.argtypes = self.end.argtypes = [stream]
        self.deflate.argtypes = [stream, ctypes.c_int]
        self.bound = lib.compressBound
        self.bound.argtypes = [ctypes.c_ulong]
        self.bound.restype = ctypes.c_ulong
        lib.zlibVersion.restype = ctypes.c_char_p
        self.version_bytes: bytes = lib.zlibVersion()
        self.version = self.version_bytes.decode()
        self.local = threading.local()


class _Deflater:
    """One thread's deflate stream at one level, and its output buffer."""

    def __init__(self, libz: _Libz, level: int) -> None:
        self.libz = libz
        self.level = level
        self.stream = _ZStream()
        self.pointer = ctypes.pointer(self.stream)
        self.end = libz.end  # kept: __del__ may run while the interpreter shuts down
        self.live = False
        status = libz.init2(self.pointer, level, Z_DEFLATED, 15, 8, 0,
                            libz.version_bytes, ctypes.sizeof(_ZStream))
        if status != Z_OK:
            raise ImageError(f"squashfs: zlib deflateInit2 failed with status {status}")
        self.live = True
        self.capacity = libz.bound(DEFLATE_MAX_INPUT)
        self.output = ctypes.create_string_buffer(self.capacity)
        self.address = ctypes.addressof(self.output)

    def __del__(self) -> None:  # the thread ended: free zlib's state
        if self.live:
            self.live = False
            self.end(self.pointer)

    def deflate(self, data: bytes) -> bytes:
        stream = self.stream
        libz = self.libz
        libz.reset(self.pointer)
        source = ctypes.c_char_p(data)  # the bytes' own buffer, not a copy
        stream.next_in = ctypes.cast(source, ctypes.c_void_p)
        stream.avail_in = len(data)
        stream.next_out = self.address
        stream.avail_out = self.capacity
        status = libz.deflate(self.pointer, Z_FINISH)
        if status != Z_STREAM_END:
            raise ImageError(f"squashfs: zlib deflate failed with status {status}")
        return ctypes.string_at(self.address, self.capacity - stream.avail_out)


@functools.cache
def _libz() -> _Libz | None:
    """libz through ctypes, loaded on first use (finding it runs ldconfig)."""
    try:
        libz = _Libz()
    except (OSError, AttributeError):
        return None
    # Only when it is the very library (and version) the zlib module reports.
    return libz if libz.version == zlib.ZLIB_RUNTIME_VERSION else None


def deflate(data: bytes, level: int) -> bytes:
    """``zlib.compress(data, level)``, computed without holding the GIL when possible:
    by _blockpack when it is built, else through ctypes."""
    if len(data) <= DEFLATE_MAX_INPUT:
        blockpack = _blockpack()
        if blockpack is not None:
            return blockpack.deflate(data, level)  # type: ignore[no-any-return]
        libz = _libz()
        if libz is not None:
            deflater: _Deflater | None = getattr(libz.local, "deflater", None)
            if deflater is None or deflater.level != level:
                deflater = libz.local.deflater = _Deflater(libz, level)
            return deflater.deflate(data)
    stream = zlib.compressobj(level)
    return stream.compress(data) + stream.flush()


@functools.cache
def _blockpack() -> ModuleType | None:
    """The compiled gzip block path, bound to the probe's libzstd; None to use Python.

    Only when it is linked with the libz the zlib module runs (the ctypes path's
    condition) and libzstd is the pinned zstandard wheel's own copy, whose version the
    probe's identity names: the copy in its cffi module exports the functions, the
    C backend does not. Both copies are built from the wheel's one libzstd source.
    """
    module = native.load("reprobuild.images.squashfs._blockpack")
    if module is None or module.zlib_version() != zlib.ZLIB_RUNTIME_VERSION:
        return None
    spec = importlib.util.find_spec("zstandard._cffi")
    if spec is None or spec.origin is None:
        return None
    try:
        version = module.bind_probe(spec.origin)
    except OSError:
        return None
    major, minor, patch = zstandard.ZSTD_VERSION[:3]
    return module if version == major * 10000 + minor * 100 + patch else None


def make_compressor(name: str, block_size: int, level: int | None = None, *,
                    probe: bool = True) -> Compressor:
    """The compressor ``name`` for blocks of ``block_size``; ``level`` where it applies."""
    if name not in NAMES:
        raise ImageError(f"squashfs: unknown compressor {name!r}",
                         hint=f"use one of: {', '.join(NAMES)}")
    if level is not None and name not in LEVEL_RANGES:
        raise ImageError(f"squashfs: compressor {name} takes no compression level",
                         hint="only zstd (1-22) and gzip (1-9) take a level")
    if level is not None:
        low, high = LEVEL_RANGES[name]
        if not low <= level <= high:
            raise ImageError(f"squashfs: {name} compression level {level} is out of range",
                             hint=f"use {low} to {high}")
    default = DEFAULT_LEVELS.get(name)
    level = level if level is not None else default
    options: bytes | None = None
    if name == "zstd":
        squashfs_id = ZSTD_COMPRESSION
        if level != default:
            options = ZSTD_OPTIONS.pack(level)
    elif name == "gzip":
        squashfs_id = ZLIB_COMPRESSION
        if level != default:
            options = GZIP_OPTIONS.pack(level, 15, 0)
    elif name == "xz":
        squashfs_id = XZ_COMPRESSION  # dictionary = block size, no BCJ: the defaults
    elif name == "lz4":
        squashfs_id = LZ4_COMPRESSION
        options = LZ4_OPTIONS.pack(1, 0)  # squashfs-tools requires lz4 options
    else:
        squashfs_id = ZLIB_COMPRESSION  # "none": every table and block flagged uncompressed
    return Compressor(name, squashfs_id, level, block_size, options, probe)


def compressor_from_superblock(squashfs_id: int, block_size: int) -> Compressor:
    """The compressor an existing image names (for the reader)."""
    names = {ZLIB_COMPRESSION: "gzip", XZ_COMPRESSION: "xz", LZ4_COMPRESSION: "lz4",
             ZSTD_COMPRESSION: "zstd"}
    if squashfs_id not in names:
        raise ImageError(f"squashfs: compressor id {squashfs_id} is not supported",
                         hint="supported: gzip, xz, lz4, zstd")
    return Compressor(names[squashfs_id], squashfs_id, None, block_size, None)


def _liblzma_version() -> str:
    try:
        lib = ctypes.CDLL(_lzma.__file__)
        version_string: Callable[[], bytes] = lib.lzma_version_string
        version_string.restype = ctypes.c_char_p  # type: ignore[attr-defined]
        return version_string().decode()
    except (OSError, AttributeError):
        return "unknown"


def library_identity(name: str, level: int | None, *, probe: bool = True) -> dict[str, str]:
    """The compressor, its level and its library's version, for the derivation id."""
    if name == "none":
        return {"compressor": "none"}
    if name == "zstd":
        library = "libzstd " + ".".join(str(p) for p in zstandard.ZSTD_VERSION)
    elif name == "gzip":
        library = "zlib " + zlib.ZLIB_RUNTIME_VERSION
    elif name == "xz":
        library = "liblzma " + _liblzma_version()
    else:
        library = "lz4 " + str(lz4.library_version_string())
    level = level if level is not None else DEFAULT_LEVELS.get(name)
    identity = {"compressor": name, "library": library}
    if level is not None:
        identity["level"] = str(level)
    if probe and name in ("zstd", "gzip", "xz"):
        identity["probe"] = "libzstd " + ".".join(str(p) for p in zstandard.ZSTD_VERSION)
    return identity
