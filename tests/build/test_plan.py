"""Long chains end to end: planned and built without recursion (times: bench_plan.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from reprobuild.build.engine import Engine, Options
from reprobuild.build.plan import plan
from reprobuild.build.progress import Progress
from reprobuild.build.recipe import load_recipe
from reprobuild.store.store import Store
from tests.build.fakes import NullRunner


def graph(n: int, shape: str) -> str:
    """``n`` steps, each the input of the next, declared in order or in reverse."""
    tables = []
    for i in range(n):
        listed = f'"s{i - 1:05d}"' if i else ""
        tables.append(f'[steps.s{i:05d}]\ninputs = [{listed}]\n'
                      f'builder = ["/bin/sh", "-c", "echo {i} > $out"]\n')
    return "".join(reversed(tables) if shape == "reverse" else tables)


@pytest.mark.parametrize("shape", ["chain", "reverse"])
def test_a_large_graph_is_planned_and_built(tmp_path: Path, shape: str) -> None:
    n = 1200
    path = tmp_path / "r.toml"
    path.write_text(graph(n, shape))
    last = f"s{n - 1:05d}"
    built_plan = plan(load_recipe(str(path)), [last])
    assert len(built_plan.nodes) == n
    runner = NullRunner()
    engine = Engine(Store(str(tmp_path / "store")), lambda: runner, Options(jobs=2),
                    Progress(enabled=False))
    report = engine.build(built_plan)
    engine.close()
    assert report.ok, report.failures[:1]
    assert len(report.built) == n
    assert Path(report.entries[last].path).read_text() == f"/bin/sh -c echo {n - 1} > $out"
