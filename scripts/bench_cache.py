#!/usr/bin/env python3
"""Binary cache benchmark, against the same transfer done by hand with curl.

1. Transfer: a 1 GiB image-like file output (each MiB half random, half zeros) is
   uploaded to a local nginx WebDAV cache (pack: canonical tar + zstd, blake3, PUT,
   signed metadata) and substituted into an empty store (GET, blake3 and size checked
   while streaming, decompress, unpack through the hardened tar reader, registration by
   the store: canonical hash, fs-verity digest, record, fsync). Reference: ``curl -T``
   and ``curl -o`` of the same file to and from the same server. Target: 300 MiB/s or
   more each way.
2. Substitution of a graph: 200 trivial steps (built once with the engine tests' fake
   runner) copied to the nginx cache; then ``reprobuild build -j 0 --substituters`` into
   an empty store (target: under 2 s) and ``build --dry-run`` of it (target: under 0.5 s).

Run once, not in a loop: the machine is shared.
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
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from bench_engine import make_recipe  # noqa: E402

from reprobuild.build.derivation import Derivation  # noqa: E402
from reprobuild.cache.backend import open_cache  # noqa: E402
from reprobuild.cache.substitute import substitute  # noqa: E402
from reprobuild.cache.upload import upload  # noqa: E402
from reprobuild.proof import records, signing  # noqa: E402
from reprobuild.store import canon  # noqa: E402
from reprobuild.store.store import Store  # noqa: E402
from tests.cache import servers  # noqa: E402

MIB = 1 << 20


def make_output(store: Store, size_mib: int) -> str:
    derivation = Derivation("image", {"epoch": 0, "bench": size_mib}, {}, "big-image")
    build_dir = store.new_build_dir("bench")
    output = os.path.join(build_dir, "out")
    with open(output, "wb") as f:
        for _ in range(size_mib):
            f.write(os.urandom(MIB // 2) + bytes(MIB // 2))
    with store.lock(derivation.id):
        store.register(derivation.id, output, derivation=derivation.to_json(), inputs={},
                       record=records.entry_record,
                       epoch=0)
    return derivation.id


def curl(args: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(["curl", "-sSf", *args], check=True)
    return time.perf_counter() - start


def rate(size_mib: int, seconds: float) -> str:
    return f"{seconds:6.2f} s {size_mib / seconds:7.0f} MiB/s"


def bench_transfer(work: Path, url: str, size_mib: int) -> None:
    key_path, _public = signing.generate_key(work / "bench.key")
    key = signing.load_private_key(key_path)
    trusted = {signing.key_id(key.public_key()): key.public_key()}
    source, target = Store(str(work / "a")), Store(str(work / "b"))
    derivation_id = make_output(source, size_mib)
    output = source.output_path(derivation_id)
    cache = open_cache(url + "/cache")
    start = time.perf_counter()
    report = upload(source, cache, [derivation_id], key)
    up = time.perf_counter() - start
    assert not report.failures, report.failures
    start = time.perf_counter()
    entry = substitute(target, cache, derivation_id, trusted)
    down = time.perf_counter() - start
    assert entry is not None and entry.hash == source.lookup(derivation_id).hash  # type: ignore[union-attr]
    curl_up = curl(["-T", output, f"{url}/raw/image"])
    curl_down = curl(["-o", str(work / "curl-copy"), f"{url}/raw/image"])
    print(f"1 GiB-class output ({size_mib} MiB, object {report.bytes_sent / MIB:.0f} MiB):")
    print(f"  upload   reprobuild {rate(size_mib, up)}   curl -T {rate(size_mib, curl_up)}")
    print(f"  download reprobuild {rate(size_mib, down)}   curl -o {rate(size_mib, curl_down)}")
    cache.close()
    for path in (work / "a", work / "b"):
        canon.remove_tree(str(path))


def reprobuild(argv: list[str], *, fake: bool = False) -> float:
    """Run the CLI in a fresh process as a user would; its wall time."""
    module = "tests.build.fakecli" if fake else "reprobuild"
    env = {**os.environ, "PYTHONPATH": str(REPO), "XDG_CONFIG_HOME": "/nonexistent"}
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", module, *argv], env=env,
                            capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"bench_cache: reprobuild {' '.join(argv[:2])} failed:\n"
                 f"{result.stderr[-3000:]}")
    return elapsed


def bench_graph(work: Path, url: str, steps: int) -> None:
    recipe = str(make_recipe(work, steps))
    key, public = signing.generate_key(work / "graph.key")
    cache = f"{url}/graph"
    built = reprobuild(["build", "--store", str(work / "ga"), "-j", "2", "--no-out-link",
                        recipe], fake=True)
    copied = reprobuild(["copy", "--store", str(work / "ga"), "--to", cache, "--key",
                         str(key), "-j", "8", recipe])
    options = ["--substituters", cache, "--trusted-keys", str(public), "--no-out-link",
               recipe]
    dry = reprobuild(["build", "--store", str(work / "gb"), "--dry-run", *options])
    substituted = reprobuild(["build", "--store", str(work / "gb"), "-j", "0", *options])
    noop = reprobuild(["build", "--store", str(work / "gb"), "-j", "0", *options])
    entries = Store(str(work / "gb")).paths()
    substituted_count = sum(1 for e in entries
                            if (Store(str(work / "gb")).metadata(e.derivation_id) or {})
                            .get("substituted"))
    print(f"{steps}-step graph (+1 step depending on all), every step a target:")
    print(f"  local build (fake runner, -j 2) {built:6.2f} s; copy --to {copied:6.2f} s")
    print(f"  build --dry-run, empty store     {dry:6.2f} s   (target < 0.5 s)")
    print(f"  build -j 0, empty store          {substituted:6.2f} s   (target < 2 s; "
          f"{substituted_count} outputs substituted, {len(entries)} in the store)")
    print(f"  build -j 0 again (all present)   {noop:6.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--only", choices=("transfer", "graph"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-cache-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        with servers.nginx(work / "nginx") as (url, _www):
            if args.only != "graph":
                bench_transfer(work, url, args.size_mib)
            if args.only != "transfer":
                bench_graph(work, url, args.steps)


if __name__ == "__main__":
    main()
