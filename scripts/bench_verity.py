"""Time our dm-verity format and fs-verity digest against veritysetup and fsverity.

Makes a deterministic 1 GiB file (blake3 output stream of a fixed key), warms the page
cache, then runs each pair alternately (best of --runs) in the same run and prints the
ratios ours/reference. Target: at most 1.2 each. Also checks the outputs are identical.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import blake3

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from reprobuild.integrity import fsverity, verity

SALT = bytes.fromhex("5eed" * 16)
UUID = "6b1a5e0d-2c3f-4a5b-8c7d-9e0f1a2b3c4d"
TARGET = 1.2


def make_data(path: Path, size: int) -> None:
    stream = blake3.blake3(b"reprobuild bench_verity")
    chunk = 16 << 20
    with path.open("wb") as f:
        for offset in range(0, size, chunk):
            f.write(stream.digest(length=min(chunk, size - offset), seek=offset))


def best(runs: int, fn: Callable[[], object]) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=1 << 30, help="data size in bytes")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None, help="scratch directory")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-verity-", dir=args.dir) as tmp:
        data = Path(tmp) / "data"
        make_data(data, args.size)
        with data.open("rb") as f:  # warm the page cache
            while f.read(64 << 20):
                pass
        ref_hash, our_hash = Path(tmp) / "ref.hash", Path(tmp) / "our.hash"

        def reference_format() -> None:
            if ref_hash.exists():
                ref_hash.unlink()
            subprocess.run(["veritysetup", "format", str(data), str(ref_hash),
                            f"--salt={SALT.hex()}", f"--uuid={UUID}"], check=True,
                           capture_output=True)

        def ours_format() -> None:
            verity.format(data, our_hash, salt=SALT, uuid=UUID)

        def ours_format_derived() -> None:
            verity.format(data, Path(tmp) / "derived.hash")

        def reference_digest() -> None:
            subprocess.run(["fsverity", "digest", str(data)], check=True, capture_output=True)

        def ours_digest() -> None:
            fsverity.digest_file(data)

        ref_v = our_v = ref_f = our_f = derived = float("inf")
        for _ in range(args.runs):  # interleave so machine noise hits both sides
            ref_v = min(ref_v, best(1, reference_format))
            our_v = min(our_v, best(1, ours_format))
            ref_f = min(ref_f, best(1, reference_digest))
            our_f = min(our_f, best(1, ours_digest))
            derived = min(derived, best(1, ours_format_derived))
        identical = ref_hash.read_bytes() == our_hash.read_bytes()
        expected = subprocess.run(["fsverity", "digest", str(data)], check=True,
                                  capture_output=True, text=True).stdout.split()[0]
        same_digest = fsverity.format_digest(fsverity.digest_file(data)) == expected
    size_mib = args.size / (1 << 20)
    ratio_v, ratio_f = our_v / ref_v, our_f / ref_f
    print(f"data: {size_mib:.0f} MiB, best of {args.runs}, {os.cpu_count()} CPUs")
    print(f"dm-verity format: veritysetup {ref_v:.3f} s, ours {our_v:.3f} s, "
          f"ratio {ratio_v:.2f} (hash file identical: {identical})")
    print(f"  ours with salt and UUID derived from the data: {derived:.3f} s, "
          f"ratio {derived / ref_v:.2f}")
    print(f"fs-verity digest: fsverity {ref_f:.3f} s, ours {our_f:.3f} s, "
          f"ratio {ratio_f:.2f} (digest equal: {same_digest})")
    ok = identical and same_digest and ratio_v <= TARGET and ratio_f <= TARGET
    print(f"target ratio <= {TARGET}: {'met' if ok else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
