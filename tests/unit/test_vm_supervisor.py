"""The supervisor beside each hypervisor (polydev.vm.supervisor, polydev.vm.lifetime), with a stand-in
hypervisor: a process carrying a VM's marker. It ends the VM at its deadline and not before, when its deadline
is withdrawn or its work directory removed, and when the process that started it is gone; it never outlives
the VM nor the VM it; and the hypervisor keeps its pid, marker, console and passed descriptors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from polydev.store.models import utcnow
from polydev.vm import lifetime
from polydev.vm.proc import find_marked_processes, marker_for, process_gone
from tests.support.waits import eventually

SRC = Path(lifetime.__file__).resolve().parents[2]
# The stand-in hypervisor: says it booted on its console, then sleeps. Its marker is its first argument.
SLEEPER = "import sys, time\nprint('booted', flush=True)\ntime.sleep(600)\n"


@pytest.fixture
def tag() -> str:
    return uuid.uuid4().hex[:8]  # this test's own: processes of concurrent runs are none of its business


@pytest.fixture
def workdir(tmp_path: Path, tag: str) -> Iterator[Path]:
    path = tmp_path / "vm"
    path.mkdir()
    yield path
    for pid in find_marked_processes(tag).values():  # a failed test must not leave its stand-in running
        os.kill(pid, signal.SIGKILL)


def start(workdir: Path, tag: str, code: str = SLEEPER, *, pass_fds: tuple[int, ...] = (),
          nice: int = 0) -> subprocess.Popen[bytes]:
    """The stand-in under its supervisor, the way the backends start a hypervisor; returns once it booted."""
    argv, env = lifetime.supervised([sys.executable, "-c", code, marker_for(tag, uuid.uuid4())], workdir,
                                    lifetime.deadline_file(workdir), nice=nice)
    with open(workdir / "stderr", "wb") as stderr:
        proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr,
                                start_new_session=True, pass_fds=pass_fds)
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"booted\n", (workdir / "stderr").read_text()
    return proc


def supervisor_of(proc: subprocess.Popen[bytes]) -> int:
    [pid] = [int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) != proc.pid and _group(int(p)) == proc.pid]
    return pid


def _group(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[2])
    except (OSError, IndexError):
        return None


def ended(proc: subprocess.Popen[bytes]) -> bool:
    return proc.poll() is not None


def test_the_hypervisor_keeps_its_pid_and_marker_and_the_supervisor_dies_with_it(workdir: Path, tag: str) -> None:
    lifetime.set_deadline(lifetime.deadline_file(workdir), None)
    proc = start(workdir, tag)
    # The pid the backend holds is the hypervisor's, found by its marker; the supervisor carries none.
    assert list(find_marked_processes(tag).values()) == [proc.pid]
    watcher = supervisor_of(proc)
    assert b"polydev-" not in Path(f"/proc/{watcher}/cmdline").read_bytes()
    os.killpg(proc.pid, signal.SIGKILL)  # what the backends' stop and reconcile do
    assert proc.wait() == -signal.SIGKILL
    assert eventually(lambda: process_gone(watcher))


def test_the_vm_ends_at_its_deadline_and_not_before_it(workdir: Path, tag: str) -> None:
    deadline = lifetime.deadline_file(workdir)
    first = utcnow() + timedelta(seconds=3)
    lifetime.set_deadline(deadline, first)
    proc = start(workdir, tag)
    lifetime.set_deadline(deadline, utcnow() + timedelta(minutes=10))  # the engine moves it (a hand-out)
    # Two looks of the supervisor after the first deadline, the VM still runs.
    assert not eventually(lambda: ended(proc), timeout=(first - utcnow()).total_seconds() + 2.5)
    lifetime.set_deadline(deadline, utcnow() - timedelta(seconds=1))
    assert eventually(lambda: ended(proc))
    assert proc.returncode == -signal.SIGKILL
    assert "expired at" in (workdir / "stderr").read_text()
    assert find_marked_processes(tag) == {}


@pytest.mark.parametrize("how", ["withdrawn", "workdir removed"])
def test_the_vm_ends_when_its_deadline_or_work_directory_goes(workdir: Path, tag: str, how: str) -> None:
    import shutil

    lifetime.set_deadline(lifetime.deadline_file(workdir), utcnow() + timedelta(minutes=10))
    stderr = workdir.parent / "stderr"
    proc = start(workdir, tag)
    os.replace(workdir / "stderr", stderr)  # (the file stays open: it is kept when the directory goes)
    if how == "withdrawn":
        lifetime.withdraw(lifetime.deadline_file(workdir))
    else:
        shutil.rmtree(workdir)
    assert eventually(lambda: ended(proc))
    assert ("was withdrawn" if how == "withdrawn" else "work directory is gone") in stderr.read_text()


def test_a_vm_without_a_deadline_file_is_not_started(workdir: Path, tag: str) -> None:
    argv, env = lifetime.supervised([sys.executable, "-c", SLEEPER, marker_for(tag, uuid.uuid4())], workdir,
                                    lifetime.deadline_file(workdir))
    done = subprocess.run(argv, env=env, capture_output=True, timeout=60)
    assert done.returncode == 1 and done.stdout == b""
    assert b"its deadline was withdrawn: not starting it" in done.stderr


STARTER = textwrap.dedent('''
    import subprocess, sys
    sys.path.insert(0, sys.argv[1])
    from pathlib import Path
    from polydev.vm import lifetime
    workdir = Path(sys.argv[2])
    lifetime.set_deadline(lifetime.deadline_file(workdir), None)
    argv, env = lifetime.supervised([sys.executable, "-c", sys.argv[3], sys.argv[4]], workdir,
                                    lifetime.deadline_file(workdir))
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, start_new_session=True)
    print(proc.pid, proc.stdout.readline().decode().strip(), flush=True)
    proc.wait()
''')


def test_the_vm_dies_with_the_process_that_started_it(workdir: Path, tag: str) -> None:
    starter = subprocess.Popen([sys.executable, "-c", STARTER, str(SRC), str(workdir), SLEEPER,
                                marker_for(tag, uuid.uuid4())], stdout=subprocess.PIPE)
    assert starter.stdout is not None
    pid, booted = starter.stdout.readline().split()
    assert booted == b"booted" and list(find_marked_processes(tag).values()) == [int(pid)]
    starter.kill()  # SIGKILL: no clean-up of its own
    starter.wait()
    assert eventually(lambda: process_gone(int(pid)))
    assert find_marked_processes(tag) == {}


def test_the_console_ends_with_the_hypervisor_and_passed_descriptors_reach_it(workdir: Path, tag: str) -> None:
    lifetime.set_deadline(lifetime.deadline_file(workdir), None)
    reader, writer = os.pipe()
    os.write(writer, b"state")
    os.close(writer)
    code = f"import os\nprint('booted', flush=True)\nprint(os.read({reader}, 5).decode(), flush=True)\n"
    try:
        proc = start(workdir, tag, code, pass_fds=(reader,))
    finally:
        os.close(reader)
    watcher = supervisor_of(proc)
    assert proc.stdout is not None
    assert proc.stdout.read() == b"state\n"  # to its end: the supervisor does not hold the console open
    assert proc.wait() == 0
    assert eventually(lambda: process_gone(watcher))  # nothing of its VM left to watch


# A jailer with --new-pid-ns: it starts the VMM in its own process group and exits.
HANDING_OFF = textwrap.dedent('''
    import os, sys, time
    if os.fork() == 0:
        print("booted", flush=True)
        time.sleep(600)
    time.sleep(0.2)
''')


def test_what_a_jailer_hands_off_to_is_watched_on(workdir: Path, tag: str) -> None:
    deadline = lifetime.deadline_file(workdir)
    lifetime.set_deadline(deadline, None)
    proc = start(workdir, tag, HANDING_OFF)
    assert proc.wait() == 0
    [vmm] = [p for p in find_marked_processes(tag).values() if p != proc.pid]
    assert not process_gone(vmm) and _group(vmm) == proc.pid
    lifetime.set_deadline(deadline, utcnow() - timedelta(seconds=1))
    assert eventually(lambda: process_gone(vmm))


def test_a_hypervisor_started_with_a_nice_value_runs_below_the_server_and_its_cpu_group_too(workdir: Path,
                                                                                          tag: str) -> None:
    """Restored VMs yield the CPU to the control plane (QEMU's RESTORED_NICE): the process, its supervisor and,
    where the kernel groups a session's processes for the scheduler (autogroup), the group."""
    lifetime.set_deadline(lifetime.deadline_file(workdir), None)  # no expiry
    proc = start(workdir, tag, nice=10)
    try:
        assert os.getpriority(os.PRIO_PROCESS, proc.pid) == 10
        assert os.getpriority(os.PRIO_PROCESS, supervisor_of(proc)) == 10
        autogroup = Path(f"/proc/{proc.pid}/autogroup")
        if autogroup.exists():
            assert autogroup.read_text().split()[-1] == "10", autogroup.read_text()
        assert os.getpriority(os.PRIO_PROCESS, 0) != 10  # the starter's own priority is untouched
    finally:
        proc.kill()
        proc.wait()
