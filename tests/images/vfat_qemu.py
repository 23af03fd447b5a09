"""The kernel's reading of a FAT image, where this host's kernel has no vfat: the image is
attached to a QEMU guest running Debian's cloud kernel, whose init (busybox, from our own
cpio writer) mounts it read-only with ``tz=UTC`` and prints every path, each file's mtime
and sha256 on the serial console."""

from __future__ import annotations

import hashlib
import io
import shutil
import subprocess
from pathlib import Path

from reprobuild.images import cpio
from reprobuild.images.registry import ImageOptions
from reprobuild.trees.tree import Content, Entry, EntryType, FileSource, Tree
from tests.conftest import need, need_tool

KERNEL_PACKAGE = "linux-image-6.1.0-57-cloud-amd64"
KERNEL_VERSION = "6.1.192-3"
MODULES = ("virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev",
           "virtio_pci", "virtio_blk", "fat", "vfat", "nls_cp437", "nls_utf8", "nls_ascii",
           "nls_iso8859-1")
END = "VFAT-LISTING-END"
INIT = f"""#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t devtmpfs dev /dev
for module in {" ".join(MODULES)}; do insmod /modules/$module.ko; done
for i in $(seq 100); do [ -b /dev/vda ] && break; sleep 0.1; done
mount -t vfat -o ro,tz=UTC,utf8,shortname=mixed /dev/vda /mnt || poweroff -f
cd /mnt
find . | sort | while read -r path; do
  if [ -d "$path" ]; then echo "D|$path"
  else echo "F|$path|$(stat -c %Y "$path")|$(sha256sum < "$path" | cut -d' ' -f1)"; fi
done
echo {END}
poweroff -f
"""


def fetch_kernel(directory: Path) -> tuple[Path, dict[str, Path]]:
    """(vmlinuz, module name -> .ko) of the pinned Debian cloud kernel, unpacked into
    ``directory`` (fetched with ``apt-get download``)."""
    need_tool("apt-get", "dpkg-deb")
    result = subprocess.run(["apt-get", "download", "-q", f"{KERNEL_PACKAGE}={KERNEL_VERSION}"],
                            cwd=directory, capture_output=True, text=True)
    need(result.returncode == 0, f"cannot download {KERNEL_PACKAGE}: {result.stderr[-500:]}")
    (deb,) = directory.glob(f"{KERNEL_PACKAGE}_*.deb")
    unpacked = directory / "unpacked"
    subprocess.run(["dpkg-deb", "-x", str(deb), str(unpacked)], check=True)
    (vmlinuz,) = unpacked.glob("boot/vmlinuz-*")
    modules = {path.name.removesuffix(".ko"): path
               for path in unpacked.glob("lib/modules/*/kernel/**/*.ko")}
    return vmlinuz, {name: modules[name] for name in MODULES}


def initramfs(modules: dict[str, Path]) -> bytes:
    busybox = shutil.which("busybox") or "/bin/busybox"
    tree = Tree(Entry(b"", EntryType.DIRECTORY, 0o755))
    for name in (b"bin", b"dev", b"mnt", b"modules", b"proc", b"sys"):
        tree.add(Entry(name, EntryType.DIRECTORY, 0o755))
    tree.add(Entry(b"init", EntryType.REGULAR, 0o755, content=Content.from_bytes(INIT.encode())))
    tree.add(Entry(b"bin/busybox", EntryType.REGULAR, 0o755,
                   content=Content(Path(busybox).stat().st_size,
                                   FileSource(busybox.encode()))))
    for name, path in modules.items():
        tree.add(Entry(b"modules/" + name.encode() + b".ko", EntryType.REGULAR, 0o644,
                       content=Content(path.stat().st_size, FileSource(bytes(path)))))
    out = io.BytesIO()
    cpio.write(tree, out, ImageOptions(epoch=0))
    return out.getvalue()


def kernel_listing(image: Path, kernel: tuple[Path, dict[str, Path]], work: Path
                   ) -> dict[bytes, tuple[str, int | None, str | None]]:
    """path -> ("directory", None, None) or ("regular", mtime, sha256) as the guest's
    kernel reads ``image``."""
    need_tool("qemu-system-x86_64", "busybox")
    vmlinuz, modules = kernel
    initrd = work / "initrd.cpio"
    initrd.write_bytes(initramfs(modules))
    result = subprocess.run(
        ["qemu-system-x86_64", "-accel", "tcg", "-m", "256", "-nographic", "-no-reboot",
         "-kernel", str(vmlinuz), "-initrd", str(initrd),
         "-append", "console=ttyS0 panic=-1 quiet",
         "-drive", f"file={image},format=raw,if=virtio,readonly=on"],
        capture_output=True, timeout=600)
    console = result.stdout.replace(b"\r\n", b"\n")
    assert END.encode() in console, console[-3000:].decode(errors="replace")
    listing: dict[bytes, tuple[str, int | None, str | None]] = {}
    for line in console.split(b"\n"):
        fields = line.split(b"|")
        if fields[0] == b"D" and len(fields) == 2 and fields[1] != b".":
            listing[fields[1].removeprefix(b"./")] = ("directory", None, None)
        elif fields[0] == b"F" and len(fields) == 4:
            listing[fields[1].removeprefix(b"./")] = (
                "regular", int(fields[2]), fields[3].decode())
    return listing


def expected_listing(view: dict[bytes, tuple[str, bytes, int]]
                     ) -> dict[bytes, tuple[str, int | None, str | None]]:
    return {path: (kind, None, None) if kind == "directory"
            else (kind, mtime, hashlib.sha256(data).hexdigest())
            for path, (kind, data, mtime) in view.items()}
