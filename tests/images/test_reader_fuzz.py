"""Every image reader survives damaged images: only ReprobuildError, bounded memory.

Each format's small valid image is mutated with a fixed seed (see
:mod:`tests.images.reader_fuzz`) and read back in a subprocess whose address space is
capped; a traceback, a MemoryError or a hang is a failure that names the mutation.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO
from tests.images.reader_fuzz import VARIANTS

QUICK = 400  # mutants per variant in the default run: about a second or two each
QUICK_DIFF = 150
LONG = 5000


def run_fuzzer(variant: str, count: int, seed: int, *extra: str) -> dict[str, object]:
    result = subprocess.run(
        [sys.executable, "-m", "tests.images.reader_fuzz", variant, "--count", str(count),
         "--seed", str(seed), *extra], cwd=REPO, capture_output=True, text=True, timeout=900,
        check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    summary: dict[str, object] = json.loads(result.stdout)
    return summary


def _report(summary: dict[str, object]) -> str:
    crashes = summary["crashes"]
    assert isinstance(crashes, list)
    return "\n".join(f"{c['mutation']}: {c['error']}\n{c['where']}" for c in crashes[:5])


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_mutated_images_give_only_clean_errors(variant: str) -> None:
    summary = run_fuzzer(variant, QUICK, seed=1)
    assert summary["crashes"] == [], _report(summary)
    assert summary["mutants"] == QUICK


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_diff_against_mutated_images_gives_only_clean_errors(variant: str) -> None:
    summary = run_fuzzer(variant, QUICK_DIFF, 3, "--via-diff")
    assert summary["crashes"] == [], _report(summary)


@pytest.mark.slow
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_mutated_images_long_run(variant: str) -> None:
    summary = run_fuzzer(variant, LONG, seed=2)
    assert summary["crashes"] == [], _report(summary)
    summary = run_fuzzer(variant, LONG // 5, 4, "--via-diff")
    assert summary["crashes"] == [], _report(summary)
