"""The QEMU console reader (a thread per VM) when the VM's files go away under it: a start cancelled within a
second has its work directory removed by the engine's teardown while QEMU is still being started."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from polydev import protocol as p
from polydev.vm.backends.qemu.machine import QemuVM
from polydev.vm.images import Image

CONSOLE = f"print('booting'); print('{p.READY_MARKER}'); print('after')"


@pytest.fixture
def console() -> Iterator[subprocess.Popen[bytes]]:
    """A stand-in QEMU: a process that writes a boot console, with the agent's READY line, to a pipe."""
    proc = subprocess.Popen([sys.executable, "-c", CONSOLE], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    yield proc
    proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


def test_the_console_is_read_to_its_end_when_the_work_directory_is_gone(
        tmp_path: Path, console: subprocess.Popen[bytes]) -> None:
    vm = QemuVM(Image(tmp_path / "image"), tmp_path / "removed-by-teardown")
    vm._read_console(console, 0.0)  # raised FileNotFoundError (console.log), an unhandled thread exception
    assert vm._is_ready and vm._ready.is_set() and vm._eof.is_set()
    assert list(vm._tail) == ["booting", p.READY_MARKER, "after"]
    assert not vm.workdir.exists()  # nothing recreated it


def test_a_pipe_closed_under_the_reader_ends_it_and_wakes_the_starter(
        tmp_path: Path, console: subprocess.Popen[bytes]) -> None:
    vm = QemuVM(Image(tmp_path / "image"), tmp_path / "vm")
    vm.workdir.mkdir()
    assert console.stdout is not None
    console.stdout.close()  # what kill() does once QEMU is gone
    vm._read_console(console, 0.0)  # raised ValueError (I/O on a closed file)
    assert vm._eof.is_set() and vm._ready.is_set() and not vm._is_ready
    assert vm.console_log.read_bytes().startswith(b"=== boot")
