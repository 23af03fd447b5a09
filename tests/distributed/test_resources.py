"""A step's ``cores``: parsed, out of its id, in its sandbox, and Dask resources."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from reprobuild.build import limits, sandboxing
from reprobuild.build.plan import plan
from reprobuild.build.recipe import Recipe, parse_recipe
from reprobuild.distributed.executor import task_resources
from reprobuild.errors import RecipeError

BASE = """\
epoch = 1700000000
[sources.bb]
host = "/bin/busybox"
[steps.s]
inputs = ["bb"]
builder = ["bb", "sh", "-c", "echo hi > $out"]
"""
IMAGE = '[images.i]\nfrom = "s"\nformat = "tar"\n[images.i.limits]\nmemory = "6G"\n'


def _recipe(text: str) -> Recipe:
    return parse_recipe(tomllib.loads(text), path="r.toml", directory="/")


def test_cores_reach_the_sandbox_and_stay_out_of_the_id(tmp_path: Path) -> None:
    plain = plan(_recipe(BASE + IMAGE))
    four = plan(_recipe(BASE + "cores = 4\n" + IMAGE))
    assert {k: n.id for k, n in plain.nodes.items()} == {k: n.id for k, n in four.nodes.items()}
    inputs = {"bb": (four.nodes["bb"], str(tmp_path))}
    spec = sandboxing.step_spec(four.nodes["s"], inputs, str(tmp_path), str(tmp_path),
                                epoch=1, cores=1)
    assert spec.cores == 4
    spec = sandboxing.step_spec(plain.nodes["s"], inputs, str(tmp_path), str(tmp_path),
                                epoch=1, cores=3)
    assert spec.cores == 3  # undeclared: the build's -j, as before


def test_steps_and_images_take_their_cores_and_memory_limit_as_resources() -> None:
    built = plan(_recipe(BASE + 'cores = 4\n[steps.s.limits]\nmemory = "8G"\n' + IMAGE))
    assert task_resources(built.nodes["s"]) == {"cores": 4.0, "memory": float(8 << 30)}
    assert task_resources(built.nodes["i"]) == {"cores": 1.0, "memory": float(6 << 30)}
    assert task_resources(built.nodes["bb"]) == {"cores": 1.0}
    default = plan(_recipe(BASE)).nodes["s"]
    assert task_resources(default) == {"cores": 1.0, "memory": float(limits.DEFAULTS.memory
                                                                     or 0)}


@pytest.mark.parametrize("value", ["0", "-2", '"4"', "true"])
def test_bad_cores_name_the_key(value: str) -> None:
    with pytest.raises(RecipeError) as caught:
        _recipe(BASE + f"cores = {value}\n")
    assert "[steps.s] cores:" in caught.value.message
