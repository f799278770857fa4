"""PID 1 of the guest: mount what the agent and the CLIs need, bring up the network, run the agent.

Why not systemd: it would add seconds of unit processing on an emulated CPU and nothing here needs it.
Why one Python process: the agent is forked from this process after setup, so the interpreter starts once;
the parent stays PID 1 and reaps orphans (the CLIs spawn helpers that outlive their parents).
Debian's initramfs has already loaded the virtio modules, mounted the root file system (read-write, from
`rw` on the kernel command line) and moved /proc, /sys, /dev and /run into it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from polydev import protocol as p

MOUNTS = [  # (type, target, options); done only when not already mounted
    ("proc", "/proc", "nosuid,nodev,noexec"),
    ("sysfs", "/sys", "nosuid,nodev,noexec"),
    ("devtmpfs", "/dev", "mode=0755,nosuid"),
    ("devpts", "/dev/pts", "mode=0620,ptmxmode=0666,gid=5"),
    ("tmpfs", "/dev/shm", "mode=1777,nosuid,nodev"),  # Chromium aborts without it
    ("tmpfs", "/run", "mode=0755,nosuid,nodev"),
    ("tmpfs", "/tmp", "mode=1777,nosuid,nodev"),
]


def log(message: str) -> None:
    sys.stdout.write(f"polydev-init: {message}\n")
    sys.stdout.flush()


def mount_all() -> None:
    try:
        with open("/proc/mounts") as f:
            mounted = {line.split()[1] for line in f}
    except OSError:
        mounted = set()
    for fstype, target, options in MOUNTS:
        if target in mounted:
            continue
        os.makedirs(target, exist_ok=True)
        result = subprocess.run(["mount", "-t", fstype, "-o", options, fstype, target], capture_output=True)
        if result.returncode:
            log(f"mount {target} failed: {result.stderr.decode(errors='replace').strip()}")
    if not os.path.exists("/dev/ptmx"):
        os.symlink("pts/ptmx", "/dev/ptmx")


def network(conf: dict[str, str]) -> None:
    addr, gateway = conf.get(p.CMDLINE_ADDR), conf.get(p.CMDLINE_GATEWAY)
    nics = sorted(n for n in os.listdir("/sys/class/net") if n != "lo")
    commands = ["link set lo up"]
    if nics:
        commands.append(f"link set {nics[0]} up")
        if addr:
            commands.append(f"addr add {addr} dev {nics[0]}")
        if gateway:
            commands.append(f"route add default via {gateway}")
    # One `ip -batch` process instead of one per command: each exec costs a lot on an emulated CPU.
    result = subprocess.run(["ip", "-batch", "-"], input="\n".join(commands) + "\n", capture_output=True,
                            text=True)
    if result.returncode:
        log(f"ip: {result.stderr.strip()}")
    log(f"{nics[0] if nics else 'no interface'} {addr or 'unconfigured'} via {gateway or '-'}")


def read_token(conf: dict[str, str]) -> str | None:
    """The token from fw_cfg if the host sent one there, else from the kernel command line."""
    try:
        with open(f"{p.FW_CFG_SYSFS}/{p.FW_CFG_TOKEN}/raw") as f:
            return f.read().strip() or None
    except OSError:
        return conf.get(p.CMDLINE_TOKEN) or None


def start_agent(conf: dict[str, str], ready_fd: int | None = None) -> int:
    """Fork the agent. With ready_fd, it reports "listening" there instead of printing the READY line."""
    pid = os.fork()
    if pid:
        return pid
    try:
        os.setsid()
        from polydev.guest import agent

        announce = agent._print
        if ready_fd is not None:
            announce = lambda line: os.write(ready_fd, line.encode() + b"\n") and None  # noqa: E731
        agent.run(read_token(conf), int(conf.get(p.CMDLINE_PORT, p.AGENT_PORT)), announce=announce)
    except BaseException as exc:  # never return into PID 1's loop from the child
        log(f"agent failed: {exc!r}")
    finally:
        os._exit(1)


def main() -> None:
    with open("/proc/cmdline") as f:
        conf = p.parse_cmdline(f.read())
    os.environ.update({"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                       "HOME": "/root", "LANG": "C.UTF-8"})
    # The agent imports and binds (most of a second on an emulated CPU) while this process mounts and
    # configures the network; READY goes to the console only when both are done.
    ready_r, ready_w = os.pipe()
    agent_pid = start_agent(conf, ready_w)
    os.close(ready_w)
    mount_all()
    try:
        network(conf)
    except OSError as exc:
        log(f"network setup failed: {exc}")
    with os.fdopen(ready_r) as ready:
        line = ready.readline().strip()
    if line:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
    restarts: list[float] = []
    while True:  # PID 1: reap everything; restart the agent if it dies, but not in a tight loop
        try:
            pid, status = os.wait()
        except ChildProcessError:
            time.sleep(1)
            continue
        if pid == agent_pid:
            now = time.monotonic()
            restarts = [t for t in restarts if now - t < 60] + [now]
            log(f"agent exited with status {status}; restart {len(restarts)} in the last minute")
            if len(restarts) > 5:
                # PID 1 exiting panics the kernel; with panic=-1 and QEMU's -no-reboot the VM stops,
                # and the host sees the console log instead of a VM that never gets ready.
                log("agent keeps dying; stopping the VM")
                os.sync()
                sys.exit(1)
            agent_pid = start_agent(conf)


if __name__ == "__main__":
    main()
