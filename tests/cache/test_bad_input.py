"""A cache can never make a client register bytes that do not match signed metadata.

Each case asserts the exact outcome: a SubstituteError naming the cache and the
derivation, saying what was wrong, and a store with nothing registered and nothing left
in tmp/.
"""

from __future__ import annotations

import base64
import io
import json
import os
import tarfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import blake3
import pytest
import zstandard

from reprobuild.cache import layout
from reprobuild.cache.backend import Cache, Timeouts, open_cache
from reprobuild.cache.substitute import SubstituteError, substitute
from reprobuild.cache.upload import upload
from reprobuild.proof import signing
from reprobuild.store.store import Store
from tests.cache import servers
from tests.cache.conftest import Built, Keys


@pytest.fixture()
def cache(built: Built, keys: Keys, tmp_path: Path) -> Cache:
    opened = open_cache(f"file://{tmp_path}/cache")
    report = upload(built.store, opened, sorted(built.ids.values()), keys.private)
    assert not report.failures
    return opened


@pytest.fixture()
def empty(tmp_path: Path) -> Store:
    return Store(str(tmp_path / "store-b"))


def cache_dir(cache: Cache) -> Path:
    return Path(cache.url[len("file://"):])


def assert_refused(store: Store, cache: Cache, derivation_id: str, keys: Keys,
                   reason: str) -> SubstituteError:
    with pytest.raises(SubstituteError) as caught:
        substitute(store, cache, derivation_id, keys.trusted)
    message = caught.value.message
    assert message.startswith(f"cache {cache.url}: cannot substitute ")
    assert derivation_id in message
    assert reason in message, message
    assert store.lookup(derivation_id) is None
    assert os.listdir(os.path.join(store.root, "meta")) == []
    assert os.listdir(os.path.join(store.root, "out")) == []
    assert os.listdir(os.path.join(store.root, "tmp")) == []
    return caught.value


def read_entry(cache: Cache, derivation_id: str) -> layout.CacheEntry:
    data = (cache_dir(cache) / layout.meta_name(derivation_id)).read_bytes()
    return layout.parse_entry(signing.parse_envelope(data).payload)


def write_meta(cache: Cache, derivation_id: str, data: bytes) -> None:
    (cache_dir(cache) / layout.meta_name(derivation_id)).write_bytes(data)


def test_untrusted_key(built: Built, cache: Cache, empty: Store, keys: Keys,
                       tmp_path: Path) -> None:
    other = signing.load_private_key(signing.generate_key(tmp_path / "other.key")[0])
    tree = built.ids["tree"]
    write_meta(cache, tree, layout.sign_entry(read_entry(cache, tree), other))
    assert_refused(empty, cache, tree, keys, "signed by no trusted key (signed by "
                   f"{signing.key_id(other.public_key())[:16]})")


def test_no_signature(built: Built, cache: Cache, empty: Store, keys: Keys) -> None:
    tree = built.ids["tree"]
    doc = json.loads((cache_dir(cache) / layout.meta_name(tree)).read_bytes())
    doc["signatures"] = []
    write_meta(cache, tree, json.dumps(doc).encode())
    assert_refused(empty, cache, tree, keys, "metadata carries no signature")


def test_altered_metadata(built: Built, cache: Cache, empty: Store, keys: Keys) -> None:
    tree = built.ids["tree"]
    doc = json.loads((cache_dir(cache) / layout.meta_name(tree)).read_bytes())
    payload = json.loads(base64.b64decode(doc["payload"]))
    payload["hash"] = "0" * 64
    doc["payload"] = base64.b64encode(json.dumps(payload).encode()).decode()
    write_meta(cache, tree, json.dumps(doc).encode())
    assert_refused(empty, cache, tree, keys, "does not verify")


def test_swapped_object(built: Built, cache: Cache, empty: Store, keys: Keys) -> None:
    tree, image = read_entry(cache, built.ids["tree"]), read_entry(cache, built.ids["image"])
    objects = cache_dir(cache)
    (objects / layout.object_name(tree.object.blake3)).write_bytes(
        (objects / layout.object_name(image.object.blake3)).read_bytes())
    assert_refused(empty, cache, tree.derivation_id, keys, "object is truncated")
    # Same length: the hash check is what catches it.
    swapped = (objects / layout.object_name(image.object.blake3)).read_bytes()
    signed = replace(tree, object=replace(tree.object, size=len(swapped)))
    write_meta(cache, tree.derivation_id, layout.sign_entry(signed, keys.private))
    assert_refused(empty, cache, tree.derivation_id, keys,
                   f"object hashes to blake3 {blake3.blake3(swapped).hexdigest()}, the "
                   f"metadata says {tree.object.blake3}")


def test_truncated_object(built: Built, cache: Cache, empty: Store, keys: Keys) -> None:
    tree = read_entry(cache, built.ids["tree"])
    path = cache_dir(cache) / layout.object_name(tree.object.blake3)
    path.write_bytes(path.read_bytes()[:1000])
    assert_refused(empty, cache, tree.derivation_id, keys,
                   f"object is truncated: 1000 of {tree.object.size} bytes arrived")


def test_metadata_naming_another_derivation(built: Built, cache: Cache, empty: Store,
                                            keys: Keys) -> None:
    tree, image = built.ids["tree"], built.ids["image"]
    write_meta(cache, tree, (cache_dir(cache) / layout.meta_name(image)).read_bytes())
    assert_refused(empty, cache, tree, keys, f"metadata describes derivation {image}, "
                   f"not {tree}")


def test_garbage_metadata(built: Built, cache: Cache, empty: Store, keys: Keys) -> None:
    tree = built.ids["tree"]
    write_meta(cache, tree, b"\x00garbage\xff" * 10)
    assert_refused(empty, cache, tree, keys, "metadata is not a signed envelope")


def test_a_wrong_output_is_not_registered(built: Built, cache: Cache, empty: Store,
                                          keys: Keys) -> None:
    """A well-formed, correctly signed object of another output: the store's check."""
    tree, link = read_entry(cache, built.ids["tree"]), read_entry(cache, built.ids["link"])
    forged = replace(tree, object=link.object)
    write_meta(cache, tree.derivation_id, layout.sign_entry(forged, keys.private))
    assert_refused(empty, cache, tree.derivation_id, keys,
                   f"hashes to {link.hash}, expected {tree.hash}")


# -- hostile archives, signed by the trusted key (a compromised builder) ----------------
Member = Callable[[tarfile.TarFile], None]


def _add(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", linkname: str = "",
         **fields: int) -> Member:
    def add(archive: tarfile.TarFile) -> None:
        info = tarfile.TarInfo(name)
        info.type, info.size, info.linkname, info.mode = kind, len(data), linkname, 0o644
        for key, value in fields.items():
            setattr(info, key, value)
        archive.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
    return add


DIR = _add("out", tarfile.DIRTYPE)
HOSTILE: dict[str, tuple[list[Member], str]] = {
    "dotdot": ([DIR, _add("out/../../escaped", data=b"x")], "contains '..'"),
    "absolute": ([DIR, _add("/tmp/escaped", data=b"x")], "absolute member name"),
    "through-symlink": ([DIR, _add("out/up", tarfile.SYMTYPE, linkname="../../.."),
                         _add("out/up/escaped", data=b"x")],
                        "lies under /out/up, which is a symlink"),
    "device": ([DIR, _add("out/null", tarfile.CHRTYPE, devmajor=1, devminor=3)],
               "member /out/null is a char"),
    "fifo": ([DIR, _add("out/pipe", tarfile.FIFOTYPE)], "member /out/pipe is a fifo"),
    "second-top": ([DIR, _add("other", data=b"x")], "archive holds other, out"),
    "hardlink-out": ([DIR, _add("out/h", tarfile.LNKTYPE, linkname="../etc/passwd")],
                     "contains '..'"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_archive(case: str, built: Built, cache: Cache, empty: Store, keys: Keys,
                         tmp_path: Path) -> None:
    members, reason = HOSTILE[case]
    plain = io.BytesIO()
    with tarfile.open(fileobj=plain, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for add in members:
            add(archive)
    data = zstandard.ZstdCompressor().compress(plain.getvalue())
    obj = layout.ObjectInfo(blake3.blake3(data).hexdigest(), len(data), len(plain.getvalue()))
    (cache_dir(cache) / layout.object_name(obj.blake3)).write_bytes(data)
    entry = replace(read_entry(cache, built.ids["tree"]), object=obj)
    write_meta(cache, entry.derivation_id, layout.sign_entry(entry, keys.private))
    assert_refused(empty, cache, entry.derivation_id, keys, reason)
    assert not (tmp_path / "escaped").exists()
    assert not Path("/tmp/escaped").exists()


# -- servers that misbehave ------------------------------------------------------------
def test_server_answering_500(built: Built, empty: Store, keys: Keys) -> None:
    with servers.failing_server() as (url, server):
        cache = open_cache(url)
        error = assert_refused(empty, cache, built.ids["tree"], keys,
                               f"GET meta/{built.ids['tree']}.json answered HTTP 500")
        assert server.hits == 4  # type: ignore[attr-defined]  # retried 3 times
        assert error.hint is not None


def test_hanging_server_times_out(built: Built, empty: Store, keys: Keys) -> None:
    with servers.hanging_server() as url:
        cache = open_cache(url, timeouts=Timeouts(connect=1, read=0.3))
        start = time.monotonic()
        assert_refused(empty, cache, built.ids["tree"], keys, "Read timed out")
        assert time.monotonic() - start < 10


def test_server_answering_garbage(built: Built, cache: Cache, empty: Store, keys: Keys,
                                  nginx_url: str, tmp_path: Path) -> None:
    www = tmp_path / "nginx" / "www"
    (www / "meta").mkdir()
    (www / layout.meta_name(built.ids["tree"])).write_bytes(os.urandom(4096))
    assert_refused(empty, open_cache(nginx_url), built.ids["tree"], keys,
                   "metadata is not a signed envelope")


def _sign_object(cache: Cache, keys: Keys, derivation_id: str, data: bytes,
                 real_size: int) -> None:
    obj = layout.ObjectInfo(blake3.blake3(data).hexdigest(), len(data), real_size)
    (cache_dir(cache) / layout.object_name(obj.blake3)).write_bytes(data)
    entry = replace(read_entry(cache, derivation_id), object=obj)
    write_meta(cache, derivation_id, layout.sign_entry(entry, keys.private))


def test_object_unpacking_to_more_than_signed(built: Built, cache: Cache, empty: Store,
                                              keys: Keys) -> None:
    """A decompression bomb stops at the signed size."""
    data = zstandard.ZstdCompressor().compress(bytes(64 << 20))
    _sign_object(cache, keys, built.ids["tree"], data, 10240)
    assert_refused(empty, cache, built.ids["tree"], keys,
                   "object cannot be unpacked: it unpacks to more than the signed 10240 bytes")


def test_signed_object_that_is_not_zstd(built: Built, cache: Cache, empty: Store,
                                        keys: Keys) -> None:
    _sign_object(cache, keys, built.ids["tree"], b"not zstd at all" * 100, 10240)
    assert_refused(empty, cache, built.ids["tree"], keys, "object cannot be unpacked: zstd")


@pytest.mark.parametrize(("change", "reason"), [
    ({"fsverity_file": "../../../etc/passwd"}, "metadata fs-verity fields are malformed"),
    ({"epoch": 1 << 60}, f"metadata epoch {1 << 60} is out of range"),
    ({"type": "fifo"}, "metadata hash, object hash or type is malformed"),
])
def test_signed_metadata_with_hostile_fields(change: dict[str, object], reason: str,
                                             built: Built, cache: Cache, empty: Store,
                                             keys: Keys) -> None:
    """Even a trusted key's metadata cannot point the store outside the output."""
    tree = built.ids["tree"]
    doc = read_entry(cache, tree).document()
    doc.update(change)
    payload = json.dumps(doc).encode()
    signature = keys.private.sign(signing.pae(layout.PAYLOAD_TYPE, payload))
    write_meta(cache, tree, json.dumps({
        "payload": base64.b64encode(payload).decode(), "payloadType": layout.PAYLOAD_TYPE,
        "signatures": [{"keyid": signing.key_id(keys.private.public_key()),
                        "sig": base64.b64encode(signature).decode()}]}).encode())
    assert_refused(empty, cache, tree, keys, reason)


def test_sparse_member_claiming_more_than_the_archive(built: Built, cache: Cache,
                                                      empty: Store, keys: Keys) -> None:
    """A GNU sparse member can claim a huge size with few bytes: refused before writing."""
    plain = io.BytesIO()
    with tarfile.open(fileobj=plain, mode="w", format=tarfile.PAX_FORMAT) as archive:
        DIR(archive)
        info = tarfile.TarInfo("out/huge")
        info.size = 512
        info.pax_headers = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0",
                            "GNU.sparse.name": "out/huge",
                            "GNU.sparse.realsize": str(1 << 40)}
        archive.addfile(info, io.BytesIO(b"1\n0\n512\n".ljust(512, b"\0")))
    data = zstandard.ZstdCompressor().compress(plain.getvalue())
    _sign_object(cache, keys, built.ids["tree"], data, len(plain.getvalue()))
    assert_refused(empty, cache, built.ids["tree"], keys,
                   f"member 'out/huge' is sparse (it claims {1 << 40} bytes)")
