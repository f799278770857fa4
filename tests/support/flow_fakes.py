"""A scripted stand-in CLI, as a provider adapter, for testing the login and run flows' mechanics (order of
statuses, pasted codes, credential capture and write-back, cancel, crash, VM death, timeouts) quickly and
without a VM: the "guest" is the real guest agent on the host (tests/support/agent_backend.py), and the CLI is a short
Python script. The real CLIs in real VMs are tested in tests/vm/test_provider_flows_vm.py."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from typing import Any

from polydev.providers.base import (
    Command,
    GuestEnv,
    GuestFile,
    LoginPlan,
    LoginPrompt,
    event,
    login_env,
)

CREDS = ".fake/creds.json"
DEVICE_APPROVED = ".fake/device-approved"  # under the login's HOME: the user entered the device code
AUTH_URL = "https://auth.fake.test/authorize?redirect_uri=http%3A%2F%2Flocalhost%3A{port}%2Fcallback&state=s1"

# The login: opens the "browser" (our hook), asks for a pasted code, or serves a localhost callback.
LOGIN = r'''
import http.server, json, os, subprocess, sys, threading
home, port, mode = os.environ["HOME"], int(sys.argv[1]), sys.argv[2]
def save(token):
    os.makedirs(home + "/.fake", exist_ok=True)
    fd = os.open(home + "/.fake/creds.json", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.write(fd, json.dumps({"access": token, "refresh": "r-" + token}).encode()); os.close(fd)
if mode == "fail":
    print("cannot reach the provider", flush=True); sys.exit(4)
url = "https://auth.fake.test/authorize?redirect_uri=http%3A%2F%2Flocalhost%3A" + str(port) + "%2Fcallback&state=s1"
if mode == "device":
    print("Open https://auth.fake.test/device and enter the code ABCD-1234", flush=True)
else:
    subprocess.run([os.environ["BROWSER"], url], check=True)
if mode == "callback":
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            ok = "code=good-code" in self.path
            self.send_response(200 if ok else 400); self.end_headers()
            if ok:
                save("from-callback"); threading.Thread(target=srv.shutdown).start()
        def log_message(self, *a): pass
    srv = http.server.HTTPServer(("127.0.0.1", port), H); srv.serve_forever()
    print("Login successful.", flush=True); sys.exit(0)
if mode == "device":
    # As a real device login polls its provider: done once the user has entered the code there, which the
    # test says by creating DEVICE_APPROVED (after it has seen the code), so the code is always there to see.
    import time
    for _ in range(1200):
        if os.path.exists(home + "/.fake/device-approved"):
            save("from-device"); print("Login successful.", flush=True); sys.exit(0)
        time.sleep(0.05)
    print("the device code expired", flush=True); sys.exit(5)
print("Paste code here if prompted > ", end="", flush=True)
code = sys.stdin.readline().strip()
if code != "good-code":
    print("invalid code", flush=True); sys.exit(3)
save("from-paste"); print("Login successful.", flush=True)
'''

# The run: JSON lines; the prompt picks the behaviour.
RUN = r'''
import json, os, sys, time
started = time.monotonic()
home, prompt = os.environ["HOME"], sys.argv[1]
def out(**kw): print(json.dumps(kw), flush=True)
key = os.environ.get("FAKE_API_KEY")
creds = None if key else json.load(open(home + "/.fake/creds.json"))
out(t="init", auth="api_key" if key else "oauth:" + creds["access"])
if prompt == "crash":
    print("fatal: segfault in the CLI", file=sys.stderr, flush=True); os._exit(2)
if prompt == "refresh":
    fd = os.open(home + "/.fake/creds.json", os.O_WRONLY | os.O_TRUNC)
    os.write(fd, json.dumps({"access": "refreshed", "refresh": "r-refreshed"}).encode()); os.close(fd)
if prompt.startswith("stall"):  # waits for a network it lacks, saying so on stderr or as a retry
    print("Reading additional input from stdin...", file=sys.stderr, flush=True)
    if prompt == "stall retry":
        out(t="retry", v="connect ECONNREFUSED api.fake.test:443, retry 1/10")
    else:
        print("fetch failed: connect ECONNREFUSED api.fake.test:443", file=sys.stderr, flush=True)
    time.sleep(60)
if prompt.startswith("sleep"):
    out(t="text", v="working"); time.sleep(float(prompt.split()[1]))
if prompt == "oom":  # grows until the guest's OOM killer ends it (a VM's memory is small in the tests)
    out(t="text", v="allocating"); hog = []
    while True:
        hog.append(bytearray(16 * 1024 * 1024))
if prompt.startswith("write"):  # N MiB to its disk, synced: the VM's disk on the host grows by as much
    out(t="text", v="writing")
    with open("written.bin", "wb") as f:
        for _ in range(int(prompt.split()[1])):
            f.write(b"w" * (1 << 20))
        f.flush(); os.fsync(f.fileno())
if os.path.exists("note.txt"):
    out(t="tool", id="c1", cmd="cat note.txt"); out(t="result", id="c1", v=open("note.txt").read())
out(t="text", v="answer to: " + prompt)
if prompt.startswith("timed"):  # its own time, from its first line to here (bench/load.py subtracts it)
    out(t="timing", ms=round((time.monotonic() - started) * 1000, 1))
out(t="done", tokens=7)
'''


class FakeParser:
    def __init__(self) -> None:
        self.done = False

    def feed(self, line: str) -> list[dict[str, Any]]:
        try:
            d = json.loads(line)
        except ValueError:
            return []
        t = d.get("t")
        if t == "init":
            return [event("status", message=f"init {d['auth']}")]
        if t == "text":
            return [event("text", text=d["v"])]
        if t == "tool":
            return [event("tool_call", id=d["id"], name="bash", input={"command": d["cmd"]})]
        if t == "result":
            return [event("tool_result", id=d["id"], output=d["v"], is_error=False)]
        if t == "retry":  # as the real parsers show an error the CLI carries on from
            return [event("status", message=d["v"], level="warning")]
        if t == "timing":
            return [event("status", message=f"cli_ms {d['ms']}")]
        if t == "done":
            self.done = True
            return [event("done", usage={"output_tokens": d["tokens"]})]
        return []

    def finish(self, exit_code: int) -> list[dict[str, Any]]:
        if exit_code == 0 and self.done:
            return []
        return [event("error", message=f"fake CLI exited with status {exit_code}")]


class FakeAdapter:
    name = "claude_code"
    display_name = "Fake CLI"
    package = "fake"
    login_methods = ("browser", "device")
    credential_files = (CREDS,)
    required_credential_files = (CREDS,)
    api_key_env = "FAKE_API_KEY"
    egress_hosts = {"run": ("api.fake.test",), "login": ("auth.fake.test",)}

    def __init__(self, login_mode: str = "paste", callback_port: int = 0, *, name: str = "claude_code",
                 interpreter: str = sys.executable) -> None:
        self.login_mode = login_mode
        self.callback_port = callback_port
        # The scripted CLI stands in for any provider (tests/support/scripted_vm_server.py swaps all three, so a
        # user can hold three credentials and run three at once); inside a real VM it runs on the guest's python3.
        self.name = name
        self.interpreter = interpreter

    def login_plan(self, method: str, env: GuestEnv) -> LoginPlan:
        mode = "device" if method == "device" else self.login_mode
        cmd = Command([self.interpreter, "-c", LOGIN, str(self.callback_port), mode], login_env(env),
                      cwd=env.workdir, pty=mode == "paste")
        return LoginPlan(cmd, method, accepts_code=mode == "paste",  # type: ignore[arg-type]
                         callback_port=self.callback_port or None)

    def parse_login_output(self, text: str) -> LoginPrompt:
        if "enter the code" in text:
            return LoginPrompt(device_code=text.split("enter the code ")[1].split()[0],
                               verification_url="https://auth.fake.test/device")
        return LoginPrompt()

    def code_input(self, code: str) -> bytes:
        return code.encode() + b"\r"

    def run_command(self, prompt: str, env: GuestEnv, *, api_key: str | None = None,
                    resume: str | None = None) -> Command:
        environment = {"HOME": env.home, "PATH": "/usr/bin:/bin"}
        if api_key:
            environment[self.api_key_env] = api_key
        return Command([self.interpreter, "-c", RUN, prompt], environment, cwd=env.workdir,
                       files=(GuestFile(f"{env.home}/.fake/settings.json", b"{}", 0o644),))

    def new_parser(self) -> FakeParser:
        return FakeParser()


def host_guest_paths(root: str) -> GuestEnv:
    """Guest paths under a temporary directory: the "guest" here is an agent running on the host."""
    return replace(GuestEnv(), home=f"{root}/home", workdir=f"{root}/work", login_dir=f"{root}/login")
