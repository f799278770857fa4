"""Record the real CLIs' output for the provider unit tests: `python -m tests.standins.record_providers`.

Each recording is the adapter's own command run against the stand-ins in a loopback-only namespace
(API-key mode, background traffic off). Written to tests/data/providers/: runs as `<name>.stdout`
and `<name>.stderr`, logins as `<name>.out` (both streams, or the PTY) and `<name>.url` (what the browser hook
caught), and one `index.json` with the exit codes and CLI versions. `python -m tests.standins.record_providers
codex_tool claude_paste` re-records only the names starting so. Temporary paths become
`/tmp/rec`; the stand-in keys and tokens are fake, and are replaced anyway.
"""

from __future__ import annotations

import json
import re
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from urllib.parse import parse_qs, urlparse

from polydev.providers import ADAPTERS
from polydev.providers.base import GuestEnv, ProviderAdapter
from tests.standins import adapters, clis
from tests.standins.api import Script
from tests.standins.harness import Standins, read_urls, wait_for

OUT = Path(__file__).resolve().parents[1] / "data" / "providers"
API_KEYS = {"claude_code": "sk-ant-api03-recording-" + "k" * 8, "codex": "sk-proj-recording-" + "k" * 8,
            "gemini_cli": "AIza-recording-" + "k" * 8}
NOTE = "note-recorded-4f2a"
TOOLS = {"claude_code": clis.claude_shell_tool, "codex": clis.codex_shell_tool, "gemini_cli": clis.gemini_shell_tool}


def _scrub(text: str, root: Path) -> str:
    text = text.replace(str(root), "/tmp/rec")
    for key in API_KEYS.values():
        text = text.replace(key, "<api-key>")
    return re.sub(r"127\.0\.0\.1:\d{4,5}", "127.0.0.1:PORT", text)


@dataclass
class Session:
    adapter: ProviderAdapter
    exe: Path
    root: Path  # the temporary directory, scrubbed from the recordings
    si: Standins
    env: GuestEnv

    def save(self, name: str, text: str) -> None:
        (OUT / name).write_text(_scrub(text, self.root))


@contextmanager
def session(provider: str, script: Script | None = None) -> Iterator[Session]:
    """Fresh stand-ins in a temporary directory, and the provider's adapter and installed CLI."""
    exe = clis.install(adapters.CLI_OF_PROVIDER[provider])
    with tempfile.TemporaryDirectory(prefix="polydev-rec-") as tmp, Standins(Path(tmp) / "si", script) as si:
        yield Session(ADAPTERS[provider], exe, Path(tmp), si, adapters.guest_env(si, Path(tmp)))


def _indexed(index: dict[str, object], name: str, provider: str, exit_code: int, **extra: object) -> None:
    index[name] = {"provider": provider, "version": adapters.CLI_OF_PROVIDER[provider].version,
                   "exit_code": exit_code, **extra}
    print(name, exit_code, file=sys.stderr)


def record_run(name: str, provider: str, script: Script, prompt: str, index: dict[str, object]) -> None:
    with session(provider, script) as s:
        (Path(s.env.workdir) / "note.txt").write_text(NOTE + "\n")
        result = adapters.run(s.si, s.adapter.run_command(prompt, s.env, api_key=API_KEYS[provider]), s.exe)
        s.save(f"{name}.stdout", result.stdout)
        s.save(f"{name}.stderr", result.stderr)
    _indexed(index, name, provider, result.returncode)


def record_codex_device_login(index: dict[str, object]) -> None:
    with session("codex") as s, adapters.start_login(s.si, s.adapter.login_plan("device", s.env), s.env, s.exe) as login:
        wait_for(lambda: s.si.oauth.of_kind("device_code"), 120, "the device-code request", login.proc)
        s.si.oauth.approve_device_codes()
        code = login.wait(120)
        s.save("codex_device_login.out", login.output())
        user_code = next(iter(s.si.oauth.device.values()))["user_code"]
    _indexed(index, "codex_device_login", "codex", code, user_code=user_code)


def record_browser_login(name: str, provider: str, oauth_name: str, index: dict[str, object]) -> None:
    """The adapter's browser login: the hook catches the URL, the callback plays the user's part."""
    from tests.standins import flows

    with session(provider) as s, adapters.start_login(s.si, s.adapter.login_plan("browser", s.env), s.env, s.exe) as login:
        url = wait_for(lambda: read_urls(Path(s.env.urls_file)), 120, "the login URL", login.proc)[0]
        flows._callback(s.si, url, oauth_name)
        code = login.wait(120)
        s.save(f"{name}.out", login.output())
        s.save(f"{name}.url", url + "\n")
    _indexed(index, name, provider, code)


def record_claude_paste_login(index: dict[str, object]) -> None:
    """`claude auth login` under its PTY, finished by pasting `code#state` at its prompt (no callback)."""
    with session("claude_code") as s, \
            adapters.start_login(s.si, s.adapter.login_plan("browser", s.env), s.env, s.exe) as login:
        wait_for(lambda: "Paste code here" in login.output(), 120, "the paste prompt", login.proc)
        url = s.adapter.parse_login_output(login.output()).auth_url
        assert url, login.output()
        state = parse_qs(urlparse(url).query)["state"][0]
        login.write(s.adapter.code_input(f"{s.si.oauth.new_code('claude')}#{state}"))
        code = login.wait(120)
        s.save("claude_paste_login.pty", login.output())
        token = json.loads(Path(s.env.home_path(".claude/.credentials.json")).read_text())["claudeAiOauth"]["accessToken"]
    _indexed(index, "claude_paste_login", "claude_code", code, access_token=token)


def main(only: list[str]) -> None:
    """Record everything, or only the recordings whose names start with one of `only`."""
    OUT.mkdir(parents=True, exist_ok=True)
    index_file = OUT / "index.json"
    index: dict[str, object] = json.loads(index_file.read_text()) if index_file.exists() else {}
    ask = "-what does note.txt say?"  # a leading dash: the adapters must keep it the prompt
    jobs: dict[str, Callable[[], None]] = {}
    for provider in ADAPTERS:
        short = adapters.CLI_OF_PROVIDER[provider].key
        tool = Script(tool=TOOLS[provider]("cat note.txt"), final_text="The note says {tool_output}")
        jobs[f"{short}_tool_round_trip"] = partial(record_run, f"{short}_tool_round_trip", provider, tool, ask, index)
        failing = Script(tool=TOOLS[provider]("cat missing.txt"), final_text="The tool said {tool_output}")
        jobs[f"{short}_tool_error"] = partial(record_run, f"{short}_tool_error", provider, failing,
                                              "what does missing.txt say?", index)
        jobs[f"{short}_api_rejected"] = partial(record_run, f"{short}_api_rejected", provider,
                                                Script(reject_all=True), "say something", index)
    jobs["codex_device_login"] = partial(record_codex_device_login, index)
    jobs["codex_browser_login"] = partial(record_browser_login, "codex_browser_login", "codex", "codex", index)
    jobs["claude_paste_login"] = partial(record_claude_paste_login, index)
    jobs["gemini_browser_login"] = partial(record_browser_login, "gemini_browser_login", "gemini_cli", "google",
                                           index)
    for name, job in jobs.items():
        if not only or any(name.startswith(o) for o in only):
            job()
            index_file.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
