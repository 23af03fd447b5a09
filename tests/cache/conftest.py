"""Fixtures for cache tests: a signing key, a store with built entries, real servers."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from reprobuild.build.derivation import Derivation
from reprobuild.proof import records, signing
from reprobuild.store.store import Store
from tests.cache import servers
from tests.conftest import need, need_tool

EPOCH = 1_700_000_000


@dataclass(frozen=True)
class Keys:
    private: Ed25519PrivateKey
    private_path: Path
    public_path: Path
    trusted: dict[str, Ed25519PublicKey]


@pytest.fixture()
def keys(tmp_path: Path) -> Keys:
    (tmp_path / "keys").mkdir()
    private, public = signing.generate_key(tmp_path / "keys" / "builder.key")
    key = signing.load_private_key(private)
    return Keys(key, private, public, {signing.key_id(key.public_key()): key.public_key()})


@dataclass(frozen=True)
class Built:
    """A store holding three entries: a directory output, a file output using it, a link."""

    store: Store
    ids: dict[str, str]  # name -> derivation id


def register(store: Store, derivation: Derivation, make: object, *,
             inputs: dict[str, dict[str, str]] | None = None) -> str:
    build_dir = store.new_build_dir("test")
    output = os.path.join(build_dir, "out")
    make(output)  # type: ignore[operator]
    with store.lock(derivation.id):
        store.register(derivation.id, output, derivation=derivation.to_json(),
                       inputs=inputs or {}, epoch=EPOCH, record=records.entry_record)
    with open(store.log_path(derivation.id), "w") as log:
        log.write(f"building {derivation.name}\n")
    shutil.rmtree(build_dir)
    return derivation.id


def _tree(output: str, salt: bytes = b"") -> None:
    os.makedirs(os.path.join(output, "usr", "bin"))
    with open(os.path.join(output, "usr", "bin", "tool"), "wb") as f:
        f.write(b"#!/bin/sh\necho tool\n" + salt)
    os.chmod(os.path.join(output, "usr", "bin", "tool"), 0o755)
    with open(os.path.join(output, "data"), "wb") as f:
        f.write(os.urandom(3 << 20))
    os.link(os.path.join(output, "data"), os.path.join(output, "data-again"))
    os.symlink("/usr/bin/tool", os.path.join(output, "absolute"))  # noqa: PTH211
    os.symlink("usr/bin", os.path.join(output, "bin"))  # noqa: PTH211
    os.mkdir(os.path.join(output, "empty"))


def _file(output: str) -> None:
    with open(output, "wb") as f:
        f.write(b"an image\n" * 5000)


def _link(output: str) -> None:
    os.symlink("../somewhere/else", output)  # noqa: PTH211


def make_built(root: Path, *, salt: bytes = b"") -> Built:
    """``salt`` changes the tree's bytes, not its derivation (an unreproducible build)."""
    store = Store(str(root))
    tree = Derivation("step", {"epoch": EPOCH, "builder": ["tree"]}, {}, "tree")
    ids = {"tree": register(store, tree, lambda out: _tree(out, salt))}
    tree_hash = store.lookup(ids["tree"]).hash  # type: ignore[union-attr]
    image = Derivation("image", {"epoch": EPOCH, "format": "raw"}, {"tree": ids["tree"]},
                       "image")
    ids["image"] = register(store, image, _file,
                            inputs={"tree": {"derivation": ids["tree"], "hash": tree_hash}})
    link = Derivation("step", {"epoch": EPOCH, "builder": ["link"]}, {}, "link")
    ids["link"] = register(store, link, _link)
    return Built(store, ids)


@pytest.fixture()
def built(tmp_path: Path) -> Built:
    return make_built(tmp_path / "store-a")


@pytest.fixture()
def nginx_url(tmp_path: Path) -> Iterator[str]:
    need_tool("nginx")
    with servers.nginx(tmp_path / "nginx") as (url, _www):
        yield url


@pytest.fixture()
def s3_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    need(servers.S3RVER.exists(), "s3rver is not installed (run scripts/setup.sh --test)")
    need_tool("node")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "S3RVER")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "S3RVER")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    with servers.s3rver(tmp_path / "s3", "cache") as endpoint:
        yield f"s3://cache/some/prefix?endpoint={endpoint}"
