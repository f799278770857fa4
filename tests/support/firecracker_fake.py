"""A stand-in for Firecracker's API server on a Unix socket, for contract tests without KVM.

It records every request, checks each against both published specifications (a violation is answered
with 400 and a fault_message, as Firecracker would, and kept in `violations`), and keeps the little state
Firecracker enforces: pre-boot-only calls, InstanceStart needing a kernel, snapshots only while paused,
snapshot load only on a fresh process, files that must exist (a snapshot load reopens the drives the snapshot
recorded, by the names it recorded). On InstanceStart it prints a line to stdout (in the subprocess mode, that
is the "serial console" the driver watches).

With an agent address (`agent_host`, or FAKE_AGENT_HOST in the environment, which `LoopbackSlot` sets the way a
real slot enters its namespace) it also plays the guest: on InstanceStart it prints its kernel command line
(as a chatty kernel would, so tests can prove the host redacts the token) and runs the real guest agent on
that address with the `polydev.token` of the boot args, announcing READY on the console; the agent's token is
part of a snapshot, and a restored fake runs the agent again with the token it had when it was frozen.

Two ways to run it:
- in-process: `async with FakeFirecracker(sock, specs) as fake:` for client tests;
- as a fake `firecracker` binary (`python -m tests.support.firecracker_fake --api-sock PATH ...`, see
  `write_fake_binary`), and as a fake `jailer` (`jailer` sub-command) for driver tests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from polydev import protocol as p
from polydev.vm.network import Slot, SlotAddress
from tests.support.firecracker_spec import REPO_ROOT, Spec, load_specs

PRE_BOOT_ONLY = "The requested operation is not supported after starting the microVM."
CONSOLE_LINE = "fake-guest: booted"
REASONS = {200: "OK", 204: "No Content", 400: "Bad Request", 404: "Not Found", 500: "Internal Server Error"}
AGENT_HOST_ENV = "FAKE_AGENT_HOST"
VERSION = "Firecracker v1.13.2 (fake)"


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    body: Any


class FakeFirecracker:
    def __init__(self, socket_path: Path, specs: list[Spec], *, root: Path | None = None,
                 record: Path | None = None, console_line: str = CONSOLE_LINE,
                 agent_host: str | None = None, guest_netns: bool = False) -> None:
        self.socket_path = socket_path
        self.agent_host = agent_host
        self.guest_netns = guest_netns  # run the agent in the slot's emulated guest namespace
        self.agent: Any = None  # polydev.guest.agent.Agent, once the "guest" runs
        self.boot_args = ""
        self.drives: dict[str, str] = {}
        self.specs = specs
        self.root = root  # a jail's chroot: API paths are resolved inside it
        self.record = record
        self.console_line = console_line
        self.requests: list[Request] = []
        self.violations: list[str] = []
        self.faults: dict[tuple[str, str], tuple[int, str]] = {}
        self.state = "Not started"
        self.configured: set[str] = set()
        self.machine: dict[str, Any] = {"vcpu_count": 1, "mem_size_mib": 128, "smt": False,
                                        "track_dirty_pages": False}
        self._server: asyncio.AbstractServer | None = None

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.socket_path))
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def serve_forever(self) -> None:
        async with self:
            assert self._server is not None
            await self._server.serve_forever()

    # -- HTTP/1.1, just enough for httpx: keep-alive, Content-Length bodies ------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while request_line := await reader.readline():
                method, target, _ = request_line.decode("latin-1").split(" ", 2)
                headers: dict[str, str] = {}
                while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
                    name, _, value = line.decode("latin-1").partition(":")
                    headers[name.strip().lower()] = value.strip()
                raw = await reader.readexactly(int(headers.get("content-length", "0")))
                status, answer = self.handle(method, target, raw)
                payload = json.dumps(answer).encode() if answer is not None else b""
                head = f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}\r\nContent-Length: {len(payload)}\r\n"
                if payload:
                    head += "Content-Type: application/json\r\n"
                writer.write(head.encode() + b"\r\n" + payload)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    # -- Firecracker's behaviour -------------------------------------------------------------------------

    def handle(self, method: str, path: str, raw: bytes) -> tuple[int, Any]:
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            return 400, {"fault_message": "body is not JSON"}
        request = Request(method, path, body)
        self.requests.append(request)
        if self.record is not None:
            with open(self.record, "a") as out:
                out.write(json.dumps({"method": method, "path": path, "body": body}) + "\n")
        problems = [f"{spec.version}: {v}" for spec in self.specs for v in spec.violations(method, path, body)]
        if problems:
            self.violations.extend(problems)
            return 400, {"fault_message": "; ".join(problems)}
        if (method, path) in self.faults:
            status, message = self.faults[(method, path)]
            return status, {"fault_message": message}
        try:
            return self._route(request)
        except Refused as exc:
            return 400, {"fault_message": str(exc)}

    def _route(self, r: Request) -> tuple[int, Any]:
        key = (r.method, "/" + r.path.strip("/").split("/")[0])
        if key == ("GET", "/"):
            return 200, {"id": "fake", "state": self.state, "vmm_version": "1.13.2", "app_name": "Firecracker"}
        if key == ("GET", "/version"):
            return 200, {"firecracker_version": "1.13.2"}
        if key == ("GET", "/machine-config"):
            return 200, self.machine
        if key == ("PUT", "/actions"):
            return self._action(r.body["action_type"])
        if key == ("PATCH", "/vm"):
            if self.state == "Not started":
                raise Refused("The microVM is not running.")
            self.state = "Paused" if r.body["state"] == "Paused" else "Running"
            return 204, None
        if key == ("PUT", "/snapshot"):
            return self._snapshot(r.path, r.body)
        if key == ("PATCH", "/drives"):
            if self.state == "Not started":
                raise Refused("Operation not allowed pre-boot.")
            self._must_exist(r.body["path_on_host"])
            return 204, None
        if self.state != "Not started":
            raise Refused(PRE_BOOT_ONLY)
        if key == ("PUT", "/machine-config"):
            self.machine = {"smt": False, "track_dirty_pages": False, **r.body}
        elif key == ("PATCH", "/machine-config"):
            self.machine.update(r.body)
        elif key == ("PUT", "/boot-source"):
            self._must_exist(r.body["kernel_image_path"])
            self.boot_args = r.body.get("boot_args", "")
        elif key == ("PUT", "/drives"):
            self._must_exist(r.body["path_on_host"])
            self.drives[r.body["drive_id"]] = r.body["path_on_host"]
        elif key == ("PUT", "/logger"):
            self._must_exist(r.body["log_path"])
        self.configured.add(r.path)
        return 204, None

    def _action(self, action: str) -> tuple[int, Any]:
        if action == "InstanceStart":
            if self.state != "Not started":
                raise Refused(PRE_BOOT_ONLY)
            if "/boot-source" not in self.configured:
                raise Refused("Cannot start microvm without kernel configuration.")
            self.state = "Running"
            print(self.console_line, flush=True)
            if self.agent_host:
                print(f"Kernel command line: {self.boot_args}", flush=True)
                self._run_agent(p.parse_cmdline(self.boot_args).get(p.CMDLINE_TOKEN), announce=True)
        elif action == "SendCtrlAltDel" and self.state != "Running":
            raise Refused("The microVM is not running.")
        return 204, None

    def _snapshot(self, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        if path == "/snapshot/create":
            if self.state != "Paused":
                raise Refused("Cannot save the microVM state: the microVM is not paused.")
            # The "memory" holds what a guest would: the agent's token as it is now.
            token = self.agent._token if self.agent is not None else None
            self._host(body["snapshot_path"]).write_text(json.dumps(
                {"machine": self.machine, "drives": self.drives, "token": token}))
            self._host(body["mem_file_path"]).write_bytes(b"\0" * 4096)
            return 204, None
        if self.state != "Not started" or self.configured - {"/logger", "/metrics"}:
            raise Refused("Loading a microVM snapshot not allowed after configuring boot-specific resources.")
        self._must_exist(body["snapshot_path"])
        self._must_exist(body["mem_backend"]["backend_path"])
        frozen = json.loads(self._host(body["snapshot_path"]).read_text())
        for drive in frozen["drives"].values():
            self._must_exist(drive)  # Firecracker reopens each drive by the name the snapshot recorded
        self.machine, self.drives = frozen["machine"], frozen["drives"]
        self.state = "Running" if body.get("resume_vm") else "Paused"
        if self.agent_host and frozen["token"]:
            self._run_agent(frozen["token"], announce=False)  # a restored guest says nothing on its console
        return 204, None

    def _run_agent(self, token: str | None, *, announce: bool) -> None:
        from polydev.guest import agent

        assert self.agent_host is not None
        self.agent = agent.Agent(token)
        if self.guest_netns:
            sock = _in_guest_netns(lambda: agent.listen(p.AGENT_PORT, self.agent_host))  # type: ignore[arg-type]
        else:
            sock = agent.listen(p.AGENT_PORT, self.agent_host)
        threading.Thread(target=agent.serve, args=(sock, self.agent.handle), daemon=True).start()
        if announce:
            print(f"{p.READY_MARKER} port={p.AGENT_PORT}", flush=True)

    def _host(self, api_path: str) -> Path:
        return self.root / api_path.lstrip("/") if self.root else Path(api_path)

    def _must_exist(self, api_path: str) -> None:
        if not self._host(api_path).exists():
            raise Refused(f"No such file or directory (os error 2): {api_path}")


def _in_guest_netns(make: Any) -> Any:
    """Call `make` in a thread inside `<this slot>-g`, the namespace SlotNetwork builds to play a slot's guest
    (a veth named like the TAP leads there). The fake runs in the slot's namespace (`ip netns exec`), which it
    finds by its inode among the named ones; a socket keeps the namespace it was made in."""
    import ctypes

    mine = os.stat("/proc/self/ns/net").st_ino
    netns_dir = Path("/run/netns")
    slot = next(n.name for n in netns_dir.iterdir() if n.stat().st_ino == mine)
    made: list[Any] = []

    def run() -> None:
        fd = os.open(netns_dir / f"{slot}-g", os.O_RDONLY)
        if ctypes.CDLL(None, use_errno=True).setns(fd, 0x40000000) != 0:  # CLONE_NEWNET
            raise OSError(ctypes.get_errno(), "setns")
        os.close(fd)
        made.append(make())

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return made[0]


class Refused(Exception):
    """Firecracker refuses the request in its current state (answered 400 with this fault_message)."""


# -- subprocess modes -------------------------------------------------------------------------------------


def write_fake_binary(path: Path, *extra_args: str, sub_command: str = "firecracker") -> Path:
    """Write an executable script that runs this module (as a fake firecracker or jailer) with `extra_args`."""
    path.write_text(f"#!{sys.executable}\n"
                    "import sys\n"
                    f"sys.path.insert(0, {str(REPO_ROOT)!r})\n"
                    "from tests.support.firecracker_fake import main\n"
                    f"sys.exit(main([{sub_command!r}, *{list(extra_args)!r}, *sys.argv[1:]]))\n")
    path.chmod(0o755)
    return path


def main(argv: list[str]) -> int:
    if argv[:1] == ["jailer"]:
        return _jailer(argv[1:])
    if "--version" in argv:
        print(VERSION)
        return 0
    parser = argparse.ArgumentParser(prog="fake-firecracker")
    parser.add_argument("--api-sock", required=True)
    parser.add_argument("--id", default="anonymous-instance")
    parser.add_argument("--chroot", type=Path, help="set by the fake jailer: the jail's root")
    parser.add_argument("--record", type=Path, help="append every request here as a JSON line")
    parser.add_argument("--fault", action="append", default=[], help="'METHOD PATH=STATUS:message'")
    parser.add_argument("--agent-host", default=os.environ.get(AGENT_HOST_ENV),
                        help="play the guest: run the guest agent on this address")
    parser.add_argument("--guest-netns", action="store_true",
                        help="run the agent in the slot's emulated guest namespace (tap-mode tests)")
    args = parser.parse_args(argv[1:])
    sock = Path(args.api_sock)
    if args.chroot:  # as in a real jail, the socket is bound by its short name under the jail's root
        os.chdir(args.chroot)
        sock = Path(args.api_sock.lstrip("/"))
    fake = FakeFirecracker(sock, load_specs(), root=args.chroot, record=args.record, agent_host=args.agent_host,
                           guest_netns=args.guest_netns)
    for fault in args.fault:
        where, _, answer = fault.partition("=")
        method, path = where.split(" ", 1)
        status, _, message = answer.partition(":")
        fake.faults[(method, path)] = (int(status), message)
    print(f"fake firecracker {args.id} listening on {sock}", flush=True)
    asyncio.run(fake.serve_forever())
    return 0


def _jailer(argv: list[str]) -> int:
    """The jailer's interface (docs/jailer.md) without its privileges: it builds the chroot path, records how
    it was called, and execs the fake firecracker telling it where the jail is."""
    parser = argparse.ArgumentParser(prog="fake-jailer")
    for flag in ("--id", "--exec-file", "--uid", "--gid"):
        parser.add_argument(flag, required=True)
    parser.add_argument("--chroot-base-dir", default="/srv/jailer")
    for flag in ("--netns", "--cgroup-version", "--parent-cgroup"):
        parser.add_argument(flag)
    parser.add_argument("--cgroup", action="append", default=[])
    parser.add_argument("--resource-limit", action="append", default=[])
    parser.add_argument("--new-pid-ns", action="store_true")
    parser.add_argument("--record-argv", type=Path)
    rest = argv[argv.index("--") + 1:] if "--" in argv else []
    args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    if args.record_argv:
        args.record_argv.write_text(json.dumps(argv))
    exec_file = Path(args.exec_file)
    if "firecracker" not in exec_file.name:
        print("jailer: exec file name must contain 'firecracker'", file=sys.stderr)
        return 1
    chroot = Path(args.chroot_base_dir) / exec_file.name / args.id / "root"
    chroot.mkdir(parents=True, exist_ok=True)
    fc_argv = [str(exec_file), f"--id={args.id}", "--chroot", str(chroot), *rest]
    if args.new_pid_ns:
        # The real jailer clones the VMM into a new PID namespace, writes its pid and exits.
        child = os.fork()
        if child == 0:
            os.execv(exec_file, fc_argv)
        (chroot / f"{exec_file.name}.pid").write_text(str(child))
        return 0
    os.execv(exec_file, fc_argv)
    return 1  # not reached


# -- network slots on loopback addresses -------------------------------------------------------------------


@dataclass(frozen=True)
class LoopbackSlot(Slot):
    """A slot without a namespace: its "namespace address" is a loopback address of its own, where the fake
    guest runs its agent. Its prefix tells the fake that address, the way a real slot's prefix puts the
    hypervisor in the slot's namespace."""

    def command_prefix(self) -> list[str]:
        return ["env", f"{AGENT_HOST_ENV}={self.ns_ip}"]


class LoopbackSlots:
    """The engine's SlotNetwork, for backends driving the fake: slot i is 127.<net>.<i>.2, nothing is built."""

    def __init__(self, net: int, capacity: int = 8) -> None:
        self.net = net
        self.capacity = capacity
        self.live: set[int] = set()
        self.created: list[int] = []

    def address(self, index: int) -> SlotAddress:
        return SlotAddress(index, f"127.{self.net}.{index}.1", f"127.{self.net}.{index}.2")

    def create(self, index: int) -> LoopbackSlot:
        addr = self.address(index)
        self.live.add(index)
        self.created.append(index)
        return LoopbackSlot(index, f"lo-slot-{index}", f"loh{index}", addr.host_ip, addr.ns_ip)

    def destroy(self, index: int) -> None:
        self.live.discard(index)

    def reclaim(self, live: set[int]) -> list[int]:
        removed = sorted(self.live - set(live))
        self.live -= set(removed)
        return removed
