"""Build records: in-toto statements with a SLSA provenance predicate, and their signatures.

A record says "the derivation D, built from these inputs by this version of reprobuild,
gave this output". It is plain deterministic JSON (sorted keys, no wall clock, no host
names or paths), so two independent builders of the same derivation write byte-identical
records exactly when their outputs are identical.

Signing lives in :mod:`reprobuild.proof.signing`, comparing builders in
:mod:`reprobuild.proof.challenge`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from reprobuild import __version__
from reprobuild.errors import ReprobuildError
from reprobuild.integrity import fsverity

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://slsa.dev/provenance/v1"
BUILD_TYPE = "urn:reprobuild:derivation:v1"
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
        digest["sha256"] = file_sha256(output_path)
        digest["fsverity-sha256"] = (fsverity_digest
                                     or fsverity.digest_file(output_path).hex())
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
def file_sha256(path: str | os.PathLike[str]) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(1 << 20):
            sha.update(chunk)
    return sha.hexdigest()


def file_digests(path: str | os.PathLike[str]) -> tuple[str, str]:
    """The sha256 and the fs-verity sha256 digest (4 KiB blocks, no salt) of a file, hex."""
    return file_sha256(path), fsverity.digest_file(path).hex()


def record_from_metadata(meta: Mapping[str, Any],
                         output_path: str | os.PathLike[str] | None) -> BuildRecord:
    """The record of a store entry, from its metadata (see ``Store.register``) and output.

    Every input is listed with its derivation id and content hash; a file output gets its
    sha256 and fs-verity digest too.
    """
    derivation = meta.get("derivation", {})
    attrs = derivation.get("attrs", {})
    epoch = attrs.get("epoch") if isinstance(attrs, Mapping) else None
    deps = [Dependency(str(name), (("blake3", str(value.get("hash", ""))),),
                       str(value["derivation"]))
            for name, value in sorted(meta.get("inputs", {}).items())]
    return make_record(
        derivation_id=str(meta["derivation_id"]),
        target=str(derivation.get("name") or meta["derivation_id"]),
        content_hash=str(meta["hash"]),
        output_path=output_path if meta.get("type") == "file" else None,
        fsverity_digest=meta.get("fsverity"),
        dependencies=deps,
        epoch=epoch if isinstance(epoch, int) else None,
        parameters={"kind": str(derivation.get("kind", ""))},
    )


def entry_record(meta: Mapping[str, Any], output_path: str) -> bytes:
    """The record bytes of a store entry (the store's ``RecordWriter``)."""
    return record_bytes(record_from_metadata(meta, output_path))


def check_entry_record(meta: Mapping[str, Any], output_path: str, data: bytes) -> str | None:
    """Why ``data`` is not the record of the entry (the store's ``RecordCheck``), or None.

    Compared field by field with the record the metadata makes, without rehashing the
    output: a file output's ``sha256`` is left to the content check of ``store verify``,
    and the builder version may be an older reprobuild's.
    """
    try:
        stored = parse_statement(data)
    except ReprobuildError:
        return "does not parse as a reprobuild build record"
    try:
        expected = record_from_metadata(meta, None)
    except (KeyError, TypeError, ValueError):
        return "cannot be compared with malformed metadata"
    digests = tuple(d for d in stored.output_digest if d[0] != "sha256")
    if replace(stored, output_digest=digests, builder_version=__version__) != expected:
        return "does not match the entry's metadata"
    return None
