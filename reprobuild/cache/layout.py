"""What a cache holds and how it is named: blob names, ``cache-info``, signed entries.

An entry's metadata (``meta/DERIVATION.json``) is a DSSE envelope (the keys and the
pre-authentication encoding of :mod:`reprobuild.proof.signing`) whose payload type is
our own, so a signed build record can never pass for cache metadata or the reverse.
The payload is canonical JSON::

    {"format": "reprobuild-cache-entry/1", "derivation_id": ID, "derivation": {...},
     "inputs": {NAME: {"derivation": ID, "hash": H}}, "hash": OUTPUT_BLAKE3,
     "type": "file"|"directory"|"symlink", "fsverity": HEX|null, "fsverity_file": NAME|null,
     "epoch": N, "object": {"blake3": HEX, "size": N, "real_size": N,
     "compression": "zstd", "level": N}, "record": IN_TOTO_STATEMENT|null, "log": BOOL}
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from reprobuild.build.derivation import derivation_from_json
from reprobuild.cache.backend import Cache, CacheError
from reprobuild.errors import ReprobuildError
from reprobuild.proof import signing
from reprobuild.proof.records import canonical_json

CACHE_FORMAT = "reprobuild-cache/1"
ENTRY_FORMAT = "reprobuild-cache-entry/1"
PAYLOAD_TYPE = "application/vnd.reprobuild.cache-entry+json"
DEFAULT_PRIORITY = 50
CACHE_INFO = "cache-info"
METADATA_LIMIT = 16 << 20
"""Metadata, records and cache-info larger than this are refused unread."""

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$")  # a main file: no "/"
MAX_EPOCH = 1 << 33
_KINDS = ("file", "directory", "symlink")


def object_name(object_hash: str) -> str:
    return f"objects/{object_hash}.tar.zst"


def meta_name(derivation_id: str) -> str:
    return f"meta/{derivation_id}.json"


def log_name(derivation_id: str) -> str:
    return f"logs/{derivation_id}.log"


def record_name(derivation_id: str) -> str:
    return f"records/{derivation_id}.json"


def is_hex64(value: object) -> bool:
    return isinstance(value, str) and bool(_HEX64.match(value))


# -- cache-info --------------------------------------------------------------------------
@dataclass(frozen=True)
class CacheInfo:
    """A cache's format version and its priority (lower is asked first, as in Nix)."""

    priority: int = DEFAULT_PRIORITY
    format: str = CACHE_FORMAT


def cache_info_bytes(info: CacheInfo) -> bytes:
    return canonical_json({"format": info.format, "priority": info.priority})


def read_cache_info(cache: Cache) -> CacheInfo | None:
    """The cache's ``cache-info`` (None when the cache has none yet)."""
    data = cache.read_bytes(CACHE_INFO, limit=METADATA_LIMIT)
    if data is None:
        return None
    try:
        doc = json.loads(data)
        fmt, priority = doc["format"], doc["priority"]
    except (ValueError, TypeError, KeyError):
        raise CacheError(f"cache {cache.url}: {CACHE_INFO} is not reprobuild cache info",
                         hint="is this URL a reprobuild cache?") from None
    if fmt != CACHE_FORMAT:
        raise CacheError(f"cache {cache.url}: format {fmt!r}, this reprobuild reads "
                         f"{CACHE_FORMAT!r}", hint="use a reprobuild that knows this format")
    if not isinstance(priority, int) or isinstance(priority, bool):
        raise CacheError(f"cache {cache.url}: {CACHE_INFO} priority is not an integer")
    return CacheInfo(priority, fmt)


# -- entries -----------------------------------------------------------------------------
@dataclass(frozen=True)
class ObjectInfo:
    """The archive of an output: blake3 and size of the compressed bytes, tar size."""

    blake3: str
    size: int
    real_size: int
    compression: str = "zstd"
    level: int = 0


@dataclass(frozen=True)
class CacheEntry:
    """What a cache says about one derivation's output (the signed payload)."""

    derivation_id: str
    derivation: Mapping[str, Any]
    inputs: Mapping[str, Mapping[str, str]]
    hash: str
    type: str
    fsverity: str | None
    fsverity_file: str | None
    epoch: int
    object: ObjectInfo
    record: Mapping[str, Any] | None = None
    log: bool = False

    @property
    def name(self) -> str:
        return str(self.derivation.get("name") or self.derivation_id[:12])

    def document(self) -> dict[str, Any]:
        return {
            "format": ENTRY_FORMAT, "derivation_id": self.derivation_id,
            "derivation": dict(self.derivation),
            "inputs": {k: dict(v) for k, v in sorted(self.inputs.items())},
            "hash": self.hash, "type": self.type, "fsverity": self.fsverity,
            "fsverity_file": self.fsverity_file, "epoch": self.epoch,
            "object": {"blake3": self.object.blake3, "size": self.object.size,
                       "real_size": self.object.real_size,
                       "compression": self.object.compression, "level": self.object.level},
            "record": None if self.record is None else dict(self.record),
            "log": self.log,
        }


def sign_entry(entry: CacheEntry, key: Ed25519PrivateKey) -> bytes:
    """The DSSE envelope of ``entry``'s canonical JSON, signed by ``key``."""
    payload = canonical_json(entry.document())
    signature = key.sign(signing.pae(PAYLOAD_TYPE, payload))
    return canonical_json({
        "payload": base64.b64encode(payload).decode(),
        "payloadType": PAYLOAD_TYPE,
        "signatures": [{"keyid": signing.key_id(key.public_key()),
                        "sig": base64.b64encode(signature).decode()}],
    })


@dataclass(frozen=True)
class VerifiedEntry:
    entry: CacheEntry
    signer: str  # key id


class BadEntry(ReprobuildError):
    """Cache metadata that is unsigned, signed by no trusted key, or malformed."""


def verify_entry(data: bytes, keys: Mapping[str, Ed25519PublicKey], *,
                 derivation_id: str) -> VerifiedEntry:
    """Check the envelope's signature with ``keys`` and the payload's every field.

    Raises :class:`BadEntry` saying what is wrong (no signature, untrusted or bad
    signature, malformed, about another derivation).
    """
    try:
        envelope = signing.parse_envelope(data, what="metadata")
    except ReprobuildError as exc:
        raise BadEntry(f"metadata is not a signed envelope ({exc.message})") from None
    if envelope.payload_type != PAYLOAD_TYPE:
        raise BadEntry(f"metadata has payload type {envelope.payload_type!r}, "
                       f"expected {PAYLOAD_TYPE}")
    if not envelope.signatures:
        raise BadEntry("metadata carries no signature")
    signer = _trusted_signer(envelope, keys)
    entry = parse_entry(envelope.payload)
    if entry.derivation_id != derivation_id:
        raise BadEntry(f"metadata describes derivation {entry.derivation_id}, "
                       f"not {derivation_id}")
    return VerifiedEntry(entry, signer)


def _trusted_signer(envelope: signing.Envelope, keys: Mapping[str, Ed25519PublicKey]) -> str:
    message = signing.pae(envelope.payload_type, envelope.payload)
    for keyid, signature in envelope.signatures:
        key = keys.get(keyid)
        if key is None:
            continue
        try:
            key.verify(signature, message)
        except InvalidSignature:
            raise BadEntry(f"metadata signature by key {keyid[:16]} does not verify",
                           hint="the metadata was altered after signing") from None
        return keyid
    signers = ", ".join(k[:16] for k, _ in envelope.signatures)
    raise BadEntry(f"metadata is signed by no trusted key (signed by {signers})",
                   hint="add the cache's public key with --trusted-keys if you trust it")


def _field(doc: Mapping[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    value = doc.get(name)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise BadEntry(f"metadata field {name!r} is missing or malformed")
    return value


def parse_entry(payload: bytes) -> CacheEntry:
    """The entry in a payload; every field is checked for type and form."""
    try:
        doc = json.loads(payload)
    except (UnicodeDecodeError, ValueError):
        raise BadEntry("metadata payload is not JSON") from None
    if not isinstance(doc, dict) or doc.get("format") != ENTRY_FORMAT:
        raise BadEntry(f"metadata is not a {ENTRY_FORMAT} entry")
    derivation_id = _field(doc, "derivation_id", str)
    derivation = _field(doc, "derivation", dict)
    try:
        if derivation_from_json(derivation).id != derivation_id:
            raise ValueError("the derivation's id is not derivation_id")
    except (ValueError, KeyError, TypeError) as exc:
        raise BadEntry(f"metadata derivation does not match its id: {exc}") from None
    inputs = _field(doc, "inputs", dict)
    for name, value in inputs.items():
        if not (isinstance(value, dict) and is_hex64(value.get("derivation"))
                and isinstance(value.get("hash"), str)):
            raise BadEntry(f"metadata input {name!r} is malformed")
    obj = _field(doc, "object", dict)
    object_hash = _field(obj, "blake3", str)
    output_hash = _field(doc, "hash", str)
    kind = _field(doc, "type", str)
    if not (is_hex64(object_hash) and is_hex64(output_hash) and kind in _KINDS):
        raise BadEntry("metadata hash, object hash or type is malformed")
    if obj.get("compression") != "zstd":
        raise BadEntry(f"metadata object compression {obj.get('compression')!r} is unknown")
    sizes = (_field(obj, "size", int), _field(obj, "real_size", int))
    if min(sizes) < 0:
        raise BadEntry("metadata object size is negative")
    fsverity, fsverity_file = doc.get("fsverity"), doc.get("fsverity_file")
    if (fsverity is not None and not is_hex64(fsverity)) or (
            fsverity_file is not None
            and not (isinstance(fsverity_file, str) and _FILE_NAME.match(fsverity_file))):
        raise BadEntry("metadata fs-verity fields are malformed")
    epoch = _field(doc, "epoch", int)
    if not 0 <= epoch <= MAX_EPOCH:
        raise BadEntry(f"metadata epoch {epoch} is out of range")
    record = doc.get("record")
    return CacheEntry(
        derivation_id=derivation_id, derivation=derivation, inputs=inputs, hash=output_hash,
        type=kind, fsverity=fsverity, fsverity_file=fsverity_file,
        epoch=epoch,
        object=ObjectInfo(object_hash, sizes[0], sizes[1], "zstd",
                          int(obj.get("level") or 0)),
        record=record if isinstance(record, dict) else None, log=doc.get("log") is True)
