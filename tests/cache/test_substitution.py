"""Substitution planning, parallel downloads with fallback, and challenging caches."""

from __future__ import annotations

from pathlib import Path

from reprobuild.build.derivation import Derivation
from reprobuild.build.plan import Node, Plan
from reprobuild.build.recipe import PathSource, Recipe, Step
from reprobuild.cache.backend import Cache, open_cache
from reprobuild.cache.challenge import Subject, challenge_caches
from reprobuild.cache.substitute import open_substituters, substitute
from reprobuild.cache.substitution import plan_substitution, run_downloads
from reprobuild.cache.upload import upload
from reprobuild.proof import signing
from reprobuild.store.store import Store
from tests.cache.conftest import EPOCH, Built, Keys, make_built


def graph(built: Built) -> Plan:
    """tree <- image <- fresh (not cached) -> src (a path import); link alone."""
    store = built.store
    nodes: dict[str, Node] = {}
    for key in ("tree", "image", "link"):
        meta = store.metadata(built.ids[key])
        assert meta is not None
        doc = meta["derivation"]
        drv = Derivation(doc["kind"], doc["attrs"], doc["inputs"], doc["name"])
        assert drv.id == built.ids[key]
        nodes[key] = Node(key, drv, tuple(doc["inputs"]), Step(key, (), ("true",)))
    src = Derivation("path", {"hash": "0" * 64}, {}, "src")
    nodes["src"] = Node("src", src, (), PathSource("src", "/nonexistent"))
    fresh = Derivation("step", {"epoch": EPOCH, "builder": ["fresh"]},
                       {"image": built.ids["image"], "src": src.id}, "fresh")
    nodes["fresh"] = Node("fresh", fresh, ("image", "src"), Step("fresh", (), ("true",)))
    recipe = Recipe("r.toml", "/", EPOCH, {}, {}, {})
    return Plan(recipe, ["fresh", "link"], nodes)


def cache_with(built: Built, keys: Keys, directory: Path, *names: str) -> Cache:
    cache = open_cache(f"file://{directory}")
    report = upload(built.store, cache, [built.ids[n] for n in names], keys.private)
    assert not report.failures
    return cache


def test_plan_downloads_what_caches_hold_and_builds_the_rest(built: Built, keys: Keys,
                                                             tmp_path: Path) -> None:
    cache = cache_with(built, keys, tmp_path / "cache", "image")
    store = Store(str(tmp_path / "b"))
    substituters, failed = open_substituters([cache])
    assert failed == []
    plan = graph(built)
    decided = plan_substitution(plan, store, substituters, keys.trusted)
    assert list(decided.download) == ["image"]  # tree is not needed: image comes whole
    assert decided.build == ["link", "fresh"]
    assert decided.imports == ["src"]
    assert decided.present == []
    assert decided.download_bytes == decided.download["image"].size > 0
    assert run_downloads(plan, store, decided, substituters, keys.trusted) == []
    assert store.lookup(built.ids["image"]) is not None
    assert store.lookup(built.ids["tree"]) is None
    assert store.verify() == []  # a substitute is valid without its build inputs
    assert plan_substitution(plan, store, substituters, keys.trusted).present == ["image"]


def test_a_failing_cache_falls_back_to_the_next(built: Built, keys: Keys,
                                                tmp_path: Path) -> None:
    good = cache_with(built, keys, tmp_path / "good", "link")
    bad = cache_with(built, keys, tmp_path / "bad", "link")
    for path in (tmp_path / "bad" / "objects").iterdir():
        path.write_bytes(b"rotten")
    bad.write_bytes("cache-info", b'{"format": "reprobuild-cache/1", "priority": 10}')
    substituters, _ = open_substituters([good, bad])
    assert [s.cache for s in substituters] == [bad, good]  # priority 10 before 50
    store = Store(str(tmp_path / "b"))
    plan = graph(built)
    decided = plan_substitution(plan, store, substituters, keys.trusted)
    assert decided.download["link"].substituter.cache is bad
    assert run_downloads(plan, store, decided, substituters, keys.trusted) == []
    meta = store.metadata(built.ids["link"])
    assert meta is not None and meta["substituted"]["cache"] == good.url
    assert [w.cache_url for w in decided.warnings] == [bad.url]
    assert "object is truncated: 6 of" in decided.warnings[0].message


def test_challenge_counts_a_key_once_and_finds_disagreement(built: Built, keys: Keys,
                                                            tmp_path: Path) -> None:
    first = cache_with(built, keys, tmp_path / "c1", "tree", "image")
    second = cache_with(built, keys, tmp_path / "c2", "tree")
    subjects = [Subject("tree", built.ids["tree"]), Subject("image", built.ids["image"])]
    results, warnings = challenge_caches(subjects, built.store, [first, second], keys.trusted)
    assert warnings == []
    assert [r.agree for r in results] == [True, True]
    tree = next(r for r in results if r.target == "tree")
    ((_digest, builders),) = tree.groups
    assert len(builders) == 2  # the local store, and one key for both caches
    assert builders[0].endswith(f"({first.url}, {second.url})")
    assert "local store" in builders

    # Another builder (its own key) whose tree differs.
    other_key_path, _other_public = signing.generate_key(tmp_path / "other.key")
    other_key = signing.load_private_key(other_key_path)
    other = make_built(tmp_path / "other-store", salt=b"different")
    third = open_cache(f"file://{tmp_path / 'c3'}")
    assert not upload(other.store, third, [other.ids["tree"]], other_key).failures
    assert other.ids["tree"] == built.ids["tree"]
    trusted = {**keys.trusted, signing.key_id(other_key.public_key()): other_key.public_key()}
    results, _ = challenge_caches(subjects[:1], built.store, [first, third], trusted)
    assert not results[0].agree
    assert sorted(len(b) for _, b in results[0].groups) == [1, 2]


def test_a_substituted_entry_is_its_signer_not_a_second_builder(built: Built, keys: Keys,
                                                                tmp_path: Path) -> None:
    cache = cache_with(built, keys, tmp_path / "cache", "link")
    store = Store(str(tmp_path / "b"))
    assert substitute(store, cache, built.ids["link"], keys.trusted) is not None
    results, _ = challenge_caches([Subject("link", built.ids["link"])], store, [cache],
                                  keys.trusted)
    ((_digest, builders),) = results[0].groups
    assert len(builders) == 1
    assert builders[0].startswith("key ") and "local store" in builders[0]
