"""Build one image from a job description: load the tree, apply overrides, call the writer.

This is what a built-in image step does inside its sandbox (see :mod:`reprobuild.builtin`).
Tree formats read their ``from`` input with :func:`reprobuild.source.load_tree` (a
directory, a tar or an OCI layout), apply the recipe's ``files`` overrides and call the
format module's ``write``; disk formats get the paths of their inputs and the image's
table and write the output themselves.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from reprobuild.errors import ImageError
from reprobuild.images.registry import ImageOptions, OptionValue, get_format
from reprobuild.tree import Tree


def options_from_json(epoch: int, options: Mapping[str, Any]) -> ImageOptions:
    extra: dict[str, OptionValue] = dict(options.get("extra") or {})
    return ImageOptions(epoch=epoch, size=options.get("size"), uuid=options.get("uuid"),
                        label=options.get("label"), compress=options.get("compress"),
                        block_size=options.get("block_size"),
                        extra=tuple(sorted(extra.items())))


def load_source_tree(path: str, *, epoch: int) -> Tree:
    """The normalised tree of a step output (directory, tar file or OCI layout)."""
    try:
        from reprobuild.source import load_tree
    except ImportError:  # the tree-source module is optional: directories still work
        from reprobuild.tree import tree_from_directory

        if not os.path.isdir(path):
            raise ImageError(f"{path}: only directories can be image sources here") from None
        return tree_from_directory(path, epoch=epoch).normalized(epoch=epoch)
    return load_tree(path, epoch=epoch)


def build_image(job: Mapping[str, Any]) -> None:
    """Write the image ``job`` describes to ``job["output"]``."""
    fmt = get_format(job["format"])
    module = fmt.load()
    epoch = int(job["epoch"])
    options = options_from_json(epoch, job.get("options") or {})
    output = job["output"]
    if fmt.kind == "disk":
        module.build(dict(job["inputs"]), dict(job["table"]), options, output)
        return
    tree = load_source_tree(job["from"], epoch=epoch)
    files = job.get("files") or {}
    if files:
        from reprobuild.overrides import apply_overrides

        tree = apply_overrides(tree, files, where=f"[images.{job['name']}.files]",
                               epoch=epoch)
    with open(output, "wb") as f:
        module.write(tree, f, options)
