"""Write composefs images: the EROFS metadata image libcomposefs's ``mkcomposefs`` writes
(version 1.0.8, byte for byte), whose files over 64 bytes live in a digest store.

A file of 1 to 64 bytes is inline; a larger one is an inode without data carrying
``trusted.overlay.metacopy`` (its content's fs-verity sha256 digest) and
``trusted.overlay.redirect`` (``/xx/rest``, its path in the digest store, see
:mod:`reprobuild.images.composefs.store`). overlayfs, given the image as its lower
layer and the store as a data-only layer (``mount.composefs -o basedir=STORE``), serves
the files. The composefs digest is the image's fs-verity sha256 digest
(:func:`composefs_digest`), which ``mkcomposefs --print-digest-only`` prints.

Hardlinks of the tree are hardlinks in the image (as ``mkcomposefs --from-file`` writes
them; ``mkcomposefs DIR`` makes each path its own inode). Times, owners and xattrs are
the tree's: the pipeline has already clamped them to the epoch.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Iterator
from typing import BinaryIO

from reprobuild.errors import ImageError
from reprobuild.images.composefs import digests
from reprobuild.images.composefs import early as early_digests
from reprobuild.images.composefs.early import EarlyDigests
from reprobuild.images.composefs.layout import Draft, Layout, finish, plan, prepare
from reprobuild.images.composefs.write import write_image
from reprobuild.images.registry import ImageOptions
from reprobuild.integrity.fsverity import digest_file
from reprobuild.trees.gcpause import collector_paused
from reprobuild.trees.tree import Tree

__all__ = ["MAIN_FILE", "STORE_DIR", "VERSION", "composefs_digest", "content_digests",
           "identity", "layout_of", "read", "while_loading", "write", "write_with_store"]

VERSION = "1"
"""The writer's code version: bump it whenever the bytes for a given tree change."""

MAIN_FILE = "image.cfs"
STORE_DIR = "objects"
"""A recipe's composefs image step writes a directory: the image as MAIN_FILE (the store
records its fs-verity digest, the composefs digest) and its digest store as STORE_DIR,
so ``mount.composefs -o basedir=OUT/objects OUT/image.cfs`` mounts it."""

READER = "reprobuild.images.composefs.read"
STORE = "reprobuild.images.composefs.store"  # tempfile and shutil: only for a store
"""The reader (with the EROFS reader under it), loaded only to read an image back."""

PREPARE_COST = 8 << 10
"""What preparing the plan costs per tree entry, in the bytes-hashed units of the shares
(measured on a root filesystem): this process's share of the hashing is lighter by it."""

LCFS_VERSION = "1.0.8"
"""The libcomposefs release whose mkcomposefs output this writer reproduces."""


def identity(options: ImageOptions) -> dict[str, str]:
    return {"libcomposefs": LCFS_VERSION}


def _check_options(options: ImageOptions) -> None:
    for key, value in (("size", options.size), ("uuid", options.uuid),
                       ("label", options.label), ("compress", options.compress)):
        if value is not None:
            raise ImageError(f"composefs images take no {key}",
                             hint="mkcomposefs writes a zero UUID, no label, no "
                                  "compression and the smallest size: drop the option")
    if options.block_size not in (None, 4096):
        raise ImageError(f"composefs block size {options.block_size} is not 4096",
                         hint="composefs images always use 4096-byte blocks")


def content_digests(tree: Tree) -> dict[bytes, bytes]:
    """Path -> content digest of every regular file stored by reference."""
    return digests.content_digests(tree)


def layout_of(tree: Tree, digests: dict[bytes, bytes] | None = None) -> Layout:
    """The planned image of ``tree`` (digests computed when not given)."""
    known = content_digests(tree) if digests is None else digests
    return plan(tree, lambda entry: known[entry.path])


@contextlib.contextmanager
def while_loading() -> Iterator[EarlyDigests]:
    """Hashing started while the tree loads: give the block's :class:`EarlyDigests`
    ``found`` method to the loader and the object to :func:`write` (``early``). The
    image is the same with or without it; a child still hashing when the block ends
    is ended."""
    with early_digests.while_loading() as early:
        yield early


def write(tree: Tree, output: BinaryIO, options: ImageOptions, *,
          early: EarlyDigests | None = None) -> None:
    """Write the composefs image of ``tree``; the digest store is written separately
    (:func:`reprobuild.images.composefs.store.fill_store`). ``early``: the files
    hashed as the tree loaded (:func:`while_loading`)."""
    _check_options(options)
    with collector_paused():  # the plan's objects all live until the image is written
        draft, known = _draft_and_digests(tree, early)
        write_image(finish(draft, lambda entry: known[entry.path]), output)


def write_with_store(tree: Tree, output: BinaryIO, options: ImageOptions, *,
                     digest_store: str, early: EarlyDigests | None = None) -> None:
    """Write the image of ``tree`` and put the files it stores by reference into the
    digest store at ``digest_store`` (each file hashed once for both)."""
    _check_options(options)
    store = importlib.import_module(STORE)
    with collector_paused():
        draft, known = _draft_and_digests(tree, early)
        store.fill_store(tree, digest_store, known)
        write_image(finish(draft, lambda entry: known[entry.path]), output)


def _draft_and_digests(tree: Tree,
                       early: EarlyDigests | None) -> tuple[Draft, dict[bytes, bytes]]:
    """The plan's part that needs no digest, made while child processes hash the
    files; then this process's share of the hashing."""
    head_start = PREPARE_COST * len(tree)
    hashing = digests.hashing if early is None else early.hashing
    with hashing(digests.stored_by_reference(tree), head_start=head_start) as known:
        draft = prepare(tree)
        return draft, known()


def read(path: str | bytes | os.PathLike[str]) -> Tree:
    """The tree a composefs image was made from, file bytes from the digest store
    ``objects/`` beside it (a recipe output's layout); see
    :func:`reprobuild.images.composefs.read.read_composefs` to name another store."""
    tree: Tree = importlib.import_module(READER).read_composefs(path)
    return tree


def composefs_digest(image_path: str | bytes | os.PathLike[str]) -> str:
    """The composefs digest of a composefs image: its fs-verity sha256 digest (4 KiB
    blocks, no salt), as lowercase hex; what ``mkcomposefs --print-digest-only`` prints."""
    return digest_file(image_path, algorithm="sha256", block_size=4096, salt=b"").hex()
