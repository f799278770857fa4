"""Per-VM disk copies: a reflink where the file system has them, a sparse copy elsewhere."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from polydev.vm import disks

SIZE = 256 * 1024 * 1024


def sparse_image(path: Path) -> Path:
    with open(path, "wb") as f:  # 256 MiB with 8 KiB of data at both ends
        f.write(b"A" * 4096)
        f.seek(SIZE - 4096)
        f.write(b"Z" * 4096)
    path.chmod(0o400)  # like a frozen snapshot disk
    return path


def test_clone_is_a_private_copy_that_stays_sparse(tmp_path: Path) -> None:
    source = sparse_image(tmp_path / "base.ext4")
    dest = tmp_path / "vm.ext4"
    kind = disks.clone_disk(source, dest)
    assert kind in ("reflink", "sparse")
    assert dest.stat().st_size == SIZE
    assert dest.stat().st_blocks * 512 < 4 * 1024 * 1024  # the holes stayed holes (or shared blocks)
    assert dest.stat().st_mode & 0o777 == 0o600  # writable by its VM, whatever the source's mode
    with open(dest, "rb") as f:
        assert f.read(4096) == b"A" * 4096
        f.seek(SIZE - 4096)
        assert f.read() == b"Z" * 4096
    with open(dest, "r+b") as f:  # writing to the clone leaves the source as it was
        f.write(b"B")
    assert source.read_bytes()[:1] == b"A"
    with pytest.raises(FileExistsError):
        disks.clone_disk(source, dest)  # never over an existing disk


def test_reflink_is_used_when_the_file_system_has_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = sparse_image(tmp_path / "base.ext4")
    seen: list[int] = []

    def ficlone(fd: int, request: int, arg: int) -> int:
        seen.append(request)
        return 0

    def no_copy(*args: object, **kw: object) -> None:
        raise AssertionError("cp must not run when the clone succeeded")

    monkeypatch.setattr(disks.fcntl, "ioctl", ficlone)
    monkeypatch.setattr(disks.subprocess, "run", no_copy)
    assert disks.clone_disk(source, tmp_path / "vm.ext4") == "reflink"
    assert seen == [disks.FICLONE]


def test_clone_failure_other_than_no_reflink_is_raised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = sparse_image(tmp_path / "base.ext4")

    def full(fd: int, request: int, arg: int) -> int:
        raise OSError(28, os.strerror(28))  # ENOSPC is a real failure, not "this file system cannot"

    monkeypatch.setattr(disks.fcntl, "ioctl", full)
    with pytest.raises(OSError, match="No space left"):
        disks.clone_disk(source, tmp_path / "vm.ext4")
