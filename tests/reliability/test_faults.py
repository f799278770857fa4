"""Faults inside a VM (real VMs, the scripted CLI): a CLI that runs its VM out of memory is ended by the guest
kernel's OOM killer, and the run ends `failed` saying so (not just "exited with status -9"), with its VM
destroyed and nothing left."""

from __future__ import annotations

from polydev.client import PolydevClient
from tests.reliability.conftest import MEMORY_MB, Row
from tests.reliability.test_load import left_behind
from tests.support.live_server import LiveServer
from tests.support.load import make_users


def test_a_cli_killed_by_the_vms_oom_killer_fails_the_run_saying_so(server: LiveServer, report: list[Row]) -> None:
    [token] = make_users(server.url, server.admin_token, 1, prefix="oom")
    with PolydevClient(server.url, token, timeout=120) as pd:
        run = pd.start_run("codex", "oom", timeout=600)["id"]  # allocates until the guest's kernel kills it
        events = list(pd.run_events(run))
        row = pd.run(run)
    found = left_behind(server)
    report.append(Row("OOM inside a VM", f"1 run, {MEMORY_MB} MiB VM", "CLI allocates until OOM-killed",
                      f"{int(row['status'] == 'failed' and bool(row['error_message']))}/1", sum(found.values()), 0))
    assert row["status"] == "failed"
    assert "ran out of memory" in row["error_message"] and "out-of-memory killer" in row["error_message"], row
    assert events[-1] == {"type": "error", "message": row["error_message"]}  # the stream ends with the same reason
    assert found == dict.fromkeys(found, 0)
