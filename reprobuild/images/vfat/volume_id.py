"""The derived volume id of a FAT image: blake3 of the seed, every directory and every
file byte, in the order the writer writes them.

A large tree is hashed on a second thread while the writer reads and writes the next
files: the bytes are handed over in batches of a few MiB, joined and hashed there
(both ``bytes.join`` and blake3 release the GIL on buffers that large). One thread
takes the batches in the order they were given, so the digest is the same bytes'
digest whichever way it is computed.
"""

from __future__ import annotations

import queue
import threading
from types import TracebackType

import blake3

PREFIX = b"reprobuild vfat volume id v1\0"
# Trees with at least this many file bytes are hashed on a second thread.
THREAD_BYTES = 16 << 20
BATCH = 2 << 20  # bytes handed to the hashing thread at a time
QUEUED_BATCHES = 2  # how far the writer may run ahead of the hash (memory bound)


class VolumeIdHash:
    """The running hash; a context manager that stops its thread however it is left."""

    def __init__(self, seed: bytes, *, threaded: bool) -> None:
        self._hasher = blake3.blake3(PREFIX + seed + b"\0")
        self._pending: list[bytes | memoryview] = []
        self._pending_size = 0
        self._batches: queue.Queue[list[bytes | memoryview] | None] | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        if threaded:
            self._batches = queue.Queue(QUEUED_BATCHES)
            self._thread = threading.Thread(target=self._hash_batches,
                                            name="vfat volume id", daemon=True)
            self._thread.start()

    def __enter__(self) -> VolumeIdHash:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self._stop()

    def update(self, data: bytes | memoryview) -> None:
        if self._batches is None:
            self._hasher.update(data)
            return
        self._pending.append(data)
        self._pending_size += len(data)
        if self._pending_size >= BATCH:
            self._hand_over()

    def digest(self) -> int:
        """The volume id: the first 4 bytes of the digest, little-endian."""
        if self._batches is not None:
            self._hand_over()
            self._stop()
            if self._error is not None:
                raise self._error
        return int.from_bytes(self._hasher.digest(length=4), "little")

    def _hand_over(self) -> None:
        assert self._batches is not None
        if self._pending:
            self._batches.put(self._pending)
            self._pending = []
            self._pending_size = 0

    def _stop(self) -> None:
        if self._thread is not None:
            assert self._batches is not None
            self._batches.put(None)
            self._thread.join()
            self._thread = None

    def _hash_batches(self) -> None:
        assert self._batches is not None
        while (batch := self._batches.get()) is not None:
            if self._error is None:
                try:
                    self._hasher.update(b"".join(batch))
                except BaseException as error:  # handed to the writer by digest()
                    self._error = error
