"""Substitution for a build plan: what to download, what to build, what is there.

:func:`plan_substitution` walks the plan from its targets like the engine does: a node
in the store is done; a node some cache holds (trusted entry) is downloaded and its
inputs are not needed; anything else is built locally, so its dependencies are needed
in turn. Importing ``path`` and ``host`` sources is not a build and is never asked of a
cache. Caches are queried in parallel, a frontier of the graph at a time.

:func:`run_downloads` then fetches what the plan says, in parallel, under the store
lock of each derivation; a failure is a warning and the node is left for a local build.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from reprobuild.build.plan import Node, Plan
from reprobuild.cache.layout import VerifiedEntry
from reprobuild.cache.substitute import SubstituteError, Substituter, from_any, query
from reprobuild.store.store import Store

IMPORT_KINDS = ("path", "host")
QUERY_THREADS = 16


@dataclass(frozen=True)
class Download:
    substituter: Substituter
    verified: VerifiedEntry

    @property
    def size(self) -> int:
        return self.verified.entry.object.size


@dataclass
class SubstitutionPlan:
    """Node keys by fate, each list in plan order."""

    present: list[str] = field(default_factory=list)
    download: dict[str, Download] = field(default_factory=dict)
    build: list[str] = field(default_factory=list)
    imports: list[str] = field(default_factory=list)
    warnings: list[SubstituteError] = field(default_factory=list)

    @property
    def download_bytes(self) -> int:
        return sum(d.size for d in self.download.values())


def _first_hit(substituters: Sequence[Substituter], node: Node,
               keys: Mapping[str, Ed25519PublicKey], warnings: list[SubstituteError]
               ) -> Download | None:
    for substituter in substituters:
        try:
            verified = query(substituter.cache, node.id, keys, name=node.key)
        except SubstituteError as exc:
            warnings.append(exc)
            continue
        if verified is not None:
            return Download(substituter, verified)
    return None


def plan_substitution(plan: Plan, store: Store, substituters: Sequence[Substituter],
                      keys: Mapping[str, Ed25519PublicKey], *,
                      exclude: Collection[str] = ()) -> SubstitutionPlan:
    """Decide each needed node's fate (see the module docstring); nothing is changed.

    Nodes in ``exclude`` (downloads that failed) are built, not asked of the caches.
    """
    result = SubstitutionPlan()
    fate: dict[str, str] = {}
    frontier = sorted(set(plan.targets))

    def classify(key: str) -> tuple[str, str, Download | None]:
        node = plan.nodes[key]
        if store.lookup(node.id) is not None:
            return key, "present", None
        if node.derivation.kind in IMPORT_KINDS:
            return key, "import", None
        hit = None
        if substituters and key not in exclude:
            hit = _first_hit(substituters, node, keys, result.warnings)
        return key, ("download" if hit else "build"), hit

    with ThreadPoolExecutor(max_workers=QUERY_THREADS) as pool:
        while frontier:
            following: set[str] = set()
            for key, kind, hit in pool.map(classify, frontier):
                fate[key] = kind
                if hit is not None:
                    result.download[key] = hit
                if kind in ("build", "import"):
                    following.update(d for d in plan.nodes[key].deps if d not in fate)
            frontier = sorted(following - set(fate))
    for node in plan.order():
        decided = fate.get(node.key)
        if decided == "present":
            result.present.append(node.key)
        elif decided == "build":
            result.build.append(node.key)
        elif decided == "import":
            result.imports.append(node.key)
    result.download = {n.key: result.download[n.key] for n in plan.order()
                       if n.key in result.download}
    return result


class Transfer:
    """Bytes received so far, from several threads, and the rate since the start."""

    def __init__(self) -> None:
        self.bytes = 0
        self.start = time.monotonic()
        self.lock = threading.Lock()

    def add(self, count: int) -> None:
        with self.lock:
            self.bytes += count

    def rate(self) -> float:
        """MiB/s since the start."""
        return self.bytes / (1 << 20) / max(time.monotonic() - self.start, 1e-6)


Event = Callable[[str, str, str], None]
"""Called with (node key, "started" | "done" | "failed", detail)."""


def run_downloads(plan: Plan, store: Store, substitution: SubstitutionPlan,
                  substituters: Sequence[Substituter], keys: Mapping[str, Ed25519PublicKey],
                  *, jobs: int = 4, transfer: Transfer | None = None,
                  on_event: Event | None = None) -> list[str]:
    """Download every node the plan says, ``jobs`` at a time; the keys that failed.

    A node whose chosen cache fails is asked of the other caches; when none can provide
    it, its failure is in ``substitution.warnings`` and it must be built locally.
    """
    transfer = transfer or Transfer()
    failed: list[str] = []

    def one(key: str) -> None:
        node = plan.nodes[key]
        chosen = substitution.download[key]
        if on_event:
            on_event(key, "started", chosen.substituter.cache.url)
        with store.lock(node.id):
            got = from_any(store, substituters, node.id, keys, substitution.warnings,
                           known=(chosen.substituter, chosen.verified), on_bytes=transfer.add)
        if got is None:
            failed.append(key)
            if on_event:
                on_event(key, "failed", "")
        elif on_event:
            on_event(key, "done", got[1] or "already in the store")

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        list(pool.map(one, list(substitution.download)))
    order = {n.key: i for i, n in enumerate(plan.order())}
    return sorted(failed, key=order.__getitem__)
