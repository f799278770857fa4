"""The real login flows of the three CLIs, finished against the stand-ins.

Each flow starts the CLI's own login inside the stand-ins' namespace with a ``$BROWSER``/``xdg-open`` hook
that records the authorization URL, then plays the user's part: it calls the CLI's localhost callback with a
code the OAuth stand-in will accept and the ``state`` from the captured URL (or, for Codex device auth,
approves the device code). The CLI then calls the token endpoints through the proxy and writes its
credential file.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlparse

from tests.standins import clis
from tests.standins.harness import (
    Standins,
    browser_hook,
    kill_group,
    read_urls,
    wait_for,
)

LOGIN_TIMEOUT = 120.0


@dataclass
class LoginResult:
    auth_url: str
    returncode: int
    stdout: str
    stderr: str


def _finish(proc: subprocess.Popen[str], timeout: float = LOGIN_TIMEOUT) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        out, err = proc.communicate()
        raise AssertionError(f"login did not finish in {timeout}s\nstdout: {out[-3000:]}\nstderr: {err[-3000:]}")


def _callback(si: Standins, auth_url: str, provider: str) -> None:
    q = parse_qs(urlparse(auth_url).query)
    redirect, state = q["redirect_uri"][0], q["state"][0]
    code = si.oauth.new_code(provider)
    resp = si.http_get(f"{redirect}?{urlencode({'code': code, 'state': state})}")
    assert resp.status_code in (200, 301, 302, 303, 307), f"callback answered {resp.status_code}: {resp.text[:500]}"
    location = resp.headers.get("location", "")
    if location.startswith(("http://127.0.0.1", "http://localhost")):
        # Codex keeps its callback server up until the browser has loaded its /success page.
        si.http_get(location)


def _wait_url(urls: Path, proc: subprocess.Popen[str]) -> str:
    return wait_for(lambda: read_urls(urls), LOGIN_TIMEOUT, "the login URL from the browser hook", proc)[0]


def claude_login(si: Standins, exe: Path, home: Path, hook_dir: Path) -> LoginResult:
    hook, urls = browser_hook(hook_dir)
    env = clis.claude_env(home, BROWSER=str(hook), **si.env())
    proc = si.popen([str(exe), "auth", "login"], env)
    try:
        url = _wait_url(urls, proc)
        _callback(si, url, "claude")
        out, err = _finish(proc)
    finally:
        kill_group(proc)
    return LoginResult(url, proc.returncode, out, err)


def codex_login(si: Standins, exe: Path, home: Path, hook_dir: Path) -> LoginResult:
    hook, urls = browser_hook(hook_dir)
    env = clis.codex_env(home, BROWSER=str(hook), **si.env())
    proc = si.popen([str(exe), "login", "-c", "analytics.enabled=false"], env)
    try:
        url = _wait_url(urls, proc)
        _callback(si, url, "codex")
        out, err = _finish(proc)
    finally:
        kill_group(proc)
    return LoginResult(url, proc.returncode, out, err)


def codex_device_login(si: Standins, exe: Path, home: Path) -> LoginResult:
    env = clis.codex_env(home, **si.env())
    proc = si.popen([str(exe), "login", "--device-auth", "-c", "analytics.enabled=false"], env)
    try:
        wait_for(lambda: si.oauth.of_kind("device_code"), LOGIN_TIMEOUT, "the device-code request", proc)
        # The user enters the code on the website; the stand-in approves it. Codex's next poll gets the code.
        si.oauth.approve_device_codes()
        out, err = _finish(proc)
    finally:
        kill_group(proc)
    return LoginResult("https://auth.openai.com/codex/device", proc.returncode, out, err)


def gemini_login(si: Standins, exe: Path, home: Path, hook_dir: Path, workdir: Path, prompt: str) -> LoginResult:
    """Gemini has no login command: with ``oauth-personal`` selected, the first ``-p`` run logs in first.

    It asks "Do you want to continue? [Y/n]" on stdin, then opens the browser through ``xdg-open`` (only when
    a display variable is set), then runs the prompt. The returned stdout is that run's stream-json.
    """
    hook, urls = browser_hook(hook_dir)
    clis.gemini_settings(home, "oauth-personal")
    env = clis.gemini_env(home, BROWSER=str(hook), DISPLAY=":99", CODE_ASSIST_ENDPOINT=si.api_url, **si.env())
    env["PATH"] = f"{hook_dir}:{env['PATH']}"
    proc = si.popen(clis.gemini_run_args(exe, prompt), env, cwd=workdir, stdin=subprocess.PIPE)
    try:
        assert proc.stdin is not None
        proc.stdin.write("Y\n")
        proc.stdin.flush()
        url = _wait_url(urls, proc)
        _callback(si, url, "google")
        out, err = _finish(proc)
    finally:
        kill_group(proc)
    return LoginResult(url, proc.returncode, out, err)


def gemini_oauth_env(si: Standins, home: Path) -> dict[str, str]:
    """Environment for a Gemini run with the stored OAuth credential (Code Assist at the stand-in)."""
    return clis.gemini_env(home, CODE_ASSIST_ENDPOINT=si.api_url, **si.env())
