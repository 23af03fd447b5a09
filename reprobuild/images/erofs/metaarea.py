"""The metadata area of an EROFS image while it is written, a block at a time.

The area (superblock, inodes with their xattrs and tail-packed file tails, shared xattrs)
is as large as the tails it holds: 11 MB for a Debian minbase tree. Rather than holding
all of it, :class:`MetaArea` keeps one buffer per block still open and writes a block
out (``pwrite``, beside the data area the writer streams) once the last inode placed in
it - known from the plan - has been written. Block 0 (the superblock) and the blocks of
compressed inodes, filled in after all data, stay until :meth:`MetaArea.finish`. An
output without a file descriptor (an in-memory file) keeps every block until then; the
bytes are the same either way. When the area must be hashed (the UUID derived from the
content) written blocks are read back through a read-only descriptor of the same file
(``/proc/self/fd``); where that cannot be opened, every block stays in memory.
"""

from __future__ import annotations

import io
import os
from typing import BinaryIO

import blake3

from reprobuild.images.erofs.layout import Layout
from reprobuild.images.erofs.ondisk import BLOCK_SIZE


class MetaArea:
    """Blocks of the metadata area, written out as soon as they are complete."""

    def __init__(self, output: BinaryIO, layout: Layout, *, read_back: bool) -> None:
        self.output = output
        self.count = layout.data_blkaddr  # blocks in the area
        self.blocks: dict[int, bytearray] = {}
        self.fd: int | None = None
        self.read_fd: int | None = None
        try:
            self.fd = output.fileno()
            if read_back:
                self.read_fd = os.open(f"/proc/self/fd/{self.fd}", os.O_RDONLY | os.O_CLOEXEC)
        except (OSError, AttributeError, io.UnsupportedOperation):
            self.fd = None
        # For each inode index, the blocks it is the last to write into.
        self.closes: dict[int, list[int]] = {}
        if self.fd is not None:
            for block, index in enumerate(layout.meta_last_inode):
                if 0 <= index < len(layout.inodes):
                    self.closes.setdefault(index, []).append(block)

    def block(self, number: int) -> bytearray:
        buffer = self.blocks.get(number)
        if buffer is None:
            buffer = self.blocks[number] = bytearray(BLOCK_SIZE)
        return buffer

    def put(self, at: int, data: bytes) -> None:
        """Place ``data`` at byte ``at`` of the image (inside the area)."""
        number, offset = divmod(at, BLOCK_SIZE)
        end = offset + len(data)
        if end <= BLOCK_SIZE:
            buffer = self.blocks.get(number)
            if buffer is None:
                buffer = self.blocks[number] = bytearray(BLOCK_SIZE)
            buffer[offset:end] = data
            return
        done = 0
        while done < len(data):
            take = min(BLOCK_SIZE - offset, len(data) - done)
            self.block(number)[offset:offset + take] = data[done:done + take]
            done += take
            number, offset = number + 1, 0

    def written(self, index: int) -> None:
        """Inode ``index`` is in place: write out the blocks it completed."""
        for number in self.closes.pop(index, ()):
            buffer = self.blocks.pop(number, None)
            if buffer is not None:
                assert self.fd is not None
                os.pwrite(self.fd, buffer, number * BLOCK_SIZE)

    def hash_into(self, hasher: blake3.blake3) -> None:
        """Feed the whole area, block 0 to the end, to ``hasher`` (blocks already written
        are read back; blocks never used are zeros)."""
        zeros = bytes(BLOCK_SIZE)
        for number in range(self.count):
            buffer = self.blocks.get(number)
            if buffer is not None:
                hasher.update(buffer)
            elif self.fd is None:
                hasher.update(zeros)
            else:
                assert self.read_fd is not None
                stored = os.pread(self.read_fd, BLOCK_SIZE, number * BLOCK_SIZE)
                hasher.update(stored + zeros[len(stored):])

    def close(self) -> None:
        if self.read_fd is not None:
            os.close(self.read_fd)
            self.read_fd = None

    def finish(self) -> None:
        """Write every block still held; the output's position is left unchanged."""
        if self.fd is not None:
            for number, buffer in sorted(self.blocks.items()):
                os.pwrite(self.fd, buffer, number * BLOCK_SIZE)
            self.blocks.clear()
            return
        position = self.output.tell()
        zeros = bytes(BLOCK_SIZE)
        self.output.seek(0)
        self.output.write(b"".join(self.blocks.get(n, zeros) for n in range(self.count)))
        self.output.seek(position)
