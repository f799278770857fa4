"""Boot an image under QEMU: KVM when it works, TCG otherwise; readiness from the serial console.

Machine: `q35` with virtio-pci. QEMU's `microvm` machine (DESIGN §3) hangs Debian's cloud kernel under TCG at
TSC calibration (no PIT/HPET reference), and the kernel lacks VIRTIO_MMIO_CMDLINE_DEVICES, so q35 it is.
Network: QEMU user networking with `restrict=on` (the guest reaches nothing outside), one hostfwd from
127.0.0.1:<free port> to the agent, and a `guestfwd` per configured guest forward (VM_GUEST_FORWARDS,
polydev.vm.forwards): the host loopback services the guest may reach, and nothing else.
Readiness: a reader thread copies the serial console to `console.log` and wakes the starter the moment the
agent's READY line appears, or the moment QEMU exits. No sleeps.

This module is one VM (`QemuVM`): its overlay, its QEMU process, its console and QMP socket; cold boot or
restore from a snapshot's state. The engine's backend (backend.py) and its snapshots (snapshot.py) build on it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from polydev import protocol as p
from polydev.config.forwards import GuestForward
from polydev.vm import handover
from polydev.vm.agent_client import AgentClient
from polydev.vm.forwards import RELAY_MISSING, netdev_rule, relay_path
from polydev.vm.images import INIT_PATH, Image
from polydev.vm.network import VNC_PORT, Slot

log = logging.getLogger(__name__)
GUEST_ADDR, GUEST_GATEWAY = "10.0.2.15/24", "10.0.2.2"  # QEMU user networking's fixed layout
# A kernel under KVM writes its first console line well within this; silence means KVM is not usable here.
KVM_FIRST_OUTPUT_S = 15.0
# TCG CPU model. Measured here: with qemu64 Claude Code's native (Bun) binary dies of SIGILL; Nehalem and
# max both run all three CLIs, `gemini --version` 71 s vs 61 s, so max.
TCG_CPU = "max"
_kvm_usable: bool | None = None  # learnt once per process: the answer does not change while it runs
# Migration leaves out RAM that is a shared file mapping: the snapshot's RAM is its template's RAM file.
IGNORE_SHARED = {"capabilities": [{"capability": "x-ignore-shared", "state": True}]}


class VMError(RuntimeError):
    def __init__(self, message: str, console_tail: list[str] | None = None) -> None:
        tail = "\n".join(console_tail or [])
        super().__init__(f"{message}\n--- console (last lines) ---\n{tail}" if tail else message)
        self.console_tail = console_tail or []


def _qemu_opt(path: Path) -> str:
    """A path as a value inside a QEMU option list (a comma would start the next option)."""
    return str(path).replace(",", ",,")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def kvm_available() -> bool:
    return os.access("/dev/kvm", os.R_OK | os.W_OK)


def kvm_usable() -> bool | None:
    """Whether a KVM boot worked in this process: True, False (it fell back to TCG), None (none tried yet)."""
    return _kvm_usable


class QemuVM:
    """One VM: a qcow2 overlay on the image, a QEMU process, its console log and its QMP socket."""

    # User networking: a host port (127.0.0.1 only) forwarded to the guest's VNC server, for login-browser
    # VMs; 0 means none. Tap mode needs no forward: the control plane reaches the slot's address directly.
    vnc_port = 0

    def __init__(self, image: Image, workdir: Path, *, token: str | None = None, vcpus: int = 2,
                 memory_mb: int = 2048, accel: str = "auto", keep_console: bool = True,
                 tcg_cpu: str = TCG_CPU, name: str | None = None,
                 backing: tuple[Path, str] | None = None, slot: Slot | None = None,
                 guest_forwards: tuple[GuestForward, ...] = (), ram_file: tuple[Path, bool] | None = None,
                 overlay_from: Path | None = None) -> None:
        self.image = image
        # Guest RAM in a file (path, shared): a snapshot template writes its RAM there (shared), a restore maps
        # the snapshot's file copy-on-write (private), so nothing is loaded and every clone shares the page cache.
        self.ram_file = ram_file
        # A ready-made empty overlay to copy (a restore): 0.2 ms instead of ~50 ms for a qemu-img process.
        self.overlay_from = overlay_from
        # User networking only (a slot's egress is its firewall's business): host services the guest may reach.
        self.guest_forwards = guest_forwards
        # A network slot (tap mode): QEMU runs inside the slot's namespace on its TAP, the guest takes the
        # slot layout's fixed address, and the agent is reached at the slot's own address.
        self.slot = slot
        # Shows in the host's process list: how the engine's reconcile recognises its VMs after a crash.
        self.name = name
        # The overlay's backing file and its format: the image (raw) for a cold boot, a snapshot's disk
        # (qcow2, frozen at snapshot time) for a restore.
        self.backing = backing or (image.rootfs.resolve(), "raw")
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
        path = self.workdir / "qmp.sock"
        if len(str(path)) < 100:
            return path
        # Unix socket paths are limited to 108 bytes: a deep work directory gets a short runtime path.
        digest = hashlib.sha256(str(self.workdir).encode()).hexdigest()[:16]
        short = Path(tempfile.gettempdir()) / "polydev-qmp"
        short.mkdir(mode=0o700, exist_ok=True)
        return short / f"{digest}.sock"

    @property
    def agent_url(self) -> str:
        if self.slot is not None:
            return f"http://{self.slot.ns_ip}:{p.AGENT_PORT}"
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
            self._create_overlay()
            want_kvm = self.accel_wanted == "kvm" or (self.accel_wanted == "auto" and kvm_available()
                                                      and _kvm_usable is not False)
            if want_kvm:
                try:
                    seconds = self._boot("kvm", ready_timeout)
                    _kvm_usable = True
                    return seconds
                except VMError as exc:
                    if self.accel_wanted == "kvm":
                        raise
                    kvm_error = str(exc).splitlines()[0]
                    self._reset_overlay()
                # If TCG fails too, the guest or the setup is broken, not KVM: it raises before we learn
                # anything. Only a TCG success after a KVM failure shows KVM itself is the problem here.
                seconds = self._boot("tcg", ready_timeout)
                _kvm_usable = False
                log.warning("KVM is not usable here (%s); falling back to TCG (software emulation)", kvm_error)
                return seconds
            return self._boot("tcg", ready_timeout)
        except BaseException:
            self.stop()
            raise

    def _create_overlay(self) -> None:
        if self.overlay_from is not None:
            shutil.copyfile(self.overlay_from, self.overlay)
            return
        # Copy-on-write on the read-only base: constant time whatever the image size.
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(self.backing[0]),
                        "-F", self.backing[1], str(self.overlay)], check=True, capture_output=True)

    def _reset_overlay(self) -> None:
        self.overlay.unlink(missing_ok=True)
        self._create_overlay()

    @property
    def token_file(self) -> Path:
        return self.workdir / "token"

    def cmdline(self) -> str:
        # No token here: the command line shows in the host's process list and in the guest's /proc/cmdline.
        return " ".join(["console=ttyS0", "quiet", "root=/dev/vda", "rw", "panic=-1", f"init={INIT_PATH}",
                         f"{p.CMDLINE_ADDR}={self._guest_addr()}", f"{p.CMDLINE_GATEWAY}={self._gateway()}"])

    def _guest_addr(self) -> str:
        if self.slot is None:
            return GUEST_ADDR
        from polydev.vm import network

        return f"{network.GUEST_IP}/{network.GUEST_PREFIX}"

    def _gateway(self) -> str:
        if self.slot is None:
            return GUEST_GATEWAY
        from polydev.vm import network

        return network.GATEWAY_IP

    def argv(self, accel: str) -> list[str]:
        cpu = ["-accel", "kvm", "-cpu", "host"] if accel == "kvm" else ["-accel", "tcg", "-cpu", self.tcg_cpu]
        netdev = f"user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:{self.port}-:{p.AGENT_PORT}"
        if self.vnc_port:
            netdev += f",hostfwd=tcp:127.0.0.1:{self.vnc_port}-:{VNC_PORT}"
        if self.guest_forwards and self.slot is None:
            relay = relay_path()
            if relay is None:
                raise VMError(RELAY_MISSING)
            netdev += "".join(f",{netdev_rule(fwd, relay)}" for fwd in self.guest_forwards)
        prefix: list[str] = []
        if self.slot is not None:
            from polydev.vm import network

            netdev = f"tap,id=net0,ifname={network.TAP},script=no,downscript=no"
            prefix = self.slot.command_prefix()  # opening the TAP needs the slot's namespace
        name = ["-name", self.name] if self.name else []
        machine, memory = "q35", ["-m", str(self.memory_mb)]
        if self.ram_file is not None:
            path, shared = self.ram_file
            machine += ",memory-backend=ram0"
            memory += ["-object", f"memory-backend-file,id=ram0,size={self.memory_mb}M,"
                                  f"mem-path={_qemu_opt(path)},share={'on' if shared else 'off'}"]
        return [*prefix, "qemu-system-x86_64", *name, "-M", machine, *cpu, "-smp", str(self.vcpus), *memory,
                "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
                "-kernel", str(self.image.kernel), "-initrd", str(self.image.initrd), "-append", self.cmdline(),
                "-drive", f"id=root,file={self.overlay},format=qcow2,if=none,discard=unmap",
                "-device", "virtio-blk-pci,drive=root",
                "-netdev", netdev, "-device", "virtio-net-pci,netdev=net0",
                "-fw_cfg", f"name={p.FW_CFG_TOKEN},file={self.token_file}",
                "-serial", "stdio", "-qmp", f"unix:{self.qmp_socket},server=on,wait=off"]

    def _boot(self, accel: str, ready_timeout: float) -> float:
        self.accel = accel
        if self.ram_file is not None and self.ram_file[1]:
            self.ram_file[0].unlink(missing_ok=True)  # a failed KVM attempt's memory must not linger
        self.port = free_port()
        self._ready.clear()
        self._first_output.clear()
        self._eof.clear()
        self._is_ready = False
        self._tail.clear()
        started = self._spawn(accel)
        assert self._proc is not None
        if accel == "kvm" and not self._first_output.wait(KVM_FIRST_OUTPUT_S):
            self.token_file.unlink(missing_ok=True)
            self.kill()
            raise VMError("no console output under KVM")
        self._ready.wait(max(0.0, ready_timeout - (time.monotonic() - started)))
        self.token_file.unlink(missing_ok=True)
        if not self._is_ready:
            if self._eof.is_set():  # the console closed because QEMU is exiting: collect its status
                self._proc.wait()
            exited = self._proc.poll() is not None
            err = (self.workdir / "qemu.stderr").read_text(errors="replace").strip().splitlines()[-3:]
            self.kill()
            reason = f"QEMU exited ({'; '.join(err)})" if exited else f"agent not ready after {ready_timeout:.0f} s"
            raise VMError(f"{accel}: {reason}", list(self._tail))
        self.boot_seconds = time.monotonic() - started
        return self.boot_seconds

    def _spawn(self, accel: str, extra: list[str] | None = None, pass_fds: tuple[int, ...] = ()) -> float:
        """Start QEMU with the console reader running; returns the start time."""
        self.qmp_socket.unlink(missing_ok=True)
        # QEMU reads the file when it starts; it is removed as soon as the guest is up (or the boot failed).
        fd = os.open(self.token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.token)
        started = time.monotonic()
        stderr = open(self.workdir / "qemu.stderr", "wb")
        try:
            self._proc = subprocess.Popen([*self.argv(accel), *(extra or [])], stdin=subprocess.DEVNULL,
                                          stdout=subprocess.PIPE, stderr=stderr, start_new_session=True,
                                          pass_fds=pass_fds)
        finally:
            stderr.close()
        self._reader = threading.Thread(target=self._read_console, args=(self._proc, started), daemon=True)
        self._reader.start()
        return started

    def restore(self, state: Path, accel: str, new_token: str, ready_timeout: float = 60.0) -> float:
        """Start from a snapshot's memory state (on an overlay over the snapshot's disk), resume it, and hand
        the agent its own token. Returns seconds from QEMU start to the agent answering with that token."""
        self.accel = accel
        self.port = free_port()
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            self._create_overlay()
            # The state goes in as an inherited descriptor (no shell, no `cat`); `defer` because the
            # x-ignore-shared capability must be set before the incoming migration starts.
            with open(state, "rb") as stream:
                started = self._spawn(accel, ["-incoming", "defer"], pass_fds=(stream.fileno(),))
                deadline = started + ready_timeout
                self._resume_when_migrated(deadline, f"fd:{stream.fileno()}")
            self.token_file.unlink(missing_ok=True)
            self._hand_over_token(new_token, deadline)
        except BaseException as exc:
            self.token_file.unlink(missing_ok=True)
            tail = list(self._tail)
            self.stop()
            if isinstance(exc, VMError) or not isinstance(exc, Exception):
                raise
            raise VMError(f"restore failed: {exc}", tail) from exc
        self.boot_seconds = time.monotonic() - started
        return self.boot_seconds

    def _resume_when_migrated(self, deadline: float, uri: str) -> None:
        from qemu.qmp import QMPClient
        from qemu.qmp.protocol import ConnectError

        async def run() -> None:
            while True:  # QEMU creates the socket a moment after it starts
                client = QMPClient("polydev")
                try:
                    if not self.qmp_socket.exists():  # (a refused connect is logged as an error by qemu.qmp)
                        raise FileNotFoundError(self.qmp_socket)
                    await client.connect(str(self.qmp_socket))
                    break
                except (ConnectError, FileNotFoundError):
                    if not self.alive() or time.monotonic() > deadline:
                        raise VMError("QEMU did not open its QMP socket", list(self._tail)) from None
                    await asyncio.sleep(0.002)
            try:
                if self.ram_file is not None:  # the RAM is the file's: the stream carries only device state
                    await client.execute("migrate-set-capabilities", IGNORE_SHARED)
                await client.execute("migrate-incoming", {"uri": uri})
                while True:  # "inmigrate" while the state streams in, then paused (the source was stopped)
                    status = (await client.execute("query-status"))["status"]
                    if status in ("paused", "postmigrate", "prelaunch"):
                        break
                    if status not in ("inmigrate",) or time.monotonic() > deadline:
                        raise VMError(f"restore ended in status {status!r}", list(self._tail))
                    await asyncio.sleep(0.002)
                await client.execute("cont")
            finally:
                await client.disconnect()

        asyncio.run(run())

    def _agent_address(self) -> tuple[str, int, str | None]:
        """(host, port, namespace to connect from) of the agent as the control plane reaches it."""
        if self.slot is not None:
            return self.slot.ns_ip, p.AGENT_PORT, self.slot.host_netns
        return "127.0.0.1", self.port, None

    def _hand_over_token(self, new_token: str, deadline: float) -> None:
        """The restored agent still holds the snapshot's token: replace it with this VM's own."""
        host, port, netns = self._agent_address()
        try:
            handover.hand_over(host, port, self.token, new_token, netns=netns, deadline=deadline, alive=self.alive)
        except handover.HandoverTimeout as exc:
            raise VMError(f"the restored agent {exc}", list(self._tail)) from None
        except handover.HandoverRefused as exc:
            raise VMError(f"the restored agent refused its new token ({exc})", list(self._tail)) from None
        self.token = new_token

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

    @property
    def pid(self) -> int | None:
        """QEMU's process id while it runs (the leader of its process group)."""
        return self._proc.pid if self._proc is not None else None

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

    def kill(self) -> None:
        """Kill QEMU at once (its process group), keeping its files: a snapshot template's disk is moved after."""
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
        self.kill()
        self.qmp_socket.unlink(missing_ok=True)
        if self.keep_console and self.console_log.exists():
            for path in self.workdir.iterdir():
                if path.name != self.console_log.name:
                    path.unlink(missing_ok=True)
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)
