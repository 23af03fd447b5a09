"""Signing build records: ed25519 keys and DSSE envelopes, and reading signed records.

A signed record is a DSSE envelope (payloadType ``application/vnd.in-toto+json``) whose
payload is the record's exact bytes; the signature covers the DSSE pre-authentication
encoding. The key id is the sha256 of the raw 32-byte public key, in hex.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from reprobuild.errors import VerifyError
from reprobuild.proof.records import BuildRecord, RecordError, canonical_json, parse_statement

PAYLOAD_TYPE = "application/vnd.in-toto+json"


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
