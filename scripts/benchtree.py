"""A deterministic benchmark tree: like a distribution root, ~N files and ~M megabytes.

Content is a mix of compressible text-like data and incompressible bytes (blake3 XOF of
a fixed seed), sizes follow a skewed distribution, directories nest a few levels. The
same arguments always give the same tree.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import blake3


def make_tree(root: Path, *, files: int = 10_000, megabytes: int = 200) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    budget = megabytes << 20
    # Sizes: most files small, a few large (as in /usr).
    weights = [(1 + (i * 7919) % 97) ** 3 for i in range(files)]
    scale = budget / sum(weights)
    words = b"lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod\n"
    for i in range(files):
        size = int(weights[i] * scale)
        d = root / f"d{i % 37:02d}" / f"s{i % 11}"
        d.mkdir(parents=True, exist_ok=True)
        path = d / f"file{i:05d}.dat"
        if i % 3 == 0:
            data = blake3.blake3(i.to_bytes(4, "little")).digest(length=size)
        else:
            data = (words * (size // len(words) + 1))[:size]
        path.write_bytes(data)
        os.chmod(path, 0o755 if i % 10 == 0 else 0o644)
        if i % 50 == 0:
            link = d / f"link{i:05d}"
            if not link.exists():
                link.symlink_to(path.name)
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("path", type=Path)
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--megabytes", type=int, default=200)
    args = parser.parse_args()
    make_tree(args.path, files=args.files, megabytes=args.megabytes)


if __name__ == "__main__":
    main()
