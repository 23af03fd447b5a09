"""Recipe validation: errors name the file, table and key and suggest the nearest key."""

from __future__ import annotations

from pathlib import Path

import pytest

from reprobuild.build.plan import plan
from reprobuild.build.recipe import DebSource, HostSource, PathSource, load_recipe, parse_size
from reprobuild.errors import RecipeError


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "r.toml"
    path.write_text(text)
    return str(path)


GOOD = """
epoch = 1700000000
[sources.bb]
host = "/bin/busybox"
[sources.files]
path = "files"
[sources.busybox]
deb = "busybox-static"
version = "1:1.35.0-4+deb12u1+b1"
sha256 = "%s"
[steps.rootfs]
inputs = ["bb", "files"]
builder = ["bb", "sh", "-c", "mkdir $out"]
env = { GREETING = "hi" }
timeout = "5m"
""" % ("0" * 64)


def test_good_recipe(tmp_path: Path) -> None:
    recipe = load_recipe(write(tmp_path, GOOD))
    assert recipe.epoch == 1700000000
    assert isinstance(recipe.sources["bb"], HostSource)
    files = recipe.sources["files"]
    assert isinstance(files, PathSource) and files.path == str(tmp_path / "files")
    assert isinstance(recipe.sources["busybox"], DebSource)
    step = recipe.steps["rootfs"]
    assert step.timeout == 300 and step.env == (("GREETING", "hi"),)
    assert recipe.default_targets() == ["rootfs"]
    assert recipe.closure(["rootfs"]) == ["bb", "files", "rootfs"]


@pytest.mark.parametrize(("text", "needles"), [
    ('[steps.a]\ninputs = []\nbulder = ["/bin/true"]\n',
     ["r.toml", "[steps.a]", "'bulder'", "did you mean 'builder'"]),
    ('epoc = 1\n', ["[top level]", "'epoc'", "did you mean 'epoch'"]),
    ('[sources.x]\npth = "a"\n', ["[sources.x]", "did you mean 'path'"]),
    ('[sources.x]\ndeb = "p"\nversion = "1"\nsha256 = "zz"\n',
     ["[sources.x] sha256", "hex"]),
    ('[sources.x]\nhost = "bin/tar"\n', ["[sources.x] host", "absolute"]),
    ('[sources.x]\nocl = "layout"\n', ["[sources.x]", "did you mean 'oci'"]),
    ('[sources.x]\noci = "layout"\npath = "root"\n', ["[sources.x]", "exactly one", "'oci'"]),
    ('[sources.x]\noci = "layout"\nplatfrm = "linux/amd64"\n',
     ["[sources.x] platfrm", "unknown key"]),
    ('[sources.x]\noci = "layout"\nblake3 = "zz"\n', ["[sources.x] blake3", "hex"]),
    ('[steps.a]\ninputs = ["nope"]\nbuilder = ["/bin/true"]\n',
     ["[steps.a] inputs", "'nope'"]),
    ('[steps.a]\ninputs = []\nbuilder = ["tar", "x"]\n',
     ["[steps.a] builder", "'tar' names no input"]),
    ('[steps.a]\nbuilder = ["/bin/true"]\ntimeout = "forever"\n', ["[steps.a] timeout"]),
    ('[steps.a]\nbuilder = ["/bin/true"]\nenv = { out = "x" }\n', ["env.out"]),
    ('[images.i]\nfrom = "a"\nformat = "ext5"\n', ["[images.i] format", "ext5"]),
    ('[steps.a]\nbuilder = ["/bin/true"]\n[images.a]\nfrom = "a"\nformat = "tar"\n',
     ["already used"]),
    ('epoch = 1\nepoch = 2\n', ["not valid TOML"]),
    # NUL bytes: no argv word, environment entry or path can hold one.
    ('[steps.a]\nbuilder = ["/bin/sh", "-c", "echo a\\u0000b"]\n',
     ["[steps.a] builder[2]", "NUL byte"]),
    ('[steps.a]\nbuilder = ["/bin/true"]\nenv = { GREETING = "h\\u0000i" }\n',
     ["[steps.a] env.GREETING", "NUL byte"]),
    ('[steps.a]\nbuilder = ["/bin/true"]\nenv = { "GREE\\u0000TING" = "hi" }\n',
     ["[steps.a] env.'GREE\\x00TING'", "NUL byte"]),
    ('[sources.x]\npath = "fi\\u0000les"\n', ["[sources.x] path", "NUL byte"]),
    ('[sources.x]\nhost = "/bin/s\\u0000h"\n', ["[sources.x] host", "NUL byte"]),
    ('[steps.a]\nbuilder = ["/bin/true"]\n[images.i]\nfrom = "a"\nformat = "tar"\n'
     '[images.i.files."/etc/x"]\nmode = "0644"\nowner = "r\\u0000t"\n',
     ["[images.i] files./etc/x", "NUL byte"]),
])
def test_recipe_errors(tmp_path: Path, text: str, needles: list[str]) -> None:
    with pytest.raises(RecipeError) as info:
        load_recipe(write(tmp_path, text))
    message = str(info.value)
    for needle in needles:
        assert needle in message, message


def test_cycle_is_reported_with_the_cycle(tmp_path: Path) -> None:
    text = "".join(f'[steps.{a}]\ninputs = ["{b}"]\nbuilder = ["/bin/true"]\n'
                   for a, b in (("a", "b"), ("b", "c"), ("c", "a")))
    with pytest.raises(RecipeError, match="cycle: a -> b -> c -> a"):
        load_recipe(write(tmp_path, text))


def test_unknown_target_suggests(tmp_path: Path) -> None:
    recipe = load_recipe(write(tmp_path, GOOD))
    with pytest.raises(RecipeError, match="did you mean 'rootfs'"):
        recipe.closure(["rootf"])


def test_missing_file() -> None:
    with pytest.raises(RecipeError, match="no such recipe file"):
        load_recipe("/nonexistent/recipe.toml")


def test_sizes() -> None:
    assert parse_size("64M") == 64 << 20
    assert parse_size("1GiB") == 1 << 30
    assert parse_size("min") is None
    assert parse_size(4096) == 4096
    with pytest.raises(ValueError):
        parse_size("lots")


def chain(n: int, *, reverse: bool) -> str:
    """A recipe of ``n`` steps, each the input of the next, declared in either order."""
    tables = []
    for i in range(n):
        inputs = f'"s{i - 1:05d}"' if i else ""
        tables.append(f'[steps.s{i:05d}]\ninputs = [{inputs}]\n'
                      f'builder = ["/bin/sh", "-c", "echo {i} > $out"]\n')
    return "".join(reversed(tables) if reverse else tables)


@pytest.mark.parametrize("reverse", [False, True])
def test_long_chains_plan_without_recursion(tmp_path: Path, reverse: bool) -> None:
    # 1,100 steps declared in reverse order used to hit Python's recursion limit.
    n = 3000
    recipe = load_recipe(write(tmp_path, chain(n, reverse=reverse)))
    last = f"s{n - 1:05d}"
    assert recipe.closure([last]) == [f"s{i:05d}" for i in range(n)]
    built = plan(recipe, [last])
    assert list(built.nodes) == [f"s{i:05d}" for i in range(n)]
    first = built.nodes["s00000"].derivation.id
    assert built.nodes["s00001"].derivation.inputs == {"s00000": first}


def test_long_cycle_is_reported_without_recursion(tmp_path: Path) -> None:
    text = chain(3000, reverse=True).replace('inputs = []', 'inputs = ["s02999"]')
    with pytest.raises(RecipeError) as info:
        load_recipe(write(tmp_path, text))
    cycle = str(info.value).split("dependency cycle: ", 1)[1].split("\n")[0].split(" -> ")
    assert len(cycle) == 3001 and cycle[0] == cycle[-1]
    assert sorted(set(cycle)) == [f"s{i:05d}" for i in range(3000)]


def test_unknown_target_hint_lists_a_bounded_number_of_names(tmp_path: Path) -> None:
    recipe = load_recipe(write(tmp_path, chain(500, reverse=False)))
    with pytest.raises(RecipeError) as info:
        recipe.closure(["s0499"])
    assert "did you mean 's00499'" in str(info.value)
    assert "(470 more)" in str(info.value) and len(str(info.value)) < 1000


def test_missing_path_source_names_recipe_and_table(tmp_path: Path) -> None:
    path = write(tmp_path, '[sources.files]\npath = "nothing-here"\n')
    with pytest.raises(RecipeError) as info:
        plan(load_recipe(path))
    assert str(info.value).startswith(f"{path}: [sources.files] path: ")
    assert "does not exist" in str(info.value)


@pytest.mark.parametrize("where", ["store", "deep/in/it/store"])
def test_store_inside_a_path_source_is_refused(tmp_path: Path, where: str) -> None:
    (tmp_path / "files").mkdir()
    path = write(tmp_path, '[sources.here]\npath = "."\n[sources.files]\npath = "files"\n')
    store = tmp_path / where
    store.mkdir(parents=True)
    recipe = load_recipe(path)
    with pytest.raises(RecipeError) as info:
        plan(recipe, ["here"], store=str(store))
    assert str(info.value).startswith(f"{path}: [sources.here] path: ")
    assert f"contains the store {store}" in str(info.value)
    assert "--store" in (info.value.hint or "")
    # A source beside the store is fine.
    assert "files" in plan(recipe, ["files"], store=str(store)).nodes
