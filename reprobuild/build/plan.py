"""From a recipe to a build graph: one :class:`Node` (with its derivation) per thing to build.

Planning reads path sources and host programs to hash them (their content is part of
the ids of everything that uses them) but builds and copies nothing. Each Debian source
becomes two nodes: ``NAME#fetch`` (the .deb, fixed-output: its id depends only on the
sha256) and ``NAME`` (the unpacked tree). An OCI layout source is a path source whose
directory must be an image layout; its layers are merged only by the images built from it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from reprobuild import __version__
from reprobuild.build.derivation import Derivation
from reprobuild.build.fetch import UNPACK_VERSION
from reprobuild.build.inputs import HostClosure, check_path_source, host_closure, path_hash
from reprobuild.build.recipe import (
    DebSource,
    HostSource,
    Image,
    OciSource,
    PathSource,
    Recipe,
    Step,
)
from reprobuild.errors import RecipeError
from reprobuild.images.registry import ImageOptions, get_format
from reprobuild.trees.oci import is_oci_layout

SANDBOX_ABI = "1"
"""What a step sees (mount points, $out, /build); part of every step's id."""

INPUTS_DIR = "/inputs"
OUTPUT_DIR = "/output"
OUT = "/output/out"


@dataclass(frozen=True)
class Node:
    """One thing to build: its recipe name, derivation, dependencies and what it is."""

    key: str  # recipe name, or NAME#fetch for the .deb of a Debian source
    derivation: Derivation
    deps: tuple[str, ...]
    what: DebSource | PathSource | OciSource | HostSource | Step | Image
    closure: HostClosure | None = field(default=None, compare=False)
    display: str = ""
    # A disk image's output is a directory: the file in it whose fs-verity digest the
    # store records (the format module's ``main_file``), e.g. "disk.img".
    main_file: str | None = None

    @property
    def id(self) -> str:
        return self.derivation.id

    @property
    def sandboxed(self) -> bool:
        return self.derivation.kind in ("step", "image")


@dataclass
class Plan:
    """The nodes needed for some targets, dependencies first."""

    recipe: Recipe
    targets: list[str]
    nodes: dict[str, Node]

    def order(self) -> list[Node]:
        return list(self.nodes.values())


def image_options(image: Image, epoch: int) -> ImageOptions:
    return ImageOptions(epoch=epoch, size=image.size, uuid=image.uuid, label=image.label,
                        compress=image.compress, block_size=image.block_size,
                        extra=image.extra)


def _options_json(options: ImageOptions) -> dict[str, Any]:
    return {"size": options.size, "uuid": options.uuid, "label": options.label,
            "compress": options.compress, "block_size": options.block_size,
            "extra": {k: v for k, v in options.extra}}


def plan(recipe: Recipe, targets: list[str] | None = None, *, store: str | None = None
         ) -> Plan:
    """The build graph for ``targets`` (default: the recipe's default targets).

    With ``store`` (the store's directory), a path source that contains the store is
    refused before it is read: importing it would copy the store into itself."""
    wanted = list(targets) if targets else recipe.default_targets()
    nodes: dict[str, Node] = {}
    for name in recipe.closure(wanted):
        if name in recipe.sources:
            for node in _source_nodes(recipe, recipe.sources[name], store):
                nodes[node.key] = node
        elif name in recipe.steps:
            nodes[name] = _step_node(recipe, recipe.steps[name], nodes)
        else:
            nodes[name] = _image_node(recipe, recipe.images[name], nodes)
    return Plan(recipe, wanted, nodes)


def _source_nodes(recipe: Recipe, source: DebSource | PathSource | OciSource | HostSource,
                  store: str | None) -> list[Node]:
    if isinstance(source, DebSource):
        fetch = Derivation("fetch-deb", {"sha256": source.sha256},
                           name=f"{source.package}_{source.version}.deb")
        unpack = Derivation("deb", {"unpacker": UNPACK_VERSION}, {"deb": fetch.id},
                            name=source.name)
        label = f"{source.package}={source.version}"
        return [Node(f"{source.name}#fetch", fetch, (), source, display=f"fetch {label}"),
                Node(source.name, unpack, (f"{source.name}#fetch",), source,
                     display=f"unpack {label}")]
    if isinstance(source, PathSource):
        _check_path_source(recipe, source, store)
        content = path_hash(source.path)
        if source.blake3 is not None and source.blake3 != content:
            raise RecipeError(f"{recipe.path}: [sources.{source.name}] blake3: "
                              f"{source.path} hashes to "
                              f"{content}, the recipe pins {source.blake3}",
                              hint="update the pin if the change is intended")
        drv = Derivation("path", {"hash": content}, name=source.name)
        what = "OCI image layout " if isinstance(source, OciSource) else ""
        return [Node(source.name, drv, (), source, display=f"import {what}{source.name}")]
    closure = host_closure(source.path)
    drv = Derivation("host", {"program": source.path, "hash": closure.hash}, name=source.name)
    return [Node(source.name, drv, (), source, closure, display=f"import {source.path}")]


def _check_path_source(recipe: Recipe, source: PathSource, store: str | None) -> None:
    """Refuse a path source that does not exist or that holds the store (first: nothing
    is read), one outside the recipe's directory or with private files (see
    :func:`~reprobuild.build.inputs.check_path_source`), and a directory that is not an
    image layout for ``oci =``, before anything is imported (an OCI layout's
    blobs are checked against their digests when an image merges the layers)."""
    key = "oci" if isinstance(source, OciSource) else "path"
    where = f"{recipe.path}: [sources.{source.name}] {key}"
    if not os.path.exists(source.path):
        raise RecipeError(f"{where}: {source.path} does not exist",
                          hint="paths are relative to the recipe's directory "
                               f"({recipe.directory})")
    if store is not None:
        real_source, real_store = os.path.realpath(source.path), os.path.realpath(store)
        if real_store == real_source or real_store.startswith(real_source.rstrip("/") + "/"):
            raise RecipeError(f"{where}: {source.path} contains the store {store}: importing "
                              "it would copy the store into itself",
                              hint="point the source at a directory that does not hold the "
                                   "store, or use a store elsewhere (--store DIR)")
    check_path_source(source.path, f"{recipe.path}: [sources.{source.name}]", key,
                      base=source.base, allow_outside=source.allow_outside,
                      allow_private=source.allow_private)
    if isinstance(source, OciSource):
        _check_oci_layout(where, source)


def _check_oci_layout(where: str, source: OciSource) -> None:
    if not is_oci_layout(source.path):
        raise RecipeError(f"{where}: {source.path} is not an OCI image "
                          "layout (a directory with oci-layout and index.json)",
                          hint="point oci = at an image layout (e.g. made by `skopeo copy "
                               "... oci:DIR`), or use path = for plain files")


def _step_node(recipe: Recipe, step: Step, nodes: Mapping[str, Node]) -> Node:
    drv = Derivation("step", {
        "builder": list(step.builder),
        "env": dict(step.env),
        "epoch": recipe.epoch,
        "sandbox": SANDBOX_ABI,
    }, {name: nodes[name].id for name in step.inputs}, name=step.name)
    return Node(step.name, drv, step.inputs, step, display=f"build {step.name}")


def _image_node(recipe: Recipe, image: Image, nodes: Mapping[str, Node]) -> Node:
    fmt = get_format(image.format)
    try:
        module = fmt.load()
    except ImportError as exc:
        raise RecipeError(f"{recipe.path}: [images.{image.name}] format: the {image.format} "
                          f"writer is not available ({exc})") from None
    options = image_options(image, recipe.epoch)
    attrs: dict[str, Any] = {
        "format": image.format,
        "kind": image.kind,
        "options": _options_json(options),
        "files": dict(image.files),
        "epoch": recipe.epoch,
        "reprobuild": __version__,
        "writer": {"version": module.VERSION, "identity": dict(module.identity(options))},
        "sandbox": SANDBOX_ABI,
    }
    if image.kind == "disk":
        attrs["table"] = dict(image.table)
    drv = Derivation("image", attrs, {name: nodes[name].id for name in image.inputs},
                     name=image.name)
    main_file = fmt.load_disk().main_file(image.table) if fmt.kind == "disk" else None
    main_file = getattr(module, "MAIN_FILE", main_file)  # a tree image with a second output
    return Node(image.name, drv, image.inputs, image,
                display=f"write {image.format} image {image.name}", main_file=main_file)
