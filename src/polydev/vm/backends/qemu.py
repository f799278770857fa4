"""Boot an image under QEMU: KVM when it works, TCG otherwise; readiness from the serial console.

Machine: `q35` with virtio-pci. QEMU's `microvm` machine (DESIGN §3) hangs Debian's cloud kernel under TCG at
TSC calibration (no PIT/HPET reference), and the kernel lacks VIRTIO_MMIO_CMDLINE_DEVICES, so q35 it is.
Network: QEMU user networking with `restrict=on` (the guest reaches nothing outside) and one hostfwd from
127.0.0.1:<free port> to the agent. Readiness: a reader thread copies the serial console to `console.log`
and wakes the starter the moment the agent's READY line appears, or the moment QEMU exits. No sleeps.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import shutil
import socket
import subprocess
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from polydev import protocol as p
from polydev.vm.agent_client import AgentClient
from polydev.vm.images import INIT_PATH, Image

log = logging.getLogger(__name__)
GUEST_ADDR, GUEST_GATEWAY = "10.0.2.15/24", "10.0.2.2"  # QEMU user networking's fixed layout
# A kernel under KVM writes its first console line well within this; silence means KVM is not usable here.
KVM_FIRST_OUTPUT_S = 15.0
# TCG CPU model. Measured here: with qemu64 Claude Code's native (Bun) binary dies of SIGILL; Nehalem and
# max both run all three CLIs, `gemini --version` 71 s vs 61 s, so max.
TCG_CPU = "max"
_kvm_usable: bool | None = None  # learnt once per process: the answer does not change while it runs


class VMError(RuntimeError):
    def __init__(self, message: str, console_tail: list[str] | None = None) -> None:
        tail = "\n".join(console_tail or [])
        super().__init__(f"{message}\n--- console (last lines) ---\n{tail}" if tail else message)
        self.console_tail = console_tail or []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def kvm_available() -> bool:
    return os.access("/dev/kvm", os.R_OK | os.W_OK)


class QemuVM:
    """One VM: a qcow2 overlay on the image, a QEMU process, its console log and its QMP socket."""

    def __init__(self, image: Image, workdir: Path, *, token: str | None = None, vcpus: int = 2,
                 memory_mb: int = 2048, accel: str = "auto", keep_console: bool = True,
                 tcg_cpu: str = TCG_CPU) -> None:
        self.image = image
        self.workdir = workdir
        self.token = token or secrets.token_urlsafe(24)
        self.vcpus = vcpus
        self.memory_mb = memory_mb
        self.accel_wanted = accel  # auto | kvm | tcg
        self.accel = ""
        self.keep_console = keep_console
        self.tcg_cpu = tcg_cpu
        self.port = 0
        self.boot_seconds = 0.0
        self._proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None
        self._ready = threading.Event()
        self._first_output = threading.Event()
        self._eof = threading.Event()
        self._is_ready = False
        self._tail: deque[str] = deque(maxlen=60)

    # -- paths ------------------------------------------------------------------------------------------

    @property
    def overlay(self) -> Path:
        return self.workdir / "disk.qcow2"

    @property
    def console_log(self) -> Path:
        return self.workdir / "console.log"

    @property
    def qmp_socket(self) -> Path:
        return self.workdir / "qmp.sock"

    @property
    def agent_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, timeout: float = 60.0) -> AgentClient:
        return AgentClient(self.agent_url, self.token, timeout=timeout)

    # -- lifecycle --------------------------------------------------------------------------------------

    def __enter__(self) -> QemuVM:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, ready_timeout: float = 300.0) -> float:
        """Boot and wait for the agent. Returns seconds from QEMU start to the agent's READY line."""
        global _kvm_usable
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(self.image.rootfs.resolve()),
                            "-F", "raw", str(self.overlay)], check=True, capture_output=True)
            want_kvm = self.accel_wanted == "kvm" or (self.accel_wanted == "auto" and kvm_available()
                                                      and _kvm_usable is not False)
            if want_kvm:
                try:
                    return self._boot("kvm", ready_timeout)
                except VMError as exc:
                    if self.accel_wanted == "kvm":
                        raise
                    _kvm_usable = False
                    log.warning("KVM is not usable here (%s); falling back to TCG (software emulation)",
                                str(exc).splitlines()[0])
                    self._reset_overlay()
            return self._boot("tcg", ready_timeout)
        except BaseException:
            self.stop()
            raise

    def _reset_overlay(self) -> None:
        self.overlay.unlink(missing_ok=True)
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(self.image.rootfs.resolve()),
                        "-F", "raw", str(self.overlay)], check=True, capture_output=True)

    @property
    def token_file(self) -> Path:
        return self.workdir / "token"

    def cmdline(self) -> str:
        # No token here: the command line shows in the host's process list and in the guest's /proc/cmdline.
        return " ".join(["console=ttyS0", "quiet", "root=/dev/vda", "rw", "panic=-1", f"init={INIT_PATH}",
                         f"{p.CMDLINE_ADDR}={GUEST_ADDR}", f"{p.CMDLINE_GATEWAY}={GUEST_GATEWAY}"])

    def argv(self, accel: str) -> list[str]:
        cpu = ["-accel", "kvm", "-cpu", "host"] if accel == "kvm" else ["-accel", "tcg", "-cpu", self.tcg_cpu]
        netdev = f"user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:{self.port}-:{p.AGENT_PORT}"
        return ["qemu-system-x86_64", "-M", "q35", *cpu, "-smp", str(self.vcpus), "-m", str(self.memory_mb),
                "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
                "-kernel", str(self.image.kernel), "-initrd", str(self.image.initrd), "-append", self.cmdline(),
                "-drive", f"id=root,file={self.overlay},format=qcow2,if=none,discard=unmap",
                "-device", "virtio-blk-pci,drive=root",
                "-netdev", netdev, "-device", "virtio-net-pci,netdev=net0",
                "-fw_cfg", f"name={p.FW_CFG_TOKEN},file={self.token_file}",
                "-serial", "stdio", "-qmp", f"unix:{self.qmp_socket},server=on,wait=off"]

    def _boot(self, accel: str, ready_timeout: float) -> float:
        self.accel = accel
        self.port = free_port()
        self._ready.clear()
        self._first_output.clear()
        self._eof.clear()
        self._is_ready = False
        self._tail.clear()
        self.qmp_socket.unlink(missing_ok=True)
        # QEMU reads the file when it starts; it is removed as soon as the guest is up (or the boot failed).
        fd = os.open(self.token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.token)
        started = time.monotonic()
        stderr = open(self.workdir / "qemu.stderr", "wb")
        try:
            self._proc = subprocess.Popen(self.argv(accel), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                          stderr=stderr, start_new_session=True)
        finally:
            stderr.close()
        self._reader = threading.Thread(target=self._read_console, args=(self._proc, started), daemon=True)
        self._reader.start()
        if accel == "kvm" and not self._first_output.wait(KVM_FIRST_OUTPUT_S):
            self.token_file.unlink(missing_ok=True)
            self._kill()
            raise VMError("no console output under KVM")
        self._ready.wait(max(0.0, ready_timeout - (time.monotonic() - started)))
        self.token_file.unlink(missing_ok=True)
        if not self._is_ready:
            if self._eof.is_set():  # the console closed because QEMU is exiting: collect its status
                self._proc.wait()
            exited = self._proc.poll() is not None
            err = (self.workdir / "qemu.stderr").read_text(errors="replace").strip().splitlines()[-3:]
            self._kill()
            reason = f"QEMU exited ({'; '.join(err)})" if exited else f"agent not ready after {ready_timeout:.0f} s"
            raise VMError(f"{accel}: {reason}", list(self._tail))
        self.boot_seconds = time.monotonic() - started
        return self.boot_seconds

    def _read_console(self, proc: subprocess.Popen[bytes], started: float) -> None:
        assert proc.stdout is not None
        with open(self.console_log, "ab") as out:
            out.write(f"=== boot ({self.accel}) ===\n".encode())
            for raw in proc.stdout:
                self._first_output.set()
                out.write(raw)
                out.flush()
                line = raw.decode("utf-8", "replace").rstrip()
                self._tail.append(line)
                if not self._is_ready and p.READY_MARKER in line:
                    self._is_ready = True
                    self._ready.set()
        self._eof.set()
        self._first_output.set()
        self._ready.set()  # QEMU is gone: wake the starter rather than let it wait out its timeout

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def qmp(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """One QMP command (qemu.qmp) on a fresh connection; usable from sync code and from worker threads."""
        from qemu.qmp import QMPClient

        async def call() -> Any:
            client = QMPClient("polydev")
            await client.connect(str(self.qmp_socket))
            try:
                return await client.execute(command, arguments)
            finally:
                await client.disconnect()

        return asyncio.run(call())

    def _kill(self) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, 9)
            except ProcessLookupError:
                pass
        proc.wait()
        if proc.stdout:
            proc.stdout.close()
        if self._reader is not None:
            self._reader.join(timeout=5)
        self._proc = None

    def stop(self) -> None:
        """Stop QEMU (QMP quit, then SIGKILL if it lingers) and remove the disk; keep the console log if asked."""
        if self._proc is not None and self._proc.poll() is None:
            try:
                self.qmp("quit")
                self._proc.wait(timeout=10)
            except Exception:  # QMP unreachable or QEMU stuck: the kill below still cleans up
                pass
        self._kill()
        if self.keep_console and self.console_log.exists():
            for path in self.workdir.iterdir():
                if path.name != self.console_log.name:
                    path.unlink(missing_ok=True)
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)
