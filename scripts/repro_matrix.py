#!/usr/bin/env python3
"""Every shipped recipe x each host variation -> identical or not, as a table.

Builds each recipe once into a store (default: a temporary one), then for every
variation of `reprobuild check` rebuilds it with that variation alone and compares bit
for bit. Exit 0 when every cell is identical, 1 when one differs, 2 on an error.

    scripts/repro_matrix.py [--deep] [--store DIR] [--variations a,b] [RECIPE...]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from reprobuild.errors import ReprobuildError  # noqa: E402
from reprobuild.proof import check, variations  # noqa: E402
from reprobuild.store import canon  # noqa: E402


def cell(recipe: str, store: str, variation: str, *, deep: bool) -> str:
    try:
        result = check.run_check(recipe, [], store, deep=deep, chosen=(variation,),
                                 mark=False)
    except ReprobuildError as exc:
        print(f"{Path(recipe).name} x {variation}: error: {exc}", file=sys.stderr)
        return "error"
    rnd = result.rounds[0]
    if variation not in rnd.variations:
        return "skipped"
    if result.identical:
        return "identical"
    for out in rnd.outputs:
        if not out.identical and out.report is not None:
            where = ", ".join(f"{p or '/'} ({k})" for p, k in out.report.summary()[:3])
            print(f"{Path(recipe).name} x {variation}: {out.name} differs: {where}",
                  file=sys.stderr)
    return "DIFFERS"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipes", nargs="*", help="recipes (default: recipes/*.toml)")
    parser.add_argument("--store", help="store to build into (default: a temporary one)")
    parser.add_argument("--deep", action="store_true", help="rebuild whole chains")
    parser.add_argument("--variations", default=None, help="comma-separated subset")
    args = parser.parse_args()
    recipes = args.recipes or [str(p) for p in sorted((REPO / "recipes").glob("*.toml"))]
    chosen = variations.parse_variations(args.variations)
    tmp = None if args.store else tempfile.mkdtemp(prefix="reprobuild-matrix-")
    store = args.store or str(Path(tmp or "", "store"))
    rows: list[tuple[str, list[str]]] = []
    try:
        for recipe in recipes:
            rows.append((Path(recipe).name, [cell(recipe, store, v, deep=args.deep)
                                             for v in chosen]))
    finally:
        if tmp:
            canon.remove_tree(tmp)
    width = max([len("recipe"), *(len(name) for name, _ in rows)])
    cols = [max(len(v), 9) for v in chosen]
    for name, cells in [("recipe", list(chosen)), *rows]:
        line = "  ".join(c.ljust(w) for c, w in zip(cells, cols, strict=True))
        print((name.ljust(width) + "  " + line).rstrip())
    flat = [c for _, cells in rows for c in cells]
    if "error" in flat:
        return 2
    return 1 if "DIFFERS" in flat else 0


if __name__ == "__main__":
    sys.exit(main())
