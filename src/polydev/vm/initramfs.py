"""A minimal initramfs: static busybox, the virtio modules for disk and network, and guest/initramfs_init.sh.

Written as a newc cpio from Python (no cpio binary, no root-owned temp tree), gzip level 1: the guest
kernel unpacks it faster than Debian's 13 MB zstd image, and no udev runs at boot.
"""

from __future__ import annotations

import gzip
import io
import subprocess
from pathlib import Path

from polydev.vm.proc import run

# The VM's devices (virtio-pci disk and NIC, and fw_cfg, which carries the agent token); modprobe resolves
# what each needs, in load order.
MODULES = ("virtio_pci", "virtio_blk", "virtio_net", "qemu_fw_cfg")
INIT_SCRIPT = Path(__file__).resolve().parent.parent / "guest" / "initramfs_init.sh"


def module_files(kernel_version: str) -> list[Path]:
    ordered: list[Path] = []
    for name in MODULES:
        out = subprocess.run(["modprobe", "--show-depends", "-S", kernel_version, name], capture_output=True,
                             text=True, check=True).stdout
        for line in out.splitlines():
            parts = line.split()
            if parts and parts[0] == "insmod" and Path(parts[1]) not in ordered:
                ordered.append(Path(parts[1]))
    return ordered


def busybox(cache_dir: Path) -> Path:
    """Debian's static busybox, unpacked from its .deb into the cache (the host need not install it)."""
    target = cache_dir / "busybox-static" / "bin" / "busybox"
    if target.is_file():
        return target
    work = cache_dir / "busybox-static"
    work.mkdir(parents=True, exist_ok=True)
    try:
        run(["apt-get", "download", "busybox-static"], cwd=work)
    except Exception:  # a machine fresh from its image may have no package lists yet
        run(["apt-get", "update", "-q"])
        run(["apt-get", "download", "busybox-static"], cwd=work)
    deb = next(work.glob("busybox-static_*.deb"))
    run(["dpkg-deb", "-x", deb, work])
    deb.unlink()
    return target


class _Cpio:
    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 1

    def add(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        encoded = name.encode() + b"\0"
        fields = [self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0]
        self.buf.write(b"070701" + b"".join(b"%08X" % f for f in fields) + encoded)
        self._pad()
        self.buf.write(data)
        self._pad()
        self.ino += 1

    def _pad(self) -> None:
        self.buf.write(b"\0" * (-self.buf.tell() % 4))

    def finish(self) -> bytes:
        self.add("TRAILER!!!", 0)
        return self.buf.getvalue()


def build(kernel_version: str, out: Path, cache_dir: Path) -> None:
    cpio = _Cpio()
    for d in ("bin", "dev", "proc", "sys", "newroot", "lib", "lib/modules"):
        cpio.add(d, 0o040755)
    cpio.add("dev/console", 0o020600, rdev=(5, 1))  # the kernel opens it for /init's output before devtmpfs
    cpio.add("bin/busybox", 0o100755, busybox(cache_dir).read_bytes())
    cpio.add("init", 0o100755, INIT_SCRIPT.read_bytes())
    order = []
    for path in module_files(kernel_version):
        cpio.add(f"lib/modules/{path.name}", 0o100644, path.read_bytes())
        order.append(path.name)
    cpio.add("modules.order", 0o100644, ("\n".join(order) + "\n").encode())
    out.write_bytes(gzip.compress(cpio.finish(), compresslevel=1))
