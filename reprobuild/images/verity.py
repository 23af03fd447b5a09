"""The ``verity`` disk format: the dm-verity hash tree of another image.

Implements :class:`reprobuild.images.protocol.DiskFormat` (its options schema is in the
registry). Recipe shape::

    [images.root-verity]
    from = "root"                 # an image (a file) whose size is whole data blocks
    format = "verity"
    hash-algorithm = "sha256"     # optional: sha1, sha256 (default), sha512
    data-block-size = 4096        # optional (default 4096, or block_size)
    hash-block-size = 4096        # optional (default 4096, or block_size)
    salt = "…"                    # optional hex; default derived from the data
    uuid = "…"                    # optional; default derived from the data
    append = false                # optional: true appends the tree to a copy of the data

Output: a directory with ``hash`` (superblock and hash tree, as ``veritysetup format``
writes a separate hash device) - or, with ``append = true``, ``image`` (the data, then
the superblock and tree at ``hash_offset``, the data size rounded up to the hash block
size, as ``veritysetup format IMG IMG --hash-offset=N`` writes) - ``roothash`` (the root
hash in hex and a newline) and ``verity.json`` (root hash, salt, UUID, algorithm, block
sizes, data blocks, hash offset, hash size and the blake3 of the data, by which the gpt
format checks a verity/data partition pair).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

from reprobuild.errors import ImageError
from reprobuild.images.registry import ImageOptions
from reprobuild.integrity import verity
from reprobuild.trees.tree import Content, Entry, EntryType, FileSource, Tree

VERSION = "1"
HASH_FILE = "hash"
IMAGE_FILE = "image"
ROOTHASH_FILE = "roothash"
SUMMARY_FILE = "verity.json"


def inputs_of(table: Mapping[str, object]) -> list[str]:
    source = table.get("from")
    if not isinstance(source, str):
        raise ImageError("a verity image needs `from`, the image to protect",
                         hint='from = "root"')
    return [source]


def main_file(table: Mapping[str, object]) -> str:
    """The image file: ``image`` when the tree is appended to the data, else ``hash``."""
    return IMAGE_FILE if table.get("append") is True else HASH_FILE


def identity(options: ImageOptions) -> dict[str, str]:
    return {}


def _int(table: Mapping[str, object], key: str, default: int) -> int:
    value = table.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ImageError(f"`{key}` must be an integer")
    return value


def build(inputs: dict[str, str], table: Mapping[str, object], options: ImageOptions,
          output: str) -> None:
    """Write ``output``/hash, roothash and verity.json for the image named by ``from``."""
    source = inputs_of(table)[0]
    data = inputs[source]
    if not os.path.isfile(data):
        raise ImageError(f"verity input {source!r} is not an image file",
                         hint="point `from` at an image (erofs, squashfs, ext4), not a step")
    algorithm = table.get("hash-algorithm", "sha256")
    if not isinstance(algorithm, str):
        raise ImageError("`hash-algorithm` must be a string")
    default_block = options.block_size or 4096
    salt_hex = table.get("salt")
    salt = None
    if salt_hex is not None:
        try:
            salt = bytes.fromhex(str(salt_hex))
        except ValueError:
            raise ImageError(f"`salt` {salt_hex!r} is not hex") from None
    data_block_size = _int(table, "data-block-size", default_block)
    hash_block_size = _int(table, "hash-block-size", default_block)
    size = os.path.getsize(data)
    if size % data_block_size:
        raise ImageError(f"verity input {source!r} is {size} bytes, not a multiple of the "
                         f"data block size {data_block_size}",
                         hint="make the image a whole number of blocks (or change "
                         "data-block-size)")
    verity.plan(algorithm=algorithm, data_block_size=data_block_size,
                hash_block_size=hash_block_size, data_blocks=max(size // data_block_size, 1))
    with open(data, "rb") as f:
        content_digest = verity.content_digest_of(f.fileno(), size)
    append = table.get("append", False)
    if not isinstance(append, bool):
        raise ImageError("`append` must be true or false")
    os.mkdir(output)
    if append:
        target = os.path.join(output, IMAGE_FILE)
        _copy_file(data, target, size)
        hash_offset = -(-size // hash_block_size) * hash_block_size
    else:
        target, hash_offset = os.path.join(output, HASH_FILE), 0
    result = verity.format(data, target, algorithm=algorithm,
                           data_block_size=data_block_size, hash_block_size=hash_block_size,
                           salt=salt, uuid=options.uuid, hash_offset=hash_offset,
                           data_blocks=size // data_block_size, content_digest=content_digest)
    with open(os.path.join(output, ROOTHASH_FILE), "w", encoding="ascii") as f:
        f.write(result.root_hash_hex + "\n")
    info: dict[str, object] = {**result.as_json(), "data_blake3": content_digest.hex()}
    with open(os.path.join(output, SUMMARY_FILE), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2, sort_keys=True)
        f.write("\n")


def _copy_file(source: str, target: str, size: int) -> None:
    with open(source, "rb") as src, open(target, "xb") as dst:
        copied = 0
        while copied < size:
            n = os.copy_file_range(src.fileno(), dst.fileno(), size - copied)
            if n == 0:
                raise ImageError(f"{source} shrank while being copied")
            copied += n


def read(path: str | bytes | os.PathLike[str]) -> Tree:
    """The output directory as a tree of its files."""
    root = os.fsencode(path)
    tree = Tree(Entry(b"", EntryType.DIRECTORY, 0o555))
    for name in sorted(n for n in (HASH_FILE, IMAGE_FILE, ROOTHASH_FILE, SUMMARY_FILE)
                       if os.path.exists(os.path.join(root, n.encode()))):
        file_path = os.path.join(root, name.encode())
        tree.add(Entry(name.encode(), EntryType.REGULAR, 0o444,
                       content=Content(os.path.getsize(file_path), FileSource(file_path))))
    return tree
