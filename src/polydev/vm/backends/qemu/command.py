"""What one QEMU VM is made of, where its files are, and the kernel and QEMU command lines that say so.

Machine: `q35` with virtio-pci. QEMU's `microvm` machine (DESIGN §3) hangs Debian's cloud kernel under TCG at
TSC calibration (no PIT/HPET reference), and the kernel lacks VIRTIO_MMIO_CMDLINE_DEVICES, so q35 it is.
Network: QEMU user networking with `restrict=on` (the guest reaches nothing outside), one hostfwd from
127.0.0.1:<free port> to the agent, and a `guestfwd` per configured guest forward (VM_GUEST_FORWARDS,
polydev.vm.forwards): the host loopback services the guest may reach, and nothing else. In tap mode QEMU
runs inside a network slot's namespace on its TAP instead.

`QemuCommand` is only the description; running it (the process, its console, QMP) is `QemuVM` (machine.py).
"""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path

from polydev import protocol as p
from polydev.config.forwards import GuestForward
from polydev.vm.backends.qemu.errors import VMError
from polydev.vm.forwards import RELAY_MISSING, egress_rule, netdev_rule, relay_path
from polydev.vm.images import INIT_PATH, Image
from polydev.vm.network import VNC_PORT, Slot

GUEST_ADDR, GUEST_GATEWAY = "10.0.2.15/24", "10.0.2.2"  # QEMU user networking's fixed layout
# TCG CPU model. Measured here: with qemu64 Claude Code's native (Bun) binary dies of SIGILL; Nehalem and
# max both run all three CLIs, `gemini --version` 71 s vs 61 s, so max.
TCG_CPU = "max"


def _qemu_opt(path: Path) -> str:
    """A path as a value inside a QEMU option list (a comma would start the next option)."""
    return str(path).replace(",", ",,")


@dataclass(eq=False)
class QemuCommand:
    """One VM as QEMU is told about it: image, size, disk, guest RAM, network, and its work directory."""

    image: Image
    workdir: Path
    _: KW_ONLY
    vcpus: int = 2
    memory_mb: int = 2048
    tcg_cpu: str = TCG_CPU
    # Shows in the host's process list: how the engine's reconcile recognises its VMs after a crash.
    name: str | None = None
    # The overlay's backing file and its format: a snapshot's disk (qcow2, frozen at snapshot time) for a
    # restore; None, the image (raw), for a cold boot.
    backing: tuple[Path, str] | None = None
    # A network slot (tap mode): QEMU runs inside the slot's namespace on its TAP, the guest takes the
    # slot layout's fixed address, and the agent is reached at the slot's own address.
    slot: Slot | None = None
    # User networking only (a slot's egress is its firewall's business): host services the guest may reach.
    guest_forwards: tuple[GuestForward, ...] = ()
    # User networking with the egress gateway: (the guest's proxy address IP:PORT, this VM's gateway socket).
    egress: tuple[str, Path] | None = None
    # Guest RAM in a file (path, shared): a snapshot template writes its RAM there (shared), a restore maps
    # the snapshot's file copy-on-write (private), so nothing is loaded and every clone shares the page cache.
    ram_file: tuple[Path, bool] | None = None
    # A ready-made empty overlay to copy (a restore): 0.2 ms instead of ~50 ms for a qemu-img process.
    overlay_from: Path | None = None
    # The deadline file QEMU's supervisor watches (polydev.vm.lifetime): the engine's, which it moves with the
    # VM's expiry; None: one of the VM's own, without expiry (a snapshot template, a test's VM).
    deadline: Path | None = None
    port: int = field(default=0, init=False)  # user networking: the host port forwarded to the agent
    # User networking: a host port (127.0.0.1 only) forwarded to the guest's VNC server, for login-browser
    # VMs; 0 means none. Tap mode needs no forward: the control plane reaches the slot's address directly.
    vnc_port: int = field(default=0, init=False)

    # -- files ------------------------------------------------------------------------------------------

    @property
    def overlay(self) -> Path:
        return self.workdir / "disk.qcow2"

    @property
    def console_log(self) -> Path:
        return self.workdir / "console.log"

    @property
    def token_file(self) -> Path:
        return self.workdir / "token"

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

    # -- command lines ----------------------------------------------------------------------------------

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
        if self.egress is not None and self.slot is None:
            relay = relay_path()
            if relay is None:
                raise VMError(RELAY_MISSING)
            netdev += f",{egress_rule(self.egress[0], str(self.egress[1]), relay)}"
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
