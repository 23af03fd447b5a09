"""Derivation ids: stable under everything that cannot change an output, sensitive to the rest."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reprobuild.build.derivation import Derivation, NotCanonical, derivation_from_json, encode
from reprobuild.build.plan import plan
from reprobuild.build.recipe import load_recipe

names = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1,
                max_size=8)
scalars = st.none() | st.booleans() | st.integers(-(1 << 63), (1 << 64) - 1) | names
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(names, inner, max_size=4), max_leaves=20)
attrs_st = st.dictionaries(names, values, max_size=6)
inputs_st = st.dictionaries(names, st.text("0123456789abcdef", min_size=64, max_size=64),
                            max_size=4)


def shuffled(mapping: dict[str, object], seed: int) -> dict[str, object]:
    items = list(mapping.items())
    random.Random(seed).shuffle(items)
    return {k: shuffled(v, seed) if isinstance(v, dict) else v  # type: ignore[arg-type]
            for k, v in items}


@settings(max_examples=200, deadline=None)
@given(attrs=attrs_st, inputs=inputs_st, seed=st.integers(0, 1000))
def test_id_ignores_key_order_and_name(attrs: dict[str, object], inputs: dict[str, str],
                                       seed: int) -> None:
    a = Derivation("step", attrs, inputs, name="one")
    b = Derivation("step", shuffled(attrs, seed), shuffled(inputs, seed),  # type: ignore[arg-type]
                   name="two")
    assert a.id == b.id
    assert derivation_from_json(a.to_json()).id == a.id


@settings(max_examples=200, deadline=None)
@given(attrs=attrs_st, inputs=inputs_st, key=names, value=values)
def test_id_changes_with_any_attribute(attrs: dict[str, object], inputs: dict[str, str],
                                       key: str, value: object) -> None:
    base = Derivation("step", attrs, inputs)
    changed = dict(attrs)
    changed[key] = value
    other = Derivation("step", changed, inputs)
    assert (other.id == base.id) == (encode(changed) == encode(attrs))


@settings(max_examples=100, deadline=None)
@given(inputs=inputs_st.filter(bool), data=st.data())
def test_id_changes_with_input_ids(inputs: dict[str, str], data: st.DataObject) -> None:
    name = data.draw(st.sampled_from(sorted(inputs)))
    new = data.draw(st.text("0123456789abcdef", min_size=64, max_size=64))
    base = Derivation("step", {"builder": ["x"]}, inputs)
    other = Derivation("step", {"builder": ["x"]}, {**inputs, name: new})
    assert (other.id == base.id) == (new == inputs[name])


@pytest.mark.parametrize("bad", [1.5, b"bytes", {1: "x"}, {"k": {2.0}}, 1 << 70])
def test_no_canonical_encoding(bad: object) -> None:
    with pytest.raises(NotCanonical):
        encode({"v": bad})


def test_bool_and_int_are_distinct() -> None:
    assert Derivation("s", {"v": True}).id != Derivation("s", {"v": 1}).id
    assert Derivation("s", {"v": "1"}).id != Derivation("s", {"v": 1}).id
    assert Derivation("s", {"v": []}).id != Derivation("s", {"v": None}).id


RECIPE = """\
epoch = {epoch}
# a comment
[sources.sh]
host = "/bin/sh"
[sources.files]
path = "files"
[steps.a]
inputs = ["sh", "files"]
builder = ["sh", "-c", "{script}"]
env = {{ B = "2", A = "1" }}
"""

REORDERED = """\
[steps.a]
env = {{ A = "1", B = "2" }}   # same values, other order
builder = ["sh", "-c", "{script}"]
inputs = ["sh", "files"]

[sources.files]
path = "files"

[sources.sh]
host = "/bin/sh"
epoch = {epoch}
"""


def recipe_id(directory: Path, template: str, **values: object) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "files").mkdir(exist_ok=True)
    (directory / "files" / "f").write_text("content\n")
    if "epoch = " in template.split("\n", 1)[0] or not template.startswith("["):
        text = template.format(**values)
    else:  # TOML: top-level keys must come before tables
        text = f"epoch = {values['epoch']}\n" + template.replace("epoch = {epoch}\n", "")
        text = text.format(**values)
    path = directory / "recipe.toml"
    path.write_text(text)
    return plan(load_recipe(str(path)), ["a"]).nodes["a"].id


def test_recipe_ids_ignore_location_key_order_and_comments(tmp_path: Path) -> None:
    base = recipe_id(tmp_path / "one", RECIPE, epoch=1, script="true")
    assert recipe_id(tmp_path / "elsewhere" / "deeper", RECIPE, epoch=1, script="true") == base
    assert recipe_id(tmp_path / "three", REORDERED, epoch=1, script="true") == base
    old = os.getcwd()
    try:
        os.chdir(tmp_path)
        assert recipe_id(Path("rel"), RECIPE, epoch=1, script="true") == base
    finally:
        os.chdir(old)


def test_recipe_ids_follow_epoch_script_and_input_content(tmp_path: Path) -> None:
    base = recipe_id(tmp_path / "a", RECIPE, epoch=1, script="true")
    assert recipe_id(tmp_path / "b", RECIPE, epoch=2, script="true") != base
    assert recipe_id(tmp_path / "c", RECIPE, epoch=1, script="false") != base
    (tmp_path / "d" / "files").mkdir(parents=True)
    (tmp_path / "d" / "files" / "extra").write_text("x")
    assert recipe_id(tmp_path / "d", RECIPE, epoch=1, script="true") != base


def test_image_ids_follow_writer_version_identity_and_reprobuild_version(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import reprobuild.build.plan as plan_module
    from reprobuild.images import tar

    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "f").write_text("x")
    path = tmp_path / "r.toml"
    path.write_text('[sources.files]\npath = "files"\n'
                    '[images.img]\nfrom = "files"\nformat = "tar"\n')

    def image_id() -> str:
        return plan(load_recipe(str(path))).nodes["img"].id

    base = image_id()
    monkeypatch.setattr(tar, "VERSION", "changed")
    after_writer = image_id()
    monkeypatch.setattr(tar, "identity", lambda options: {"compressor": "other"})
    after_identity = image_id()
    monkeypatch.setattr(plan_module, "__version__", "9.9.9")
    after_reprobuild = image_id()
    assert len({base, after_writer, after_identity, after_reprobuild}) == 4
