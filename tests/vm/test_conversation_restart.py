"""A conversation outlives its server: a turn on a workspace, the server stopped (its workspace VM paused to
disk) and started again, then a follow-up that the real Claude Code CLI continues from its own session — the
stand-in model sees the first turn's words in the follow-up's history, and the files are as the first turn
left them.

A live `polydev serve` on QEMU with the stand-ins of tests/standins/vm.py (every provider host pinned to the
TLS front, through the egress gateway, nothing else resolves); the user's credential is an API key, which
the stand-in API takes like the real one.
"""

from __future__ import annotations

import json
import secrets
import time

import httpx

from polydev.vm import images
from polydev.vm.engine import engine_tag, find_marked_processes
from tests.standins import api as standin_api
from tests.standins import clis
from tests.standins.vm import VmStandins
from tests.support.live_server import start_server
from tests.support.waits import eventually
from tests.support.workspace_checks import state, untar, user_api, vm_env

pytest_plugins = ["tests.support.vm_fixtures"]

PROVIDER = "claude_code"


def _ended(api: httpx.Client, run_id: str) -> dict:  # type: ignore[type-arg]
    found: dict = {}  # type: ignore[type-arg]

    def done() -> bool:
        found.update(api.get(f"/api/runs/{run_id}").json())
        return found["status"] not in ("queued", "running")

    assert eventually(done, timeout=600, every=1.0), found
    return found


def test_a_follow_up_after_a_server_restart(tmp_path, test_image: images.Image) -> None:  # type: ignore[no-untyped-def]
    with VmStandins(tmp_path / "standins") as si:
        wiring = si.settings()
        env = vm_env(test_image, VM_CLI_MEMORY_MB="2048", EGRESS_RESOLVE="pinned",
                     EGRESS_HOSTS=json.dumps(wiring["egress_hosts"]),
                     GUEST_CA_CERT_FILE=str(wiring["guest_ca_cert_file"]),
                     PROVIDER_API_BASE_URLS=json.dumps(wiring["provider_api_base_urls"]))
        # A stop pauses the workspace's VM to disk first: 2 GiB of guest memory under TCG takes a while.
        running = start_server(tmp_path, "polydev", env, stop_timeout=180)
        server = next(running)
        try:
            alice = user_api(server.url, server.admin_token, "alice")
            assert alice.put(f"/api/credentials/{PROVIDER}/api-key", json={"api_key": "sk-ant-stand-in"}).is_success
            wid = alice.post("/api/workspaces", json={"name": "kept"}).json()["id"]
            assert eventually(lambda: state(alice, wid) == "ready", timeout=180)
            nonce = "remember-" + secrets.token_hex(6)
            si.api.script = standin_api.Script(tool=clis.claude_shell_tool(f"echo {nonce} > notes.txt"),
                                               final_text="Noted: {tool_output}")
            r = alice.post("/api/runs", json={"provider": PROVIDER, "workspace_id": wid,
                                              "prompt": f"Remember the word {nonce} and write it to notes.txt."})
            assert r.status_code == 202, r.text
            first = _ended(alice, r.json()["id"])
            assert first["status"] == "succeeded", first
            conversation = first["conversation_id"]
            stopping = time.monotonic()
        finally:
            running.close()  # a stop: the workspace's VM is paused (hibernated), the conversation kept
        print(f"server stop with a workspace to pause: {time.monotonic() - stopping:.1f} s")

        running = start_server(tmp_path, "polydev", env)
        server = next(running)
        try:
            alice = httpx.Client(base_url=server.url, timeout=300, headers=alice.headers)
            assert state(alice, wid) == "paused"
            asked = len(si.api.model_turns())
            si.api.script = standin_api.Script(text="You asked me to remember a word.")
            r = alice.post("/api/runs", json={"provider": PROVIDER, "conversation_id": conversation,
                                              "prompt": "Which word did I ask you to remember?"})
            assert r.status_code == 202, r.text
            second = _ended(alice, r.json()["id"])
            assert second["status"] == "succeeded" and second["conversation_id"] == conversation, second
            follow_up = si.api.model_turns()[asked:]
            assert follow_up and nonce in json.dumps(follow_up[-1].body)  # the CLI resumed its session
            assert untar(alice.get(f"/api/workspaces/{wid}/archive").content)["notes.txt"] == f"{nonce}\n".encode()
            listed = alice.get(f"/api/workspaces/{wid}/conversations").json()
            assert [(c["id"], c["turns"], c["runs"]) for c in listed] == [(conversation, 2, [first["id"], second["id"]])]
            assert alice.delete(f"/api/workspaces/{wid}").status_code == 204
            assert find_marked_processes(engine_tag(server.data_dir)) == {}
        finally:
            running.close()
