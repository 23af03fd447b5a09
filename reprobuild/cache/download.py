"""Copying entries from caches into the store (``reprobuild copy --from``), in parallel.

Each derivation is asked of the caches in priority order; its inputs, named by the
signed metadata, are copied too unless ``inputs`` is false. A failure of one cache for
one derivation is a warning, and the next cache is asked; a derivation no cache could
provide is reported as missing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from reprobuild.cache.layout import VerifiedEntry
from reprobuild.cache.substitute import (
    OnBytes,
    SubstituteError,
    Substituter,
    from_any,
    query,
)
from reprobuild.store.store import Store


@dataclass
class DownloadReport:
    fetched: dict[str, str] = field(default_factory=dict)  # derivation id -> cache URL
    present: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    warnings: list[SubstituteError] = field(default_factory=list)


def find(substituters: Sequence[Substituter], derivation_id: str,
         keys: Mapping[str, Ed25519PublicKey], warnings: list[SubstituteError]
         ) -> tuple[Substituter, VerifiedEntry] | None:
    """The first cache (in priority order) with a trusted entry for ``derivation_id``."""
    for substituter in substituters:
        try:
            verified = query(substituter.cache, derivation_id, keys)
        except SubstituteError as exc:
            warnings.append(exc)
            continue
        if verified is not None:
            return substituter, verified
    return None


def download(store: Store, substituters: Sequence[Substituter], derivation_ids: Sequence[str],
             keys: Mapping[str, Ed25519PublicKey], *, inputs: bool = True, jobs: int = 4,
             on_bytes: OnBytes | None = None) -> DownloadReport:
    """Put ``derivation_ids`` (and their inputs) into ``store`` from the caches."""
    report = DownloadReport()
    found: dict[str, tuple[Substituter, VerifiedEntry]] = {}
    stack = list(derivation_ids)
    seen: set[str] = set()
    while stack:
        derivation_id = stack.pop()
        if derivation_id in seen:
            continue
        seen.add(derivation_id)
        if store.lookup(derivation_id) is not None:
            report.present.append(derivation_id)
            continue
        hit = find(substituters, derivation_id, keys, report.warnings)
        if hit is None:
            report.missing.append(derivation_id)
            continue
        found[derivation_id] = hit
        if inputs:
            stack.extend(v["derivation"] for v in hit[1].entry.inputs.values())

    def fetch(derivation_id: str) -> None:
        with store.lock(derivation_id):
            got = from_any(store, substituters, derivation_id, keys, report.warnings,
                           known=found[derivation_id], on_bytes=on_bytes)
        if got is None:
            report.missing.append(derivation_id)
        elif got[1] is None:
            report.present.append(derivation_id)
        else:
            report.fetched[derivation_id] = got[1]

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        list(pool.map(fetch, sorted(found)))
    report.present.sort()
    report.missing.sort()
    return report
