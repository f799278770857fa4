"""The supervisor beside every hypervisor process: it ends the VM when the VM's time is up, whether or not a
server still runs.

Why: a hypervisor runs in a session of its own (a server's signals must not reach it), so it outlives the
server that started it, and neither QEMU nor Firecracker can be given a lifetime. After a crash, or a server
stopped while a VM was still starting, nothing but the next server's reconcile would ever stop it. So every
hypervisor is bound to three things that outlive the server:
- its deadline file (polydev.vm.lifetime), which the engine writes and moves with the VM's expiry: past, or
  gone, the VM is killed;
- its work directory: gone, the VM is killed;
- the process that started it (the engine's): gone, the VM is killed. The VM's agent token lived only in
  that process, so nothing could ever use the VM again.

How: a backend runs `lifetime.supervised(argv, ...)` instead of `argv`: this file as a script, which checks
the deadline, forks the supervisor and execs the hypervisor in its own place. So the hypervisor keeps the
pid, process group, parent and stdio its backend gave it, and its marker (polydev.vm.proc) in its command
line, while the supervisor's command line carries no marker (the hypervisor's comes in the environment):
reconcile finds exactly the hypervisors, and the backends' waits and kills work on them as before. The
supervisor is in the hypervisor's process group, so a kill of the group (a backend's stop, reconcile) takes
it too; and it ends the VM by killing that group, itself included: neither outlives the other. It exits when
the hypervisor has exited and nothing else of the group is left; what is left (the VMM a jailer hands off
to) it watches on.

Run by path with `-I -S`, so it is the very code of the engine that started it, without that engine's import
path; it imports little, since the hypervisor starts only after it has. Linux 5.3 or later (pidfds).
"""

import os
import select
import sys
import time

ARGV_ENV = "POLYDEV_SUPERVISED_ARGV"  # the hypervisor's command line, its arguments joined by SEP
SEP = "\x1f"  # (the ASCII unit separator: in no argument of ours, which lifetime.supervised checks)
TICK = 1.0  # seconds between looks at the deadline file and the work directory
SIGKILL = 9
NICE_ENV = "POLYDEV_SUPERVISED_NICE"  # a lower CPU priority for the hypervisor (lifetime.supervised's `nice`)


class _End(Exception):
    """The VM must end now; the message says why."""


def _say(workdir: str, message: str) -> None:
    # Into the hypervisor's stderr (kept with its console), where whoever wonders why it died looks.
    try:
        os.write(2, f"polydev supervisor: VM {os.path.basename(workdir)}: {message}\n".encode())
    except OSError:
        pass


def _check(workdir: str, deadline: str) -> tuple[str | None, float | None]:
    """(why the VM must end, or None; when it expires, or None when it has no expiry)."""
    if not os.path.isdir(workdir):
        return "its work directory is gone", None
    try:
        with open(deadline) as f:
            text = f.read().strip()
    except FileNotFoundError:
        return "its deadline was withdrawn", None
    except OSError as exc:
        return f"its deadline file is unreadable ({exc.strerror})", None
    if not text:
        return None, None
    try:
        expires = float(text)
    except ValueError:
        return "its deadline file is unreadable", None
    if time.time() >= expires:
        return f"it expired at {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(expires))}", expires
    return None, expires


def _group_members() -> list[int]:
    """The live processes of this process group but this one."""
    me, group = os.getpid(), os.getpgrp()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()  # after the name: state, ppid, pgrp, ...
        except (OSError, IndexError):
            continue
        if fields[0] != b"Z" and int(fields[2]) == group:
            found.append(int(entry))
    return found


def _lower_priority(nice: int) -> None:
    """`nice` for this process, the hypervisor it becomes and its threads. The hypervisor runs in a session of
    its own, which with the kernel's autogroup scheduling (sched_autogroup_enabled) is a CPU group of its own,
    weighed against the server's as an equal whatever the processes' nice values: so the group's is set too."""
    try:
        os.setpriority(os.PRIO_PROCESS, 0, max(nice, os.getpriority(os.PRIO_PROCESS, 0)))
    except OSError:
        pass
    try:
        with open("/proc/self/autogroup", "w") as f:  # absent without autogroup scheduling: nothing to do then
            f.write(str(nice))
    except OSError:
        pass


def _on_signal(signum: int, frame: object) -> None:
    raise _End(f"the supervisor got signal {signum}")


def _watch(hypervisor: int, starter: int, workdir: str, deadline: str) -> None:
    """Return when the VM has ended on its own; raise _End when it must be ended."""
    import signal  # here, not at the top: the hypervisor is not waiting for this process any more

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    os.chdir("/")
    # The hypervisor's stdout is its console, read by its backend to the end: that end must not wait for us.
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.close(null)
    os.closerange(3, starter)  # descriptors passed to the hypervisor (a snapshot's state) are not ours
    os.closerange(starter + 1, os.sysconf("SC_OPEN_MAX"))
    try:
        first = os.pidfd_open(hypervisor)
    except ProcessLookupError:
        return
    if os.getppid() != hypervisor:  # it exited before we looked; its pid may be someone else's by now
        return
    poller = select.poll()
    poller.register(starter, select.POLLIN)
    poller.register(first, select.POLLIN)
    watched = {first}
    while True:
        reason, expires = _check(workdir, deadline)
        if reason is not None:
            raise _End(reason)
        wait = TICK if expires is None else min(TICK, max(0.0, expires - time.time()) + 0.01)
        for fd, _ in poller.poll(wait * 1000):
            if fd == starter:
                raise _End("the process that started it is gone")
            poller.unregister(fd)
            os.close(fd)
            watched.discard(fd)
        if not watched:
            # The hypervisor has exited. Whatever else of its group lives on is still the VM (a jailer's VMM).
            for pid in _group_members():
                try:
                    fd = os.pidfd_open(pid)
                except ProcessLookupError:
                    continue
                poller.register(fd, select.POLLIN)
                watched.add(fd)
            if not watched:
                return


def main(args: list[str]) -> int:
    workdir, deadline, starter = args[0], args[1], int(args[2])
    argv = os.environ.pop(ARGV_ENV).split(SEP)
    nice = os.environ.pop(NICE_ENV, "")
    try:
        starter_fd = os.pidfd_open(starter)
    except ProcessLookupError:
        starter_fd = -1
    if starter_fd < 0 or os.getppid() != starter:  # (checked after the open: the pid was not reused since)
        _say(workdir, "the process that started it is gone: not starting it")
        return 1
    reason, _ = _check(workdir, deadline)
    if reason is not None:
        _say(workdir, f"{reason}: not starting it")
        return 1
    if nice:
        _lower_priority(int(nice))
    hypervisor = os.getpid()
    if os.fork() == 0:
        try:
            _watch(hypervisor, starter_fd, workdir, deadline)
        except BaseException as exc:  # _End, or the supervisor itself failing: either way the VM goes with it
            _say(workdir, f"{exc if isinstance(exc, _End) else f'the supervisor failed ({exc!r})'}: killing it")
            os.killpg(0, SIGKILL)
        os._exit(0)
    os.close(starter_fd)
    try:
        os.execvp(argv[0], argv)
    except OSError as exc:
        _say(workdir, f"cannot run {argv[0]}: {exc.strerror}")
    return 127


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
