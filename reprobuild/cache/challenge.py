"""`reprobuild challenge --substituters`: does each cache agree with the local store?

Per derivation, the claims are the local store's output hash and each cache's signed
output hash. A builder is a signing key, not a cache: two caches signed by one key are
one builder (named with both URLs), and a local entry that was substituted counts as the
key that signed it. Only locally built entries count as the builder "local store".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from reprobuild.cache.backend import Cache
from reprobuild.cache.substitute import SubstituteError, query
from reprobuild.proof.challenge import Challenge
from reprobuild.store.store import Store

LOCAL = "local store"

Digest = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Subject:
    """A derivation to challenge: its recipe name and id."""

    target: str
    derivation_id: str


def _claims(subject: Subject, store: Store, caches: Sequence[Cache],
            keys: Mapping[str, Ed25519PublicKey], warnings: list[SubstituteError]
            ) -> dict[str, dict[Digest, list[str]]]:
    """builder -> claimed digest -> where the claim was found."""
    claims: dict[str, dict[Digest, list[str]]] = {}
    meta = store.metadata(subject.derivation_id)
    if meta is not None and store.lookup(subject.derivation_id) is not None:
        substituted = meta.get("substituted") or {}
        builder = f"key {substituted['key']}" if substituted.get("key") else LOCAL
        claims.setdefault(builder, {}).setdefault(
            (("blake3", str(meta["hash"])),), []).append(LOCAL)
    for cache in caches:
        try:
            verified = query(cache, subject.derivation_id, keys, name=subject.target)
        except SubstituteError as exc:
            warnings.append(exc)
            continue
        if verified is None:
            continue
        digest = (("blake3", verified.entry.hash),)
        claims.setdefault(f"key {verified.signer}", {}).setdefault(digest, []).append(
            cache.url)
    return claims


def challenge_caches(subjects: Sequence[Subject], store: Store, caches: Sequence[Cache],
                     keys: Mapping[str, Ed25519PublicKey]
                     ) -> tuple[list[Challenge], list[SubstituteError]]:
    """Per subject, who claims which output hash; and the caches that could not answer."""
    warnings: list[SubstituteError] = []
    results = []
    for subject in subjects:
        claims = _claims(subject, store, caches, keys, warnings)
        if not claims:
            continue
        by_digest: dict[Digest, list[str]] = {}
        for builder, digests in sorted(claims.items()):
            for digest, where in digests.items():
                shown = builder if builder == LOCAL else \
                    f"{builder[:20]}… ({', '.join(sorted(set(where)))})"
                by_digest.setdefault(digest, []).append(shown)
        groups = sorted(((d, tuple(sorted(b))) for d, b in by_digest.items()),
                        key=lambda g: (-len(g[1]), g[0]))
        results.append(Challenge(subject.derivation_id, subject.target, tuple(groups)))
    results.sort(key=lambda c: (c.target, c.derivation_id))
    return results, warnings
