"""Recipe validation: errors name the file, table and key and suggest the nearest key."""

from __future__ import annotations

from pathlib import Path

import pytest

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
