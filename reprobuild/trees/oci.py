"""Read an OCI image layout (a directory with ``oci-layout``, ``index.json`` and blobs).

Which image: ``index.json`` lists manifests (nested indexes are followed). With one
manifest it is taken; with several, the one whose platform is ``platform`` (default
linux/amd64) is taken, and none matching is an error listing what there is.

How layers are applied, in manifest order, as the OCI image spec's changeset rules say:
a member ``DIR/.wh.NAME`` deletes ``DIR/NAME`` of the lower layers; ``DIR/.wh..wh..opq``
hides everything the lower layers put under ``DIR``; any other member replaces what lower
layers had at its path (a directory over a directory only updates its metadata). A path
given twice in one layer is refused. Hardlinks may name files of lower layers; replacing
one path of a hardlink group later leaves the other paths with the old bytes.
A member under a symlink is refused (we do not follow links while merging).

The root directory: the metadata of ``./`` from the last layer that carries it; when no
layer does, root:root, mode 0555 and the newest mtime in the merged tree after whiteouts
(composefs's rule). Every blob's sha256 is checked against its descriptor before it is
parsed; layers may be plain, gzip or zstd tar (detected by magic, media type checked).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any

from reprobuild.errors import ImageError
from reprobuild.trees.builder import TreeBuilder
from reprobuild.trees.load import DEFAULT_PLATFORM as DEFAULT_PLATFORM
from reprobuild.trees.load import is_oci_layout as is_oci_layout
from reprobuild.trees.tar_reader import Spool, iter_members
from reprobuild.trees.tree import Entry, EntryType, Tree

WHITEOUT_PREFIX = b".wh."
OPAQUE_MARKER = b".wh..wh..opq"

INDEX_TYPES = ("application/vnd.oci.image.index.v1+json",
               "application/vnd.docker.distribution.manifest.list.v2+json")
MANIFEST_TYPES = ("application/vnd.oci.image.manifest.v1+json",
                  "application/vnd.docker.distribution.manifest.v2+json")
LAYER_TYPES = (
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.diff.tar",
)


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    platform: tuple[str, str] | None = None

    @staticmethod
    def parse(value: Any, what: str) -> Descriptor:
        if not isinstance(value, dict):
            raise ImageError(f"{what}: a descriptor must be a JSON object")
        digest, size = value.get("digest"), value.get("size")
        if not isinstance(digest, str) or not digest.startswith("sha256:") or \
                len(digest) != 71 or any(c not in "0123456789abcdef" for c in digest[7:]):
            raise ImageError(f"{what}: bad or unsupported digest {digest!r}",
                             hint="only sha256 digests are supported")
        if not isinstance(size, int) or size < 0:
            raise ImageError(f"{what}: bad size {size!r}")
        platform = value.get("platform")
        plat = None
        if isinstance(platform, dict):
            plat = (str(platform.get("os", "")), str(platform.get("architecture", "")))
        return Descriptor(str(value.get("mediaType", "")), digest, size, plat)


class OciLayout:
    """An image layout directory whose blobs are checked against their descriptors."""

    def __init__(self, path: bytes | str) -> None:
        self.path = os.fsencode(path)
        self.what = self.path.decode("utf-8", "backslashreplace")
        if not is_oci_layout(self.path):
            raise ImageError(f"{self.what} is not an OCI image layout",
                             hint="expected a directory with oci-layout and index.json")

    def blob_path(self, descriptor: Descriptor) -> bytes:
        return self.path + b"/blobs/sha256/" + descriptor.digest[7:].encode()

    def verify(self, descriptor: Descriptor) -> bytes:
        """Check a blob's size and sha256; return its path."""
        path = self.blob_path(descriptor)
        hasher = hashlib.sha256()
        size = 0
        try:
            with open(path, "rb") as blob:
                while chunk := blob.read(1 << 20):
                    hasher.update(chunk)
                    size += len(chunk)
        except FileNotFoundError:
            raise ImageError(f"{self.what}: blob {descriptor.digest} is missing") from None
        actual = "sha256:" + hasher.hexdigest()
        if actual != descriptor.digest:
            raise ImageError(
                f"{self.what}: blob {descriptor.digest} has digest {actual}",
                hint="the image layout is corrupt or was modified")
        if size != descriptor.size:
            raise ImageError(f"{self.what}: blob {descriptor.digest} is {size} bytes, its"
                             f" descriptor says {descriptor.size}")
        return path

    def json_blob(self, descriptor: Descriptor) -> Any:
        with open(self.verify(descriptor), "rb") as blob:
            return _load_json(blob.read(), f"{self.what}: blob {descriptor.digest}")

    def manifest(self, platform: tuple[str, str] = DEFAULT_PLATFORM) -> dict[str, Any]:
        """The image manifest to use (see the module docstring for the choice)."""
        with open(self.path + b"/index.json", "rb") as f:
            index = _load_json(f.read(), f"{self.what}/index.json")
        candidates = self._manifests(index, f"{self.what}/index.json", depth=0)
        if not candidates:
            raise ImageError(f"{self.what}: index.json lists no image manifest")
        if len(candidates) > 1:
            matching = [d for d in candidates if d.platform == platform]
            if not matching:
                found = ", ".join("/".join(d.platform) if d.platform else "unknown"
                                  for d in candidates)
                raise ImageError(f"{self.what}: no manifest for {'/'.join(platform)}",
                                 hint=f"platforms in the index: {found}")
            candidates = matching[:1]
        manifest = self.json_blob(candidates[0])
        if not isinstance(manifest, dict) or not isinstance(manifest.get("layers"), list):
            raise ImageError(f"{self.what}: manifest {candidates[0].digest} has no layers list")
        return manifest

    def _manifests(self, index: Any, what: str, depth: int) -> list[Descriptor]:
        if depth > 4 or not isinstance(index, dict) or \
                not isinstance(index.get("manifests"), list):
            raise ImageError(f"{what}: not an image index (no manifests list)")
        found: list[Descriptor] = []
        for n, item in enumerate(index["manifests"]):
            descriptor = Descriptor.parse(item, f"{what}: manifests[{n}]")
            if descriptor.media_type in INDEX_TYPES:
                found += self._manifests(self.json_blob(descriptor),
                                         f"{self.what}: index {descriptor.digest}", depth + 1)
            elif descriptor.media_type in MANIFEST_TYPES:
                found.append(descriptor)
        return found

    def layers(self, platform: tuple[str, str] = DEFAULT_PLATFORM) -> list[Descriptor]:
        manifest = self.manifest(platform)
        layers = [Descriptor.parse(item, f"{self.what}: layers[{n}]")
                  for n, item in enumerate(manifest["layers"])]
        for layer in layers:
            if layer.media_type not in LAYER_TYPES:
                raise ImageError(f"{self.what}: layer {layer.digest} has unsupported media"
                                 f" type {layer.media_type!r}",
                                 hint="layers must be tar, tar+gzip or tar+zstd")
        return layers


def _load_json(data: bytes, what: str) -> Any:
    try:
        return json.loads(data)
    except ValueError as exc:
        raise ImageError(f"{what}: not valid JSON ({exc})") from None


def apply_layer(builder: TreeBuilder, layer: bytes, what: str, spool: Spool | None) -> bool:
    """Apply one layer tar onto ``builder``; True when the layer carried the root ``./``."""
    listed: set[bytes] = set()  # members of this layer (a path may appear once)
    this_layer: set[bytes] = {b""}  # and the directories that hold them
    opaque: list[bytes] = []
    carried_root = False
    for member in iter_members(layer, what=what, spool=spool):
        path = member.entry.path
        name = path.rsplit(b"/", 1)[-1]
        parent = path.rsplit(b"/", 1)[0] if b"/" in path else b""
        if path in listed:
            raise ImageError(f"{what}: duplicate member {member.name!r}",
                             hint="each path may appear only once in a layer")
        if name == OPAQUE_MARKER:
            if builder.exists(parent) and not builder.is_dir(parent):
                raise ImageError(f"{what}: opaque marker {member.name!r} is not in a directory")
            opaque.append(parent)
            continue
        if name.startswith(WHITEOUT_PREFIX):
            hidden = (parent + b"/" if parent else b"") + name[len(WHITEOUT_PREFIX):]
            if hidden not in this_layer:
                builder.remove(hidden)
            elif builder.is_dir(hidden):
                # This layer put things under it: only the lower layers' content goes.
                builder.clear_directory(hidden, this_layer)
            continue
        listed.add(path)
        this_layer.add(path)
        if path == b"":
            carried_root = True
        if member.link_target is not None:
            builder.link(path, member.link_target, member.name, replace_existing=True)
        else:
            builder.put(member.entry, member.name)
        # A directory of this layer hides nothing of itself: record its implied parents.
        while b"/" in path:
            path = path.rsplit(b"/", 1)[0]
            this_layer.add(path)
    for directory in opaque:
        if not builder.exists(directory):
            continue
        builder.clear_directory(directory, this_layer)
    return carried_root


def tree_from_oci(path: bytes | str, *, platform: tuple[str, str] = DEFAULT_PLATFORM,
                  implied_mtime_ns: int = 0, spool: Spool | None = None) -> Tree:
    """The merged root filesystem of an OCI image layout (not normalised)."""
    layout = OciLayout(path)
    builder = TreeBuilder(what=layout.what, implied_mtime_ns=implied_mtime_ns)
    root_from_layer = False
    for layer in layout.layers(platform):
        blob = layout.verify(layer)
        root_from_layer |= apply_layer(builder, blob, f"{layout.what}: layer {layer.digest}",
                                       spool)
    if root_from_layer:
        return builder.build()
    return builder.build(root=Entry(b"", EntryType.DIRECTORY, 0o555,
                                    mtime_ns=builder.newest_mtime_ns()))
