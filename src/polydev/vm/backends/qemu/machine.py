"""Run a QEMU VM: KVM when it works, TCG otherwise; readiness from the serial console.

Readiness: a reader thread copies the serial console to `console.log` and wakes the starter the moment the
agent's READY line appears, or the moment QEMU exits. No sleeps.

This module is one VM (`QemuVM`): its overlay, its QEMU process, its console and QMP socket; cold boot or
restore from a snapshot's state. What it is made of and its command line are `QemuCommand` (command.py); the
engine's backend (backend.py) and its snapshots (snapshot.py) build on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shutil
import socket
import subprocess
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from polydev import protocol as p
from polydev.vm import handover, lifetime
from polydev.vm.agent_client import AgentClient
from polydev.vm.backends import kvm_host
from polydev.vm.backends.qemu import ram_cache
from polydev.vm.backends.qemu.command import QemuCommand
from polydev.vm.backends.qemu.errors import VMError

log = logging.getLogger(__name__)
# A kernel under KVM writes its first console line well within this; silence means KVM is not usable here.
KVM_FIRST_OUTPUT_S = 15.0
# The CPU priority of a VM restored from a snapshot (the users' VMs): below the control plane's, which under
# load (tens of busy guests on emulated CPUs) otherwise got a sliver of the CPU and answered 500s (database
# connections waited out their pool's timeout: tests/reliability/test_load.py). 10 is a tenth of a normal
# process's CPU weight. A cold boot (the snapshot's template, which every restore waits for) keeps the normal one.
RESTORED_NICE = 10
_kvm_usable: bool | None = None  # learnt once per process: the answer does not change while it runs
# Migration leaves out RAM that is a shared file mapping: the snapshot's RAM is its template's RAM file.
IGNORE_SHARED = {"capabilities": [{"capability": "x-ignore-shared", "state": True}]}
# The guest is stopped before its state is saved: no downtime to keep short, so QEMU's live-migration limits
# (32 MiB/s, 300 ms of downtime) only slow the save.
HIBERNATE_PARAMETERS = {"max-bandwidth": 64 * 1024**3, "downtime-limit": 60_000}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def kvm_available() -> bool:
    return os.access("/dev/kvm", os.R_OK | os.W_OK)


def kvm_usable() -> bool | None:
    """Whether a KVM boot worked in this process: True, False (it fell back to TCG), None (none tried yet)."""
    return _kvm_usable


@dataclass(eq=False, repr=False, kw_only=True)
class QemuVM(QemuCommand):
    """One VM: a qcow2 overlay on the image, a QEMU process, its console log and its QMP socket."""

    token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    # Given as what to try (auto, kvm or tcg), kept as `accel_wanted`; from then on `accel` is what the VM
    # booted under ("" until it has).
    accel: str = "auto"
    keep_console: bool = True
    accel_wanted: str = field(init=False)
    boot_seconds: float = field(default=0.0, init=False)
    # The running QEMU, and what its console reader has seen of it.
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False)
    _reader: threading.Thread | None = field(default=None, init=False)
    _ready: threading.Event = field(default_factory=threading.Event, init=False)
    _first_output: threading.Event = field(default_factory=threading.Event, init=False)
    _eof: threading.Event = field(default_factory=threading.Event, init=False)
    _is_ready: bool = field(default=False, init=False)
    _tail: deque[str] = field(default_factory=lambda: deque(maxlen=60), init=False)

    def __post_init__(self) -> None:
        self.accel_wanted, self.accel = self.accel, ""

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
                why = f"{kvm_error}; {kvm_host.PVM_ONLY}" if kvm_host.pvm_only() else kvm_error
                log.warning("KVM is not usable here (%s); falling back to TCG (software emulation)", why)
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
        backing, backing_format = self.backing or (self.image.rootfs.resolve(), "raw")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(backing),
                        "-F", backing_format, str(self.overlay)], check=True, capture_output=True)

    def _reset_overlay(self) -> None:
        self.overlay.unlink(missing_ok=True)
        self._create_overlay()

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
            self.kill()
            reason = (f"QEMU exited ({self._stderr_tail()})" if exited
                      else f"agent not ready after {ready_timeout:.0f} s")
            raise VMError(f"{accel}: {reason}", list(self._tail))
        self.boot_seconds = time.monotonic() - started
        return self.boot_seconds

    def _spawn(self, accel: str, extra: list[str] | None = None, pass_fds: tuple[int, ...] = (),
               nice: int = 0) -> float:
        """Start QEMU with the console reader running; returns the start time."""
        self.qmp_socket.unlink(missing_ok=True)
        # QEMU reads the file when it starts; it is removed as soon as the guest is up (or the boot failed).
        fd = os.open(self.token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.token)
        # QEMU under its supervisor, which execs it: the pid, the stdio and the marker are QEMU's all the same.
        argv, env = lifetime.supervised([*self.argv(accel), *(extra or [])], self.workdir,
                                        self.deadline or lifetime.hold(self.workdir), nice=nice)
        started = time.monotonic()
        stderr = open(self.workdir / "qemu.stderr", "wb")
        try:
            self._proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                          stderr=stderr, start_new_session=True, pass_fds=pass_fds)
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
                started = self._spawn(accel, ["-incoming", "defer"], pass_fds=(stream.fileno(),), nice=RESTORED_NICE)
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

    def resume_from(self, state: Path, accel: str, ready_timeout: float = 120.0) -> float:
        """Start again a VM this work directory holds hibernated (`hibernate`): its overlay as it was, its
        memory and devices from `state`, its agent still holding this VM's token. Returns seconds from QEMU
        start to running. On failure QEMU is killed and the files are kept (the VM can be woken again)."""
        self.accel = accel
        self.port = free_port()
        try:
            self._read_ram_ahead()  # the incoming state is written over those pages too
            with open(state, "rb") as stream:
                started = self._spawn(accel, ["-incoming", "defer"], pass_fds=(stream.fileno(),), nice=RESTORED_NICE)
                self._resume_when_migrated(started + ready_timeout, f"fd:{stream.fileno()}")
        except BaseException as exc:
            tail = list(self._tail)
            self.kill()
            if isinstance(exc, VMError) or not isinstance(exc, Exception):
                raise
            raise VMError(f"waking failed: {exc}", tail) from exc
        finally:
            self.token_file.unlink(missing_ok=True)
        self.boot_seconds = time.monotonic() - started
        return self.boot_seconds

    def boot_from_disk(self, accel: str, ready_timeout: float = 300.0) -> float:
        """Boot cold from the overlay this work directory keeps (a VM powered off by `power_off`): its files
        as they were, nothing of its memory. On failure QEMU is killed and the overlay kept."""
        try:
            return self._boot(accel, ready_timeout)
        except BaseException:
            self.kill()
            raise

    def power_off(self) -> None:
        """End QEMU keeping the overlay: `quit` flushes what the block layer holds (the guest has synced its
        own caches first), then the process is reaped."""
        try:
            # QEMU may close its QMP socket before the client reads the answer to `quit` (EOFError): it is
            # exiting either way, which the wait below sees.
            with contextlib.suppress(Exception):
                self.qmp("quit")
            assert self._proc is not None
            with contextlib.suppress(subprocess.TimeoutExpired):  # stuck: killed below (the guest has synced)
                self._proc.wait(timeout=30)
        finally:
            self.kill()
            self.qmp_socket.unlink(missing_ok=True)

    def hibernate(self, state: Path) -> None:
        """Stop the guest and write its memory and device state to `state` (QEMU migration; a restored VM's
        RAM is its own private copy, so all of it goes in), then end QEMU keeping the overlay."""
        self._read_ram_ahead()
        self.qmp("stop")
        if self.ram_file is not None:  # as its restore was told: the template's shared RAM is not in a stream
            self.qmp("migrate-set-capabilities", IGNORE_SHARED)
        self.qmp("migrate-set-parameters", HIBERNATE_PARAMETERS)
        self.qmp("migrate", {"uri": f"exec:cat > {state}"})
        while True:
            status = self.qmp("query-migrate").get("status")
            if status == "completed":
                break
            if status in ("failed", "cancelled"):
                self.qmp("cont")
                raise VMError(f"hibernation: the migration {status}", list(self._tail))
            time.sleep(0.05)
        self.kill()
        self.qmp_socket.unlink(missing_ok=True)

    def _read_ram_ahead(self) -> None:
        if self.ram_file is not None and not self.ram_file[1]:  # a private mapping of the snapshot's RAM file
            ram_cache.read_ahead(self.ram_file[0])

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
                    if not self.alive():  # e.g. its supervisor refused to start it: stderr says why
                        raise VMError(f"QEMU exited ({self._stderr_tail()})", list(self._tail)) from None
                    if time.monotonic() > deadline:
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
        try:
            out: BinaryIO | None = open(self.console_log, "ab")
        except OSError:
            # The work directory is gone: the VM's start was cancelled and its teardown removed it while
            # QEMU was being started. The console is still read to its end: the starter waits on that.
            out = None
        try:
            self._write_console(out, f"=== boot ({self.accel}) ===\n".encode())
            for raw in proc.stdout:
                self._first_output.set()
                self._write_console(out, raw)
                line = raw.decode("utf-8", "replace").rstrip()
                self._tail.append(line)
                if not self._is_ready and p.READY_MARKER in line:
                    self._is_ready = True
                    self._ready.set()
        except (ValueError, OSError):
            pass  # kill() closed the pipe under a reader that had not reached its end: that is its end too
        finally:
            if out is not None:
                out.close()
            self._eof.set()
            self._first_output.set()
            self._ready.set()  # QEMU is gone: wake the starter rather than let it wait out its timeout

    @staticmethod
    def _write_console(out: BinaryIO | None, data: bytes) -> None:
        if out is None:
            return
        with contextlib.suppress(OSError):  # a full disk loses console lines, never the readiness signal
            out.write(data)
            out.flush()

    def _stderr_tail(self) -> str:
        """The last lines of QEMU's stderr, where its supervisor too says why it ended it."""
        try:
            return "; ".join((self.workdir / "qemu.stderr").read_text(errors="replace").strip().splitlines()[-3:])
        except OSError:
            return "its stderr is gone with its work directory"

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
