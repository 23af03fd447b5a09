"""What `build` and `challenge` do with caches: options, substitution before the engine.

``build --substituters URL… --trusted-keys FILE…`` (or the environment, or
``config.toml``; see :mod:`reprobuild.cache.settings`) first decides each needed node's
fate, downloads what the caches hold in parallel, and leaves the rest to the engine.
``-j 0`` builds nothing (imports of path and host sources are not builds) and fails
naming what would have to be built; ``--dry-run`` only prints the decision.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections.abc import Sequence

from reprobuild.build.plan import Plan
from reprobuild.build.progress import Progress
from reprobuild.cache.backend import Cache, open_cache
from reprobuild.cache.challenge import Subject, challenge_caches
from reprobuild.cache.settings import CacheSettings, load_keys, resolve
from reprobuild.cache.substitute import SubstituteError, Substituter, open_substituters
from reprobuild.cache.substitution import (
    SubstitutionPlan,
    Transfer,
    plan_substitution,
    run_downloads,
)
from reprobuild.errors import BuildError, ReprobuildError
from reprobuild.proof.challenge import Challenge
from reprobuild.store.store import Store

MIB = 1 << 20


def add_substituter_options(parser: argparse.ArgumentParser, *, dry_run: bool = True) -> None:
    parser.add_argument("--substituters", nargs="+", metavar="URL",
                        help="binary caches to download outputs from, lowest priority "
                             "first (default: $REPROBUILD_SUBSTITUTERS, then config.toml)")
    parser.add_argument("--trusted-keys", nargs="+", metavar="FILE",
                        help="public keys (or directories of *.pub) whose signatures "
                             "caches need (default: $REPROBUILD_TRUSTED_KEYS, config.toml)")
    if dry_run:
        parser.add_argument("-n", "--dry-run", action="store_true",
                            help="say what would be downloaded, built and reused; do nothing")


def warn(warnings: Sequence[ReprobuildError], seen: set[str]) -> None:
    for warning in warnings:
        if warning.message not in seen:
            seen.add(warning.message)
            print(f"reprobuild: warning: {warning.message}", file=sys.stderr)


def open_caches(settings: CacheSettings) -> list[Cache]:
    return [open_cache(url) for url in settings.substituters]


def _describe(plan: Plan, decided: SubstitutionPlan) -> str:
    lines = []
    if decided.download:
        lines.append(f"would download {len(decided.download)} outputs "
                     f"({decided.download_bytes / MIB:.1f} MiB):")
        for key, download in decided.download.items():
            lines.append(f"  {key} {plan.nodes[key].id} from "
                         f"{download.substituter.cache.url} ({download.size} bytes)")
    for title, keys in (("would build", decided.build), ("would import", decided.imports),
                        ("already in the store", decided.present)):
        if keys:
            lines.append(f"{title} {len(keys)}:")
            lines.extend(f"  {key} {plan.nodes[key].id}" for key in keys)
    if not lines:
        lines.append("nothing to do")
    return "\n".join(lines) + "\n"


class _DownloadProgress(Progress):
    """The build progress line, led by the bytes downloaded so far and their rate."""

    def __init__(self, transfer: Transfer) -> None:
        super().__init__(enabled=True)
        self.transfer = transfer

    def _status(self) -> str:
        return (f"{self.transfer.bytes / MIB:.1f} MiB at {self.transfer.rate():.0f} MiB/s "
                + super()._status())


class _Display:
    """Download events into the build progress display, with bytes and rate."""

    def __init__(self, plan: Plan, decided: SubstitutionPlan, progress: Progress) -> None:
        self.plan, self.decided, self.progress = plan, decided, progress
        self.started: dict[str, float] = {}
        self.lock = threading.Lock()

    def __call__(self, key: str, state: str, detail: str) -> None:
        display = self.plan.nodes[key].display or key
        if state == "started":
            with self.lock:
                self.started[key] = time.monotonic()
            self.progress.started(key, f"{display} (download from {detail})", "")
            return
        with self.lock:
            seconds = max(time.monotonic() - self.started.pop(key, time.monotonic()), 1e-6)
        size = self.decided.download[key].size
        self.progress.finished(key, ok=state == "done", state=(
            f"downloaded {size / MIB:.1f} MiB at {size / MIB / seconds:.0f} MiB/s "
            f"from {detail}" if state == "done" else "download FAILED, building it"))


def substitute_first(args: argparse.Namespace, store: Store, plan: Plan) -> int | None:
    """Substitute what the caches hold; an exit code when there is nothing more to do."""
    settings = resolve(getattr(args, "substituters", None),
                       getattr(args, "trusted_keys", None))
    dry_run = getattr(args, "dry_run", False)
    jobs = getattr(args, "jobs", 1)
    if not settings.substituters and not dry_run and jobs != 0:
        return None
    seen: set[str] = set()
    substituters: list[Substituter] = []
    if settings.substituters:
        if not settings.trusted_keys:
            raise ReprobuildError("substituters are set but no trusted keys",
                                  hint="give --trusted-keys FILE (a cache's public key)")
        keys = load_keys(settings.trusted_keys)
        substituters, unreachable = open_substituters(open_caches(settings))
        warn(unreachable, seen)
    else:
        keys = {}
    decided = plan_substitution(plan, store, substituters, keys)
    warn(decided.warnings, seen)
    if dry_run:
        sys.stdout.write(_describe(plan, decided))
        return 0
    failed: set[str] = set()
    while decided.download:
        transfer = Transfer()
        progress = _DownloadProgress(transfer)
        progress.start(total=len(decided.download))
        try:
            failed.update(run_downloads(plan, store, decided, substituters, keys,
                                        jobs=max(4, jobs), transfer=transfer,
                                        on_event=_Display(plan, decided, progress)))
        finally:
            progress.stop()
        warn(decided.warnings, seen)
        # A failed download is built here: its inputs are needed now, maybe from a cache.
        decided = plan_substitution(plan, store, substituters, keys, exclude=failed)
        warn(decided.warnings, seen)
    if jobs == 0:
        to_build = decided.build
        if to_build:
            raise BuildError(
                f"-j 0 builds nothing locally, and {len(to_build)} outputs are in no "
                "cache:\n" + "\n".join(f"  {k} {plan.nodes[k].id}" for k in to_build),
                hint="build them with -j N, or copy them --to a cache from a builder")
    return None


def challenge_with_caches(args: argparse.Namespace, store: Store, plan: Plan
                          ) -> tuple[list[Challenge], list[SubstituteError]]:
    """Compare the local store and each cache, per derivation of ``plan``."""
    settings = resolve(args.substituters, args.trusted_keys)
    if not settings.trusted_keys:
        raise ReprobuildError("challenge --substituters needs trusted keys",
                              hint="give --trusted-keys FILE… (each builder's public key)")
    keys = load_keys(settings.trusted_keys)
    caches = open_caches(settings)
    try:
        subjects = [Subject(node.key, node.id) for node in plan.order()]
        return challenge_caches(subjects, store, caches, keys)
    finally:
        for cache in caches:
            cache.close()
