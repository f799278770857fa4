"""Running Firecracker under the jailer: its flags (Firecracker's docs/jailer.md), and files linked into a
jail."""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from polydev.vm.backends.firecracker.errors import FirecrackerError

# The jailer's --id: letters, digits and hyphens, at most 64 characters (docs/jailer.md).
JAIL_ID = re.compile(r"^[A-Za-z0-9-]{1,64}$")


@dataclass(frozen=True)
class JailerConfig:
    """How to run Firecracker under the jailer (flags as in Firecracker's docs/jailer.md).

    --daemonize is deliberately not offered: the driver must keep the process as its child to watch and kill
    it, and the jailer refuses to daemonize as a process-group leader, which our children are.
    """

    binary: Path
    uid: int
    gid: int
    chroot_base_dir: Path = Path("/srv/jailer")
    netns: Path | None = None  # e.g. /var/run/netns/<slot>: the VM's network slot
    cgroup_version: Literal[1, 2] | None = None
    cgroups: tuple[str, ...] = ()  # "<file>=<value>", e.g. "cpuset.cpus=0-3"
    parent_cgroup: str | None = None
    resource_limits: tuple[str, ...] = ()  # "<resource>=<value>", e.g. "no-file=1024"
    new_pid_ns: bool = False

    def chroot_dir(self, firecracker_binary: Path, vm_id: str) -> Path:
        """The jail's root, as the jailer builds it: <base>/<exec file name>/<id>/root."""
        return self.chroot_base_dir / firecracker_binary.name / vm_id / "root"

    def argv(self, vm_id: str, firecracker_binary: Path, firecracker_args: Sequence[str]) -> list[str]:
        if not JAIL_ID.match(vm_id):
            raise ValueError(f"jailer id {vm_id!r}: letters, digits and hyphens only, at most 64")
        if "firecracker" not in firecracker_binary.name:
            # The jailer itself refuses other names; say so before spawning anything.
            raise ValueError(f"jailer --exec-file must be named *firecracker*, got {firecracker_binary.name!r}")
        argv = [str(self.binary), "--id", vm_id, "--exec-file", str(firecracker_binary),
                "--uid", str(self.uid), "--gid", str(self.gid), "--chroot-base-dir", str(self.chroot_base_dir)]
        if self.netns is not None:
            argv += ["--netns", str(self.netns)]
        if self.cgroup_version is not None:
            argv += ["--cgroup-version", str(self.cgroup_version)]
        for cgroup in self.cgroups:
            argv += ["--cgroup", cgroup]
        if self.parent_cgroup is not None:
            argv += ["--parent-cgroup", self.parent_cgroup]
        for limit in self.resource_limits:
            argv += ["--resource-limit", limit]
        if self.new_pid_ns:
            argv.append("--new-pid-ns")
        # Everything after "--" goes to Firecracker; the jailer already passes --id itself.
        return [*argv, "--", *firecracker_args]


def link_into_jail(host_path: Path, inside: Path) -> None:
    """Hard-link a file into a jail: a copy would cost what the per-VM disks exist to avoid."""
    try:
        os.link(host_path, inside)
    except OSError as exc:
        if exc.errno == errno.EXDEV:
            raise FirecrackerError(f"{host_path} is on another file system than the jail {inside.parent}: put "
                                   "the jailer's chroot base (FIRECRACKER_BASE) beside the VM files") from exc
        raise
