"""Time the boot tests of recipes/bootable-disk.toml under QEMU TCG, same run as a bare boot.

Ours: ``reprobuild test --json`` (the ``direct`` kernel + initramfs boot and the ``uefi``
boot through OVMF, the systemd stub and the UKI), each until the verified root has printed
its lines. Reference: the same kernel under the same QEMU flags with no initramfs and
``panic=-1``, which runs until the kernel fails to find a root and QEMU exits: what the
machine needs to boot this kernel at all. Best of N each, alternating; prints seconds and
ratios (ours / bare kernel). The goal of issue 17 is under 60 s for the boot test.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "bootable-disk.toml"
KERNEL_PATH = "boot/vmlinuz-6.1.0-57-cloud-amd64"


def reprobuild(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "reprobuild", *args], capture_output=True,
                          text=True, check=False)


def bare_kernel(kernel: str) -> float:
    start = time.monotonic()
    subprocess.run(["qemu-system-x86_64", "-machine", "q35", "-accel", "tcg", "-m", "512M",
                    "-smp", "1", "-nodefaults", "-no-user-config", "-display", "none",
                    "-serial", "stdio", "-no-reboot", "-kernel", kernel,
                    "-append", "console=ttyS0 panic=-1"],
                   stdin=subprocess.DEVNULL, capture_output=True, timeout=300, check=False)
    return time.monotonic() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", help="store directory (default: a temporary one)")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each (best kept)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-boot-") as tmp:
        store = args.store or os.path.join(tmp, "store")
        built = reprobuild("build", "--json", "--no-out-link", "--store", store, str(RECIPE),
                           "kernel", "initrd", "uki", "disk")
        if built.returncode != 0:
            print(built.stderr, file=sys.stderr)
            return 2
        paths = {row["target"]: row["path"] for row in json.loads(built.stdout)}
        kernel = os.path.join(paths["kernel"], KERNEL_PATH)
        ours: dict[str, list[float]] = {}
        bare: list[float] = []
        for _ in range(args.repeat):
            bare.append(bare_kernel(kernel))
            tested = reprobuild("test", "--json", "--store", store, str(RECIPE))
            for row in json.loads(tested.stdout or "[]"):
                if not row["ok"]:
                    print(f"test {row['test']} failed: {row['reason']}", file=sys.stderr)
                    return 1
                ours.setdefault(row["test"], []).append(float(row["seconds"]))
    reference = min(bare)
    print(f"bare kernel to its root-mount panic (TCG): {reference:.1f} s")
    for name, seconds in ours.items():
        print(f"test {name}: {min(seconds):.1f} s ({min(seconds) / reference:.2f}x the bare "
              f"kernel; goal < 60 s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
