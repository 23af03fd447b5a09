"""Build records: in-toto statements with a SLSA provenance predicate, and their signatures.

A record says "the derivation D, built from these inputs by this version of reprobuild,
gave this output". It is plain deterministic JSON (sorted keys, no wall clock, no host
names or paths), so two independent builders of the same derivation write byte-identical
records exactly when their outputs are identical.

Records are signed as DSSE envelopes with ed25519 keys; the key id is the sha256 of the
raw 32-byte public key, in hex.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from reprobuild import __version__
from reprobuild.errors import ReprobuildError, VerifyError
from reprobuild.integrity import fsverity

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://slsa.dev/provenance/v1"
BUILD_TYPE = "urn:reprobuild:derivation:v1"
PAYLOAD_TYPE = "application/vnd.in-toto+json"
BUILDER_ID_PREFIX = "urn:reprobuild:builder:"
DERIVATION_URI_PREFIX = "urn:reprobuild:derivation:"


class RecordError(ReprobuildError):
    """A record or envelope file is malformed (not a reprobuild build record)."""


@dataclass(frozen=True)
class Dependency:
    """One input of a derivation: a built step (``derivation`` set) or a source by hash."""

    name: str
    digest: tuple[tuple[str, str], ...]  # (algorithm, hex), e.g. ("blake3", "...")
    derivation: str | None = None


@dataclass(frozen=True)
class BuildRecord:
    """What one build of one derivation produced.

    ``output_digest`` holds the output's digests by algorithm: always ``blake3`` (the
    store's content hash); for a file output also ``sha256`` of the file and
    ``fsverity-sha256`` (its fs-verity digest, 4 KiB blocks, no salt).
    """

    derivation_id: str
    target: str
    output_digest: tuple[tuple[str, str], ...]
    dependencies: tuple[Dependency, ...] = ()
    epoch: int | None = None
    builder_version: str = __version__
    parameters: tuple[tuple[str, str], ...] = field(default=())

    @property
    def content_hash(self) -> str:
        return dict(self.output_digest).get("blake3", "")


# -- statements -----------------------------------------------------------------------
def canonical_json(value: object) -> bytes:
    """JSON with sorted keys, no insignificant whitespace, UTF-8, and a final newline."""
    return (json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
            + "\n").encode()


def statement(record: BuildRecord) -> dict[str, Any]:
    """The in-toto Statement v1 (SLSA provenance v1 predicate) describing ``record``."""
    external: dict[str, Any] = {"derivation": record.derivation_id, "target": record.target}
    external.update(dict(record.parameters))
    internal: dict[str, Any] = {}
    if record.epoch is not None:
        internal["sourceDateEpoch"] = record.epoch
    dependencies = []
    for dep in sorted(record.dependencies, key=lambda d: (d.name, d.digest)):
        descriptor: dict[str, Any] = {"name": dep.name, "digest": dict(dep.digest)}
        if dep.derivation is not None:
            descriptor["uri"] = DERIVATION_URI_PREFIX + dep.derivation
        dependencies.append(descriptor)
    build_definition: dict[str, Any] = {
        "buildType": BUILD_TYPE,
        "externalParameters": external,
        "resolvedDependencies": dependencies,
    }
    if internal:
        build_definition["internalParameters"] = internal
    return {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": record.target, "digest": dict(record.output_digest)}],
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "buildDefinition": build_definition,
            "runDetails": {
                "builder": {
                    "id": BUILDER_ID_PREFIX + record.builder_version,
                    "version": {"reprobuild": record.builder_version},
                },
            },
        },
    }


def record_bytes(record: BuildRecord) -> bytes:
    """The record as it is written to disk: canonical JSON of its statement."""
    return canonical_json(statement(record))


def parse_statement(payload: bytes, *, what: str = "record") -> BuildRecord:
    """Read a statement written by :func:`record_bytes` back; refuse anything else."""
    try:
        doc = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RecordError(f"{what}: not JSON ({exc})",
                          hint="give a record written by reprobuild build or sign") from None
    try:
        if doc["_type"] != STATEMENT_TYPE:
            raise RecordError(f"{what}: _type is {doc['_type']!r}, expected {STATEMENT_TYPE}")
        if doc["predicateType"] != PREDICATE_TYPE:
            raise RecordError(f"{what}: predicateType is {doc['predicateType']!r}, "
                              f"expected {PREDICATE_TYPE}")
        (subject,) = doc["subject"]
        definition = doc["predicate"]["buildDefinition"]
        external = dict(definition["externalParameters"])
        derivation = str(external.pop("derivation"))
        target = str(external.pop("target"))
        deps = []
        for d in definition.get("resolvedDependencies", []):
            uri = d.get("uri")
            deps.append(Dependency(
                name=str(d["name"]),
                digest=tuple(sorted((str(k), str(v)) for k, v in d["digest"].items())),
                derivation=uri[len(DERIVATION_URI_PREFIX):] if uri else None))
        builder_version = str(doc["predicate"]["runDetails"]["builder"]["version"]
                              ["reprobuild"])
        epoch = definition.get("internalParameters", {}).get("sourceDateEpoch")
        return BuildRecord(
            derivation_id=derivation,
            target=target,
            output_digest=tuple(sorted((str(k), str(v))
                                       for k, v in subject["digest"].items())),
            dependencies=tuple(deps),
            epoch=None if epoch is None else int(epoch),
            builder_version=builder_version,
            parameters=tuple(sorted((str(k), str(v)) for k, v in external.items())),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise RecordError(f"{what}: not a reprobuild build record (missing or bad {exc})",
                          hint="give a record written by reprobuild build or sign") from None


def make_record(
    *,
    derivation_id: str,
    target: str,
    content_hash: str,
    output_path: str | os.PathLike[str] | None = None,
    fsverity_digest: str | None = None,
    dependencies: Iterable[Dependency] = (),
    epoch: int | None = None,
    parameters: Mapping[str, str] | None = None,
) -> BuildRecord:
    """A record for one output. For a file output, its sha256 (and, unless given, its
    fs-verity digest) is read from ``output_path``."""
    digest: dict[str, str] = {"blake3": content_hash}
    if output_path is not None and Path(output_path).is_file():
        sha, verity = file_digests(output_path)
        digest["sha256"] = sha
        digest["fsverity-sha256"] = fsverity_digest or verity
    elif fsverity_digest:
        digest["fsverity-sha256"] = fsverity_digest
    return BuildRecord(
        derivation_id=derivation_id,
        target=target,
        output_digest=tuple(sorted(digest.items())),
        dependencies=tuple(sorted(dependencies, key=lambda d: (d.name, d.digest))),
        epoch=epoch,
        parameters=tuple(sorted((parameters or {}).items())),
    )


# -- digests of a file ----------------------------------------------------------------
def file_digests(path: str | os.PathLike[str]) -> tuple[str, str]:
    """The sha256 and the fs-verity sha256 digest (4 KiB blocks, no salt) of a file, hex."""
    sha = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(1 << 20):
            sha.update(chunk)
    return sha.hexdigest(), fsverity.digest_file(path).hex()


# -- keys and DSSE signatures ---------------------------------------------------------
def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding of a payload."""
    kind = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(kind), kind, len(payload), payload)


def key_id(public_key: Ed25519PublicKey) -> str:
    """sha256 of the raw 32-byte public key, hex."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def public_key_path(private_path: str | os.PathLike[str]) -> Path:
    return Path(os.fspath(private_path) + ".pub")


def generate_key(path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write a new ed25519 key pair: PKCS#8 PEM at ``path`` (mode 0600), public at
    ``path.pub``. Refuses to overwrite an existing key."""
    private = Path(path)
    public = public_key_path(path)
    for p in (private, public):
        if p.exists():
            raise RecordError(f"{p} exists; refusing to overwrite a key",
                              hint="choose another file name or remove the old key")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as stream:
        stream.write(pem)
    os.chmod(private, 0o600)
    public.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


def load_private_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise RecordError(f"cannot read private key {path}: {exc}",
                          hint="make one with: reprobuild sign --generate-key FILE") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise RecordError(f"{path} is not an ed25519 private key")
    return key


def load_public_key(path: str | os.PathLike[str]) -> Ed25519PublicKey:
    """Read a public key (PEM); given a private key file, use its public half."""
    data = Path(path).read_bytes() if Path(path).exists() else b""
    if not data:
        raise RecordError(f"cannot read public key {path}: no such file")
    if b"PRIVATE KEY" in data:
        return load_private_key(path).public_key()
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise RecordError(f"cannot read public key {path}: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise RecordError(f"{path} is not an ed25519 public key")
    return key


def load_trusted_keys(directory: str | os.PathLike[str]) -> dict[str, Ed25519PublicKey]:
    """Every ``*.pub`` key in a directory, by key id."""
    keys: dict[str, Ed25519PublicKey] = {}
    base = Path(directory)
    if not base.is_dir():
        raise RecordError(f"trusted keys directory {base} does not exist")
    for path in sorted(base.glob("*.pub")):
        key = load_public_key(path)
        keys[key_id(key)] = key
    if not keys:
        raise RecordError(f"no *.pub keys in {base}")
    return keys


def sign_payload(payload: bytes, key: Ed25519PrivateKey) -> bytes:
    """A DSSE envelope (canonical JSON) carrying ``payload`` signed by ``key``."""
    signature = key.sign(pae(PAYLOAD_TYPE, payload))
    return canonical_json({
        "payload": base64.b64encode(payload).decode(),
        "payloadType": PAYLOAD_TYPE,
        "signatures": [{"keyid": key_id(key.public_key()),
                        "sig": base64.b64encode(signature).decode()}],
    })


@dataclass(frozen=True)
class Envelope:
    """A parsed DSSE envelope; signatures are (keyid, signature bytes)."""

    payload: bytes
    payload_type: str
    signatures: tuple[tuple[str, bytes], ...]


def parse_envelope(data: bytes, *, what: str = "envelope") -> Envelope:
    try:
        doc = json.loads(data)
        payload = base64.b64decode(doc["payload"], validate=True)
        signatures = tuple((str(s.get("keyid", "")), base64.b64decode(s["sig"], validate=True))
                           for s in doc["signatures"])
        return Envelope(payload, str(doc["payloadType"]), signatures)
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError,
            binascii.Error) as exc:
        raise RecordError(f"{what}: not a DSSE envelope ({exc})") from None


def verify_envelope(envelope: Envelope, keys: Mapping[str, Ed25519PublicKey], *,
                    what: str = "envelope") -> str:
    """Check that one of ``keys`` signed the envelope; return that key's id.

    Raises :class:`VerifyError` naming the envelope when no trusted key's signature is
    valid (a tampered payload, a wrong key, a wrong payload type).
    """
    if envelope.payload_type != PAYLOAD_TYPE:
        raise VerifyError(f"{what}: payloadType {envelope.payload_type!r}, "
                          f"expected {PAYLOAD_TYPE}")
    message = pae(envelope.payload_type, envelope.payload)
    signers = ", ".join(k[:16] for k, _ in envelope.signatures) or "none"
    for keyid, signature in envelope.signatures:
        candidates = [(keyid, keys[keyid])] if keyid in keys else list(keys.items())
        for kid, key in candidates:
            try:
                key.verify(signature, message)
            except InvalidSignature:
                continue
            return kid
    raise VerifyError(
        f"{what}: signature does not verify with any trusted key "
        f"(signed by {signers}; trusted: {', '.join(k[:16] for k in sorted(keys)) or 'none'})",
        hint="the record was altered after signing, or it was signed with another key")


@dataclass(frozen=True)
class LoadedRecord:
    """A record read from a file: the record, and who signed it (None when unsigned)."""

    source: str
    record: BuildRecord
    signer: str | None
    signed: bool


def load_record(path: str | os.PathLike[str],
                keys: Mapping[str, Ed25519PublicKey] | None = None) -> LoadedRecord:
    """Read a record file, plain or signed; with ``keys``, a signature must verify."""
    what = os.fspath(path)
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise RecordError(f"cannot read record {what}: {exc.strerror}") from None
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RecordError(f"{what}: not JSON ({exc})") from None
    if isinstance(doc, dict) and "payloadType" in doc:
        envelope = parse_envelope(data, what=what)
        signer = None
        if keys is not None:
            signer = verify_envelope(envelope, keys, what=what)
        record = parse_statement(envelope.payload, what=what)
        return LoadedRecord(what, record, signer, True)
    if keys is not None:
        raise VerifyError(f"{what}: record is not signed, but trusted keys were given",
                          hint="sign it with: reprobuild sign --key KEY RECORD")
    return LoadedRecord(what, parse_statement(data, what=what), None, False)


# -- challenge ------------------------------------------------------------------------
@dataclass(frozen=True)
class Opinion:
    """One builder's claim about one output."""

    builder: str
    digest: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Challenge:
    """All claims about one derivation's output, grouped by what they claim."""

    derivation_id: str
    target: str
    groups: tuple[tuple[tuple[tuple[str, str], ...], tuple[str, ...]], ...]  # digest, builders

    @property
    def agree(self) -> bool:
        return len(self.groups) <= 1


def challenge(records: Iterable[LoadedRecord]) -> list[Challenge]:
    """Group records by derivation id; per derivation, which builders claim which output.

    A builder is named by the key that signed its record, else by the record's file.
    Output sorted by target then derivation id; groups by descending size then digest.
    """
    by_drv: dict[str, list[LoadedRecord]] = {}
    for loaded in records:
        by_drv.setdefault(loaded.record.derivation_id, []).append(loaded)
    result = []
    for drv, members in by_drv.items():
        claims: dict[tuple[tuple[str, str], ...], list[str]] = {}
        for loaded in members:
            name = loaded.signer or loaded.source
            claims.setdefault(_comparable(loaded.record.output_digest), []).append(name)
        groups = sorted(((d, tuple(sorted(b))) for d, b in claims.items()),
                        key=lambda g: (-len(g[1]), g[0]))
        result.append(Challenge(drv, members[0].record.target, tuple(groups)))
    result.sort(key=lambda c: (c.target, c.derivation_id))
    return result


def _comparable(digest: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(digest))


def format_challenge(results: list[Challenge]) -> str:
    """`guix challenge`-style text: per output, who agrees and who differs."""
    lines = []
    for item in results:
        status = "agree" if item.agree else "DIFFER"
        lines.append(f"{item.target} ({item.derivation_id}): {status}")
        for digest, builders in item.groups:
            lines.append(f"  {dict(digest).get('blake3', '?')}")
            for algo, value in digest:
                if algo != "blake3":
                    lines.append(f"    {algo}: {value}")
            for builder in builders:
                lines.append(f"    - {builder}")
    total = len(results)
    differ = sum(not r.agree for r in results)
    lines.append(f"{total} outputs, {total - differ} identical, {differ} differing")
    return "\n".join(lines) + "\n"
