"""clone_disk on a file system with reflinks (XFS, in a loop-mounted image the test makes): the clone shares
the source's blocks, so it costs the same whatever the image holds. Needs root and mkfs.xfs (Debian:
xfsprogs); skips saying which is missing."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from polydev.vm.disks import clone_disk


@pytest.fixture
def xfs(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a test file system needs root")
    if shutil.which("mkfs.xfs") is None:
        pytest.skip("mkfs.xfs is not installed (Debian: xfsprogs)")
    image, mnt = tmp_path / "xfs.img", tmp_path / "mnt"
    with open(image, "wb") as f:
        f.truncate(1024 * 1024 * 1024)
    subprocess.run(["mkfs.xfs", "-q", "-m", "reflink=1", str(image)], check=True)
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], capture_output=True, text=True,
                             check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot loop-mount a test file system here: {mounted.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def written(path: Path, mib: int) -> Path:
    with open(path, "wb") as f:
        f.writelines(os.urandom(1024 * 1024) for _ in range(mib))
        f.flush()
        os.fsync(f.fileno())  # a golden image is on disk long before VMs clone it
    return path


def test_a_reflink_clone_costs_the_same_for_any_image(xfs: Path) -> None:
    timings = {}
    for mib in (8, 256):
        source = written(xfs / f"base-{mib}.ext4", mib)
        started = time.perf_counter()
        assert clone_disk(source, xfs / f"vm-{mib}.ext4") == "reflink"
        timings[mib] = time.perf_counter() - started
        assert (xfs / f"vm-{mib}.ext4").read_bytes()[-4096:] == source.read_bytes()[-4096:]
    # 32x the data, and no copy: both are a metadata operation of a few milliseconds.
    assert timings[256] < 0.1, timings
    free_before = shutil.disk_usage(xfs).free
    assert clone_disk(xfs / "base-256.ext4", xfs / "another.ext4") == "reflink"
    assert free_before - shutil.disk_usage(xfs).free < 16 * 1024 * 1024  # the blocks are shared, not copied
