"""All stand-ins in one loopback-only network namespace, and the means to run a CLI there.

``Standins`` makes the namespace, starts the API stand-in, the OAuth stand-in and the CONNECT proxy inside it
(on 127.0.0.1), writes the test CA, and runs commands with ``ip netns exec`` so that a CLI reaches nothing
but these servers. ``env()`` gives the variables that point a CLI at the proxy and make it trust the CA.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Self

import httpx

from tests.standins import api, oauth
from tests.standins.proxy import ConnectProxy
from tests.standins.server import LoopbackNetns, StandinLoop
from tests.standins.tls import TestCA


class Standins:
    def __init__(self, workdir: Path, script: api.Script | None = None) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.netns = LoopbackNetns()
        try:
            self.loop = StandinLoop(self.netns.name)
            self.api = api.StandinState(script)
            self.api_port = self.loop.serve_asgi(api.create_app(self.api))
            self.oauth = oauth.OAuthState()
            self.oauth_port = self.loop.serve_asgi(oauth.create_app(self.oauth))
            self.ca = TestCA(self.workdir / "ca")
            self.proxy = ConnectProxy(self.ca, "127.0.0.1", self.oauth_port)
            self.proxy_port = self.loop.run(self.proxy.start("127.0.0.1", 0))
            self.loop.add_closer(self.proxy.close)
        except BaseException:
            self.netns.close()
            raise

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def proxy_url(self) -> str:
        return f"http://127.0.0.1:{self.proxy_port}"

    def env(self) -> dict[str, str]:
        """Proxy and CA variables: HTTPS goes through the proxy; 127.0.0.1/localhost go direct."""
        ca = str(self.ca.cert_path)
        return {
            "HTTPS_PROXY": self.proxy_url, "https_proxy": self.proxy_url,
            "HTTP_PROXY": self.proxy_url, "http_proxy": self.proxy_url,
            "NO_PROXY": "127.0.0.1,localhost,::1", "no_proxy": "127.0.0.1,localhost,::1",
            "NODE_EXTRA_CA_CERTS": ca, "CODEX_CA_CERTIFICATE": ca,
        }

    # -- running things inside the namespace
    def command(self, argv: Sequence[str], cwd: Path | None = None) -> list[str]:
        prefix = self.netns.exec_prefix()
        if cwd is not None:
            return [*prefix, "/usr/bin/env", "-C", str(cwd), *argv]
        return [*prefix, *argv]

    def run(self, argv: Sequence[str], env: Mapping[str, str], cwd: Path | None = None, timeout: float = 240,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run to completion; on timeout the whole process group is killed and TimeoutExpired raised."""
        proc = self.popen(argv, env, cwd, stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL)
        try:
            out, err = proc.communicate(input=input, timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group(proc)
            raise
        finally:
            kill_group(proc)  # helpers the CLI left behind (the CLI itself has exited)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def popen(self, argv: Sequence[str], env: Mapping[str, str], cwd: Path | None = None,
              **kwargs: Any) -> subprocess.Popen[str]:
        """Start in the namespace, in a new session (so :func:`kill_group` reaches its children)."""
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        kwargs.setdefault("stdout", subprocess.PIPE)
        kwargs.setdefault("stderr", subprocess.PIPE)
        return subprocess.Popen(self.command(argv, cwd), env=dict(env), text=True, start_new_session=True,
                                **kwargs)

    def http_get(self, url: str, timeout: float = 30) -> httpx.Response:
        """GET from inside the namespace (e.g. a CLI's localhost OAuth callback)."""

        async def _get() -> httpx.Response:
            async with httpx.AsyncClient(timeout=timeout, trust_env=False, follow_redirects=False) as c:
                resp = await c.get(url)
                await resp.aread()
                return resp

        return self.loop.run(_get(), timeout=timeout + 5)

    def close(self) -> None:
        try:
            self.loop.close()
        finally:
            self.netns.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def kill_group(proc: subprocess.Popen[str]) -> None:
    """SIGKILL the process group that :meth:`Standins.popen` started (the CLI and anything it spawned)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    if proc.returncode is None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, proc: subprocess.Popen[str] | None = None,
             interval: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` or when ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate(timeout=10)
            raise AssertionError(f"process exited ({proc.returncode}) while waiting for {what}\n"
                                 f"stdout: {out[-3000:]}\nstderr: {err[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def browser_hook(directory: Path) -> tuple[Path, Path]:
    """A ``$BROWSER``/``xdg-open`` stand-in script that appends each URL it is given to a file.

    Returns (script_path, urls_file). The directory also gets an ``xdg-open`` link to the script, so putting
    it first on PATH catches the ``open`` package too.
    """
    directory.mkdir(parents=True, exist_ok=True)
    urls = directory / "urls.txt"
    script = directory / "browser"
    script.write_text(f"#!/bin/sh\nfor u in \"$@\"; do printf '%s\\n' \"$u\" >> '{urls}'; done\nexit 0\n")
    script.chmod(0o755)
    link = directory / "xdg-open"
    if not link.exists():
        os.symlink(script, link)
    return script, urls


def read_urls(urls_file: Path) -> list[str]:
    try:
        return [u for u in urls_file.read_text().splitlines() if u.strip()]
    except FileNotFoundError:
        return []
