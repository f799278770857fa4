"""clone_disk on a file system with reflinks (XFS, in a loop-mounted image the test makes): the clone shares
the source's blocks, so it costs the same whatever the image holds. What is asserted is what a reflink is, not
how fast it was: every extent of the clone is the source's own (same physical blocks, flagged shared by
FIEMAP, read with `filefrag -v`), the file system's free space does not drop by the image's size, and a
write to the clone leaves the source as it was. Needs root, mkfs.xfs (Debian: xfsprogs) and filefrag
(e2fsprogs); skips saying which is missing (fails under POLYDEV_REQUIRE_SERVERS=1)."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from polydev.vm.disks import clone_disk
from tests.support.required import root, unmet

MIB = 1024 * 1024
# `filefrag -v` extent lines: " 0:   0..  2047:   24..  2071:  2048:   last,shared,eof"
EXTENT = re.compile(r"^\s*\d+:\s*(\d+)\.\.\s*\d+:\s*(\d+)\.\.\s*\d+:\s*(\d+):\s*(?:\d+:)?\s*(\S*)\s*$")


@pytest.fixture
def xfs(tmp_path: Path) -> Iterator[Path]:
    root("mounting a test file system")
    for tool, package in (("mkfs.xfs", "xfsprogs"), ("filefrag", "e2fsprogs")):
        if shutil.which(tool) is None:
            unmet(f"{tool} is not installed (Debian: {package}; scripts/test.sh installs it)")
    image, mnt = tmp_path / "xfs.img", tmp_path / "mnt"
    with open(image, "wb") as f:
        f.truncate(1024 * MIB)
    subprocess.run(["mkfs.xfs", "-q", "-m", "reflink=1", str(image)], check=True)
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], capture_output=True, text=True,
                             check=False)
    if mounted.returncode != 0:
        unmet(f"cannot loop-mount a test file system here: {mounted.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def written(path: Path, mib: int) -> Path:
    with open(path, "wb") as f:
        f.writelines(os.urandom(MIB) for _ in range(mib))
        f.flush()
        os.fsync(f.fileno())  # a golden image is on disk long before VMs clone it
    return path


def extents(path: Path) -> list[tuple[int, int, int, frozenset[str]]]:
    """The file's extents as FIEMAP reports them: (logical start, physical start, length, flags)."""
    out = subprocess.run(["filefrag", "-v", str(path)], capture_output=True, text=True, check=True).stdout
    found = [(int(m[1]), int(m[2]), int(m[3]), frozenset(m[4].split(",")))
             for line in out.splitlines() if (m := EXTENT.match(line))]
    assert found, out  # a file with data has extents: an empty parse would make every check below vacuous
    return found


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_reflink_clone_shares_the_images_blocks(xfs: Path) -> None:
    source = written(xfs / "base.ext4", 256)
    before = digest(source)
    free_before = shutil.disk_usage(xfs).free
    assert clone_disk(source, xfs / "vm.ext4") == "reflink"
    clone = xfs / "vm.ext4"
    assert digest(clone) == before
    # The same physical blocks, each extent marked shared: nothing was copied.
    theirs, ours = extents(source), extents(clone)
    assert [e[:3] for e in ours] == [e[:3] for e in theirs]
    assert all("shared" in e[3] for e in ours + theirs), ours
    # And the file system agrees: 256 MiB of data, and not 256 MiB less free space (a few MiB of metadata at most).
    assert free_before - shutil.disk_usage(xfs).free < 16 * MIB


def test_a_write_to_the_clone_stays_in_the_clone(xfs: Path) -> None:
    source = written(xfs / "base.ext4", 8)
    before = digest(source)
    assert clone_disk(source, xfs / "vm.ext4") == "reflink"
    with open(xfs / "vm.ext4", "r+b") as f:  # a VM writing its root disk
        f.write(b"\xff" * 4096)
        f.flush()
        os.fsync(f.fileno())
    assert digest(source) == before and digest(xfs / "vm.ext4") != before
    # The written block moved to blocks of the clone's own; the rest is still the source's.
    moved = [e for e in extents(xfs / "vm.ext4") if e[0] == 0]
    assert moved and moved[0][1] != extents(source)[0][1]
