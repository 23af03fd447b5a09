"""Derivations: what a build step is, encoded canonically and identified by its hash.

Pure: nothing here touches the disk. A :class:`Derivation` holds every value that can
influence an output (builder, arguments, environment, epoch, the ids of its inputs, and
for built-in steps the version of reprobuild's code) and nothing that cannot (the recipe's
location, the store's location, key order, comments, the step's name). Its id is the
blake3 hash of a canonical msgpack encoding: map keys sorted bytewise, no floats, every
value one of nil, bool, int, str, list or map, the schema named inside.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import blake3
import msgpack

SCHEMA = "reprobuild-derivation/1"

Value = None | bool | int | str | list["Value"] | tuple["Value", ...] | Mapping[str, "Value"]


class NotCanonical(TypeError):
    """A value that has no canonical encoding (a float, bytes, a non-string key...)."""


def canonical(value: Any) -> Any:
    """``value`` with maps as key-sorted dicts and tuples as lists; refuse anything else."""
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        if not -(1 << 63) <= value < (1 << 64):
            raise NotCanonical(f"integer {value} does not fit in 64 bits")
        return value
    if isinstance(value, list | tuple):
        return [canonical(v) for v in value]
    if isinstance(value, Mapping):
        keys = list(value)
        for key in keys:
            if not isinstance(key, str):
                raise NotCanonical(f"map key {key!r} is not a string")
        return {k: canonical(value[k]) for k in sorted(keys, key=lambda k: k.encode())}
    raise NotCanonical(f"{type(value).__name__} value {value!r} has no canonical encoding")


def encode(value: Any) -> bytes:
    """The canonical msgpack bytes of ``value`` (see :func:`canonical`)."""
    packed: bytes = msgpack.packb(canonical(value), use_bin_type=True, strict_types=True)
    return packed


@dataclass(frozen=True)
class Derivation:
    """One node of the build graph.

    ``kind`` says who builds it ("fetch-deb", "deb", "path", "host", "step", "image");
    ``attrs`` are the kind's parameters; ``inputs`` maps each input's name (its mount
    name inside the sandbox) to the input's derivation id. ``name`` is for people only
    and is not hashed: two steps that do the same thing share an output.
    """

    kind: str
    attrs: Mapping[str, Value]
    inputs: Mapping[str, str] = field(default_factory=dict)
    name: str = ""

    def document(self) -> dict[str, Any]:
        """The hashed document, as canonical JSON-able data."""
        doc: dict[str, Any] = canonical({
            "schema": SCHEMA,
            "kind": self.kind,
            "attrs": self.attrs,
            "inputs": dict(self.inputs),
        })
        return doc

    @cached_property
    def encoded(self) -> bytes:
        return encode(self.document())

    @cached_property
    def id(self) -> str:
        """The derivation id: blake3 of the canonical encoding, 64 hex digits."""
        return blake3.blake3(self.encoded).hexdigest()

    def to_json(self) -> dict[str, Any]:
        """The derivation as JSON-able data with its id and name (for show and the store)."""
        return {"id": self.id, "name": self.name, **self.document()}

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2, sort_keys=True)


def derivation_from_json(data: Mapping[str, Any]) -> Derivation:
    """Rebuild a derivation from :meth:`Derivation.to_json` output (checks the id)."""
    if data.get("schema") != SCHEMA:
        raise ValueError(f"unknown derivation schema {data.get('schema')!r}")
    drv = Derivation(kind=data["kind"], attrs=data["attrs"], inputs=data["inputs"],
                     name=data.get("name", ""))
    if "id" in data and data["id"] != drv.id:
        raise ValueError(f"derivation id {data['id']} does not match its content ({drv.id})")
    return drv
