"""Build one image from a job description: load the tree, apply overrides, call the writer.

This is what a built-in image step does inside its sandbox (see :mod:`reprobuild.build.builtin`).
Tree formats read their ``from`` input with :func:`reprobuild.trees.load.load_tree` (a
directory, a tar or an OCI layout), apply the recipe's ``files`` overrides and call the
format module's ``write``; disk formats get the paths of their inputs and the image's
table and write the output themselves.

The job's ``scratch`` names a writable directory on disk (the sandbox's ``/build``):
members of compressed tars and OCI layers are spooled there, not into ``$TMPDIR``, which
in the sandbox is a tmpfs in memory. The spool is removed once the image is written.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from typing import Any

from reprobuild.errors import ImageError, disk_full
from reprobuild.images.registry import ImageOptions, OptionValue, get_format
from reprobuild.trees.load import load_tree
from reprobuild.trees.tar_reader import Spool


def options_from_json(epoch: int, options: Mapping[str, Any]) -> ImageOptions:
    extra: dict[str, OptionValue] = dict(options.get("extra") or {})
    return ImageOptions(epoch=epoch, size=options.get("size"), uuid=options.get("uuid"),
                        label=options.get("label"), compress=options.get("compress"),
                        block_size=options.get("block_size"),
                        extra=tuple(sorted(extra.items())))


@contextlib.contextmanager
def scratch_spool(scratch: str | None) -> Iterator[Spool | None]:
    """A spool in a fresh directory under ``scratch``, removed afterwards (None: the
    process-wide default spool under ``$TMPDIR``)."""
    if scratch is None:
        yield None
        return
    try:
        directory = tempfile.mkdtemp(prefix="spool-", dir=scratch)
    except OSError as exc:
        raise ImageError(f"cannot make a spool directory in {scratch}: {exc.strerror}") from None
    try:
        yield Spool(directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def build_image(job: Mapping[str, Any]) -> None:
    """Write the image ``job`` describes to ``job["output"]``; a full disk is named."""
    try:
        _build_image(job)
    except OSError as exc:
        full = disk_full(exc, job["output"], f"the {job['format']} image {job.get('name')}")
        if full is None:
            raise
        raise full from None


def _build_image(job: Mapping[str, Any]) -> None:
    fmt = get_format(job["format"])
    module = fmt.load()
    epoch = int(job["epoch"])
    options = options_from_json(epoch, job.get("options") or {})
    output = job["output"]
    if fmt.kind == "disk":
        module.build(dict(job["inputs"]), dict(job["table"]), options, output)
        return
    with scratch_spool(job.get("scratch")) as spool:
        tree = load_tree(job["from"], epoch=epoch, spool=spool)
        files = job.get("files") or {}
        if files:
            from reprobuild.trees.overrides import apply_overrides

            tree = apply_overrides(tree, files, where=f"[images.{job['name']}.files]",
                                   epoch=epoch)
        with open(output, "wb") as f:
            module.write(tree, f, options)
