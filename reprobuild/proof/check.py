"""`reprobuild check`: rebuild outputs under varied host conditions and compare bit for bit.

The stored outputs (built first when missing) are the reference. Each round makes a fresh
temporary store, copies into it what is not rebuilt (the target's inputs, or with
``deep`` only the fetched sources), and runs ``reprobuild build`` there as a separate
process under the round's variations (see :mod:`reprobuild.proof.variations`). Every rebuilt
derivation's content hash is compared with the stored one; a difference is explained
with a :class:`~reprobuild.proof.diffreport.DiffReport` and marked in the main store, so later
builds say that the step is not reproducible.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import reprobuild
from reprobuild.build.recipe import PathSource, Recipe, load_recipe
from reprobuild.errors import BuildError, ReprobuildError, StoreError
from reprobuild.proof import diffreport, variations
from reprobuild.store import canon
from reprobuild.store.store import Store

# Derivation kinds that need the network: copied into the variant store, never rebuilt.
FETCHED_KINDS = ("fetch-deb",)


@dataclass(frozen=True)
class Built:
    """One target as `reprobuild build --json` reports it."""

    target: str
    derivation_id: str
    path: str
    hash: str


@dataclass(frozen=True)
class OutputCheck:
    """One rebuilt output compared with the stored one."""

    name: str
    derivation_id: str
    expected_hash: str
    actual_hash: str | None  # None: the rebuild made no such output
    report: diffreport.DiffReport | None = None
    diffoscope: str | None = None
    stored_path: str | None = None
    rebuilt_path: str | None = None  # only meaningful while the round's store is kept

    @property
    def identical(self) -> bool:
        return self.actual_hash == self.expected_hash


@dataclass(frozen=True)
class RoundResult:
    round: int
    variations: tuple[str, ...]
    skipped: tuple[tuple[str, str], ...]
    outputs: tuple[OutputCheck, ...]
    notes: tuple[str, ...] = ()
    kept: str | None = None

    @property
    def identical(self) -> bool:
        return all(o.identical for o in self.outputs)


@dataclass(frozen=True)
class Explanation:
    """Which variation alone makes an output differ (from ``explain``)."""

    name: str
    derivation_id: str
    without_variation: bool  # it differs even rebuilt with no variation at all
    causes: tuple[str, ...]  # variations that make it differ on their own

    def render(self) -> str:
        if self.without_variation:
            return (f"{self.name}: differs even without any variation (time, randomness, "
                    "or the store's location leak into it)")
        if self.causes:
            return f"{self.name}: differs under {', '.join(self.causes)} alone"
        return f"{self.name}: differs only when variations are combined"


@dataclass(frozen=True)
class CheckResult:
    recipe: str
    targets: tuple[Built, ...]
    rounds: tuple[RoundResult, ...]
    explanations: tuple[Explanation, ...] = ()

    @property
    def identical(self) -> bool:
        return all(r.identical for r in self.rounds)

    def render(self) -> str:
        lines = []
        for rnd in self.rounds:
            applied = ", ".join(rnd.variations) or "no variation"
            lines.append(f"round {rnd.round}: {applied}")
            for name, why in rnd.skipped:
                lines.append(f"  (variation {name} skipped: {why})")
            for note in rnd.notes:
                lines.append(f"  note: {note}")
            for out in rnd.outputs:
                status = "identical" if out.identical else "DIFFERS"
                lines.append(f"  {out.name} {out.derivation_id[:16]}: {status}")
                if out.identical:
                    continue
                if out.actual_hash is None:
                    lines.append("    the rebuild made no output for this derivation")
                    continue
                lines.append(f"    stored  blake3 {out.expected_hash}  {out.stored_path}")
                lines.append(f"    rebuilt blake3 {out.actual_hash}"
                             + (f"  {out.rebuilt_path}" if rnd.kept else ""))
                if out.report is not None:
                    lines.extend("    " + line for line in out.report.render().splitlines())
                if out.diffoscope:
                    lines.extend("    " + line for line in out.diffoscope.splitlines())
            if rnd.kept:
                lines.append(f"  kept the rebuilt store at {rnd.kept}")
        if self.explanations:
            lines.append("explained by rebuilding under one variation at a time:")
            lines.extend(f"  {e.render()}" for e in self.explanations)
        bad = sorted({o.name for r in self.rounds for o in r.outputs if not o.identical})
        total = len({o.derivation_id for r in self.rounds for o in r.outputs})
        if bad:
            lines.append(f"check: NOT reproducible: {', '.join(bad)}")
        else:
            lines.append(f"check: {total} outputs identical over {len(self.rounds)} rounds")
        return "\n".join(lines) + "\n"

    def to_json(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe,
            "identical": self.identical,
            "targets": [{"target": t.target, "derivation": t.derivation_id, "path": t.path,
                         "hash": t.hash} for t in self.targets],
            "explanations": [{"name": e.name, "derivation": e.derivation_id,
                              "without_variation": e.without_variation,
                              "causes": list(e.causes)} for e in self.explanations],
            "rounds": [{
                "round": r.round, "variations": list(r.variations),
                "skipped": {n: why for n, why in r.skipped}, "notes": list(r.notes),
                "kept": r.kept,
                "outputs": [{
                    "name": o.name, "derivation": o.derivation_id, "identical": o.identical,
                    "expected_hash": o.expected_hash, "actual_hash": o.actual_hash,
                    "stored_path": o.stored_path,
                    "rebuilt_path": o.rebuilt_path if r.kept else None,
                    "report": o.report.to_json() if o.report is not None else None,
                } for o in r.outputs],
            } for r in self.rounds],
        }


# -- running reprobuild build ----------------------------------------------------------
def _package_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(reprobuild.__file__)))


def build_command(store: str, recipe: str, targets: Sequence[str],
                  extra: Sequence[str] = ()) -> list[str]:
    """``python -m reprobuild build --json`` for ``targets`` into ``store``."""
    return [sys.executable, "-m", "reprobuild", "build", "--store", store, "--json",
            "--no-out-link",
            *extra, recipe, *targets]


Runner = Callable[[list[str], Mapping[str, str], str, int | None],
                  "subprocess.CompletedProcess[str]"]


def run_process(argv: list[str], env: Mapping[str, str], cwd: str,
                umask: int | None) -> subprocess.CompletedProcess[str]:
    """Run a build process (the seam tests replace with a fake engine)."""
    return subprocess.run(argv, env=dict(env), cwd=cwd, umask=-1 if umask is None else umask,
                          capture_output=True, text=True, check=False)


def _parse_built(stdout: str, what: str) -> list[Built]:
    try:
        doc = json.loads(stdout)
        return [Built(str(d["target"]), str(d["derivation"]), str(d["path"]), str(d["hash"]))
                for d in doc]
    except (ValueError, KeyError, TypeError) as exc:
        raise ReprobuildError(f"{what}: unexpected output from reprobuild build --json ({exc}): "
                         f"{stdout[-500:]!r}") from None


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def build_reference(recipe: str, targets: Sequence[str], store: str, *,
                    runner: Runner = run_process) -> list[Built]:
    """Build the targets into the main store (a no-op when present) and list them."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [_package_root(),
                                                      env.get("PYTHONPATH")]))
    result = runner(build_command(store, recipe, targets), env, os.getcwd(), None)
    if result.returncode != 0:
        # Keep the build's verdict: 1 a step failed, 2 a recipe or environment error.
        error = BuildError if result.returncode == 1 else ReprobuildError
        raise error(f"building {recipe} failed before it could be checked "
                    f"(exit {result.returncode}):\n{_tail(result.stderr)}")
    return _parse_built(result.stdout, recipe)


# -- one round ------------------------------------------------------------------------
def _copy_entry(main: Store, variant: Store, derivation_id: str, *,
                invert: str | None) -> None:
    variations.copy_tree(main.output_path(derivation_id), variant.output_path(derivation_id),
                         invert=invert)
    variations.copy_tree(main.meta_path(derivation_id), variant.meta_path(derivation_id))


def _outside_source(recipe: Recipe) -> PathSource | None:
    """A path source outside the recipe's directory (a copy of that directory lacks it)."""
    top = os.path.realpath(recipe.directory)
    for source in recipe.sources.values():
        if isinstance(source, PathSource):
            real = os.path.realpath(source.path)
            if os.path.commonpath([top, real]) != top:
                return source
    return None


def _relocate_recipe(recipe: Recipe, recipe_path: str, workdir: str, *,
                     invert: str | None, store_root: str) -> tuple[str, str | None]:
    """Copy the recipe's directory elsewhere (listing inverted, see ``copy_tree``),
    leaving out a store that lives inside it and version control data.

    Returns the recipe path to build and a note when it could not be moved (a path
    source lies outside the recipe's directory).
    """
    top = os.path.realpath(recipe.directory)
    outside = _outside_source(recipe)
    if outside is not None:
        return recipe_path, (f"the recipe was not moved: source {outside.name!r} "
                             f"({outside.path}) is outside its directory")
    dest = os.path.join(workdir, "recipe-in-another-directory")
    exclude = frozenset({os.path.realpath(store_root), os.path.join(top, ".git")})
    variations.copy_tree(top, dest, invert=invert, exclude=exclude)
    return os.path.join(dest, os.path.basename(recipe_path)), None


@dataclass(frozen=True)
class _Plan:
    recipe: Recipe
    recipe_path: str
    targets: tuple[str, ...]
    copy_ids: tuple[str, ...]
    compare_ids: tuple[str, ...]
    names: Mapping[str, str]  # derivation id -> name
    target_ids: Mapping[str, str]  # target -> derivation id
    space_needed: int  # bytes a round's store may take: copies, rebuilds, build dirs


def _plan(recipe_path: str, targets: Sequence[str], main: Store, built: list[Built], *,
          deep: bool) -> _Plan:
    recipe = load_recipe(recipe_path)
    target_ids = {b.target: b.derivation_id for b in built}
    closure = sorted(main.closure(list(target_ids.values())))
    names: dict[str, str] = {}
    kinds: dict[str, str] = {}
    for did in closure:
        meta = main.metadata(did)
        if meta is None:
            raise StoreError(f"derivation {did} is missing from the store {main.root}",
                             hint="build the recipe again")
        drv = meta.get("derivation", {})
        names[did] = str(drv.get("name") or did[:16])
        kinds[did] = str(drv.get("kind", ""))
    for target, did in target_ids.items():
        names[did] = target
    wanted = set(target_ids.values())
    if deep:
        copy_ids = [d for d in closure if kinds[d] in FETCHED_KINDS and d not in wanted]
    else:
        copy_ids = [d for d in closure if d not in wanted]
    compare_ids = sorted((d for d in closure if d not in copy_ids),
                         key=lambda d: (names[d], d))
    stored = sum(variations.tree_bytes(main.output_path(d)) for d in closure)
    return _Plan(recipe, recipe_path, tuple(targets), tuple(copy_ids), tuple(compare_ids),
                 names, target_ids, 2 * stored + (64 << 20))


def check_round(plan: _Plan, main: Store, round_index: int, chosen: Sequence[str], *,
                keep: bool, diffoscope: bool, mark: bool,
                runner: Runner = run_process) -> RoundResult:
    """Rebuild into a fresh store under the round's variations and compare."""
    base: str | None = None
    skipped: list[tuple[str, str]] = []
    outside = _outside_source(plan.recipe)
    if "uid" in chosen and outside is not None and variations.can_change_uid():
        # The other uid reads only what this process copied for it (the recipe's
        # directory), never the user's own files, which may be private to them.
        chosen = [c for c in chosen if c != "uid"]
        skipped.append(("uid", f"source {outside.name!r} ({outside.path}) is outside the "
                               "recipe's directory, which is all the other uid is given"))
    if "import-order" in chosen:
        # Input order is varied on a filesystem that lists in creation order (tmpfs).
        base = variations.import_order_dir(plan.space_needed)
        if base is None:
            chosen = [c for c in chosen if c != "import-order"]
            skipped.append(("import-order", "no filesystem here lists directories in "
                                            "creation order with "
                                            f"{plan.space_needed >> 20} MiB free (tmpfs)"))
    workdir = tempfile.mkdtemp(prefix=f"reprobuild-check-{round_index + 1}-", dir=base)
    os.chmod(workdir, 0o755)
    try:
        result = _check_round(plan, main, round_index, chosen, workdir, keep=keep,
                              diffoscope=diffoscope, mark=mark, runner=runner)
        return replace(result, skipped=(*result.skipped, *skipped))
    finally:
        if not keep:
            canon.remove_tree(workdir)


def _check_round(plan: _Plan, main: Store, round_index: int, chosen: Sequence[str],
                 workdir: str, *, keep: bool, diffoscope: bool, mark: bool,
                 runner: Runner) -> RoundResult:
    base_env = dict(os.environ)
    base_env["PYTHONPATH"] = os.pathsep.join(filter(None, [_package_root(),
                                                           base_env.get("PYTHONPATH")]))
    cond = variations.host_conditions(chosen, round_index, workdir, base_env)
    invert = (variations.listing_policy(workdir) if "import-order" in cond.applied
              else None)
    notes: list[str] = []
    recipe_path = os.path.abspath(plan.recipe_path)
    # The other uid gets a copy of the recipe's directory (the user's may be private to
    # them, a 0700 directory); the inputs it does not rebuild are copied to its store.
    if "build-dir" in cond.applied or invert or cond.uid is not None:
        recipe_path, note = _relocate_recipe(plan.recipe, recipe_path, workdir,
                                             invert=invert, store_root=main.root)
        if note:
            notes.append(note)
    store_dir = os.path.join(workdir, "store-in-another-place" if "build-dir" in cond.applied
                             else "store")
    variant = Store(store_dir)
    for did in plan.copy_ids:
        _copy_entry(main, variant, did, invert=invert)
    if cond.uid is not None:
        variations.chown_tree(workdir, cond.uid)
    argv = [*cond.wrapper, *build_command(store_dir, recipe_path, plan.targets,
                                          ["--offline", *cond.build_args])]
    result = runner(argv, dict(cond.env), cond.cwd, cond.umask)
    applied = cond.applied
    if result.returncode != 0:
        # Not a verdict: what could not be rebuilt is not known to differ (exit 2).
        where = f"; its store is kept at {store_dir}" if keep else ""
        raise ReprobuildError(
            f"the rebuild of {plan.recipe_path} under variations ({', '.join(applied)}) "
            f"could not be completed (exit {result.returncode}){where}:\n"
            f"{_tail(result.stderr)}",
            hint="nothing was compared; if a step fails only under some variation, "
                 "rerun check with --variations to find which one")
    rebuilt = {b.target: b.derivation_id for b in _parse_built(result.stdout, "rebuild")}
    for target, did in plan.target_ids.items():
        if rebuilt.get(target) != did:
            notes.append(f"the derivation id of {target} changed under the variations: "
                         f"{did} vs {rebuilt.get(target)} (the recipe's meaning depends on "
                         "the host)")
    outputs = []
    for did in plan.compare_ids:
        outputs.append(_compare(plan, main, variant, did, round_index, applied,
                                diffoscope=diffoscope, mark=mark))
    return RoundResult(round_index + 1, applied, cond.skipped, tuple(outputs), tuple(notes),
                       workdir if keep else None)


def _compare(plan: _Plan, main: Store, variant: Store, did: str, round_index: int,
             applied: Sequence[str], *, diffoscope: bool, mark: bool) -> OutputCheck:
    name = plan.names.get(did, did[:16])
    expected = main.lookup(did)
    if expected is None:
        raise StoreError(f"{name} ({did}) vanished from the store {main.root} during check")
    damage = main.damage(did)  # compare the bytes on disk, not only what was recorded
    if damage:
        raise StoreError(f"{expected.path}: content no longer matches its recorded hash "
                         f"({damage})", hint="run `reprobuild store verify --repair`, "
                                             "then check again")
    actual = variant.lookup(did)
    if actual is None:
        return OutputCheck(name, did, expected.hash, None)
    if actual.hash == expected.hash:
        return OutputCheck(name, did, expected.hash, actual.hash)
    report = diffreport.diff_paths(expected.path, actual.path, compare_owner=False,
                                   store_outputs=True)
    text = None
    if diffoscope:
        try:
            text = diffreport.run_diffoscope(expected.path, actual.path)[1]
        except ReprobuildError as exc:
            text = str(exc)
    if mark:
        main.mark_unreproducible(did, {
            "round": round_index + 1, "variations": list(applied),
            "stored_hash": expected.hash, "rebuilt_hash": actual.hash,
            "differences": [{"path": p, "kind": k} for p, k in report.summary()][:100],
        })
    return OutputCheck(name, did, expected.hash, actual.hash, report, text, expected.path,
                       actual.path)


def run_check(recipe_path: str, targets: Sequence[str], store_root: str, *,
              deep: bool = False, rounds: int = 1,
              chosen: Sequence[str] = variations.VARIATION_NAMES, keep: bool = False,
              diffoscope: bool = False, mark: bool = True,
              runner: Runner = run_process,
              progress: Callable[[str], None] | None = None,
              explain: bool = False) -> CheckResult:
    """Check that ``targets`` of a recipe rebuild bit for bit under varied conditions.

    The targets are built into ``store_root`` first when missing. Raises BuildError when
    that build fails, ReprobuildError (exit 2, never a verdict) when a rebuild could not
    be completed, RecipeError or StoreError on bad input; a difference is a result, not
    an error (see :attr:`CheckResult.identical`). With ``explain``, a difference is
    followed by rebuilds with no variation and with each variation alone, to say which
    one causes it.
    """
    if rounds < 1:
        raise ReprobuildError("--rounds must be at least 1")
    built = build_reference(recipe_path, targets, store_root, runner=runner)
    if not built:
        raise ReprobuildError(f"{recipe_path}: nothing to check (no targets)")
    main = Store(store_root)
    plan = _plan(recipe_path, [b.target for b in built], main, built, deep=deep)
    results = []
    for i in range(rounds):
        if progress is not None:
            progress(f"round {i + 1}/{rounds}: rebuilding {len(plan.compare_ids)} outputs "
                     f"under {', '.join(chosen) or 'no variation'}")
        results.append(check_round(plan, main, i, chosen, keep=keep, diffoscope=diffoscope,
                                   mark=mark, runner=runner))
    explanations: tuple[Explanation, ...] = ()
    if explain and not all(r.identical for r in results):
        explanations = _explain(plan, main, results, runner=runner, progress=progress)
    return CheckResult(recipe_path, tuple(built), tuple(results), explanations)


def _explain(plan: _Plan, main: Store, results: Sequence[RoundResult], *, runner: Runner,
             progress: Callable[[str], None] | None) -> tuple[Explanation, ...]:
    differing = sorted({(o.name, o.derivation_id) for r in results for o in r.outputs
                        if not o.identical})
    applied = sorted({v for r in results for v in r.variations},
                     key=variations.VARIATION_NAMES.index)
    verdicts: dict[tuple[str, ...], set[str]] = {}
    for single in [(), *((v,) for v in applied)]:
        if progress is not None:
            progress(f"explaining: rebuilding under {', '.join(single) or 'no variation'}")
        rnd = check_round(plan, main, 0, single, keep=False, diffoscope=False, mark=False,
                          runner=runner)
        verdicts[single] = {o.derivation_id for o in rnd.outputs if not o.identical}
    return tuple(
        Explanation(name, did, did in verdicts[()],
                    tuple(v for v in applied if did in verdicts[(v,)]))
        for name, did in differing)
