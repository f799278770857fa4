"""The snapshot's memory file read into the page cache ahead of a migration (vm/backends/qemu/ram_cache.py)."""

from __future__ import annotations

import logging
import os
import subprocess
import threading
from pathlib import Path

import pytest

from polydev.vm.backends.qemu import ram_cache

SIZE = 8 << 20


def resident(path: Path) -> int:
    """Bytes of `path` in the page cache (util-linux fincore)."""
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                         check=True, capture_output=True, text=True).stdout
    return int(out.strip())


@pytest.fixture
def memory_file(tmp_path: Path) -> Path:
    """Mostly holes, as a snapshot's RAM is, and not in the page cache."""
    path = tmp_path / "ram.bin"
    with open(path, "wb") as f:
        f.truncate(SIZE)
        f.seek(SIZE // 2)
        f.write(b"guest page" * 400)
        f.flush()
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    assert resident(path) < SIZE // 2
    return path


def test_read_ahead_brings_the_whole_file_holes_included_into_the_page_cache(memory_file: Path) -> None:
    ram_cache.read_ahead(memory_file)
    assert resident(memory_file) == SIZE


def test_a_new_snapshots_file_is_read_in_the_background_even_once_renamed(memory_file: Path) -> None:
    ram_cache.warm_in_background(memory_file)
    moved = memory_file.with_name("moved.bin")
    memory_file.rename(moved)  # as the snapshot's directory is renamed into place
    for thread in threading.enumerate():
        if thread.name == "ram-read-ahead":
            thread.join(30)
    assert resident(moved) == SIZE


def test_a_missing_file_is_only_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger=ram_cache.__name__):
        ram_cache.read_ahead(tmp_path / "gone.bin")
    assert "could not read the snapshot's memory file ahead" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=ram_cache.__name__):
        ram_cache.warm_in_background(tmp_path / "gone.bin")  # a snapshot is still made without it
    assert "could not read the snapshot's memory file ahead" in caplog.text
