"""`guix challenge` for build records: per output, which builders agree and which differ."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from reprobuild.proof.signing import LoadedRecord


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
        count = sum(len(builders) for _, builders in item.groups)
        if count == 1:
            status = "only one builder"
        lines.append(f"{item.target} ({item.derivation_id}): {status} "
                     f"({count} builder{'s' if count != 1 else ''})")
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
