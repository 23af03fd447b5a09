#!/usr/bin/env python3
"""Planning benchmark: `reprobuild show` of recipes of 10,000 steps in three shapes.

Shapes: a chain declared in order (each step the input of the next), the same chain
declared in reverse order, and a wide fan-in (one step with every other step as input).
Each is timed as a user runs it, a fresh ``reprobuild show`` process (reading the recipe,
validating it, checking for cycles and planning every derivation the target needs),
best of ``--repeat``. Target on a 2-core machine: under 2 s each. ``--build`` also times
a cold and a no-op build of each with the engine tests' null runner (the engine's graph
walk and the store's bookkeeping, no sandbox). Reference: ``python3 -c pass`` in the same
run, the cost of starting any Python command.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHAPES = ("chain", "reverse-chain", "fan-in")


def make_recipe(directory: Path, shape: str, steps: int) -> tuple[Path, str]:
    """The recipe file and the target whose closure is every step."""
    names = [f"s{i:05d}" for i in range(steps)]
    tables = []
    for i, name in enumerate(names):
        last = i == steps - 1
        inputs = names[i - 1:i] if shape != "fan-in" else names[:-1] if last else []
        listed = ", ".join(f'"{n}"' for n in ["sh", *inputs])
        tables.append(f'[steps.{name}]\ninputs = [{listed}]\n'
                      f'builder = ["sh", "-c", "echo {i} > $out"]\n')
    if shape == "reverse-chain":
        tables.reverse()
    path = directory / f"{shape}.toml"
    path.write_text('epoch = 1700000000\n[sources.sh]\nhost = "/bin/sh"\n' + "".join(tables))
    return path, names[-1]


def timed(argv: list[str], repeat: int, runner: str = "null") -> float:
    env = {**os.environ, "PYTHONPATH": str(REPO), "REPROBUILD_TEST_RUNNER": runner}
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        result = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
        best = min(best, time.perf_counter() - start)
        if result.returncode != 0:
            sys.exit(f"bench_plan: {' '.join(argv[:4])} failed:\n{result.stderr[-3000:]}")
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=2, help="best of N runs each")
    parser.add_argument("--build", action="store_true",
                        help="also time a cold and a no-op build with the null runner")
    args = parser.parse_args()
    python = timed([sys.executable, "-c", "pass"], args.repeat)
    print(f"reference: python startup {python:.3f} s")
    with tempfile.TemporaryDirectory(prefix="reprobuild-bench-") as tmp:
        root = Path(tmp)
        for shape in SHAPES:
            recipe, target = make_recipe(root, shape, args.steps)
            store = str(root / f"store-{shape}")
            show = timed([sys.executable, "-m", "reprobuild", "show", "--store", store,
                          str(recipe), target], args.repeat)
            line = (f"{shape}, {args.steps} steps: show {show:.2f} s (target < 2 s, "
                    f"{show / 2:.2f}x of target)")
            if args.build:
                build = [sys.executable, "-m", "tests.build.fakecli", "build", "--store",
                         store, "--no-out-link", str(recipe), target]
                cold = timed(build, 1)
                noop = timed(build, args.repeat)
                line += f"; null-runner build cold {cold:.2f} s, no-op {noop:.2f} s"
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
