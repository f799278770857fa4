"""The provider adapter interface: everything the login and run flows need to know about one CLI.

Adapters are data plus small pure functions. They never talk to a VM, a database or the network: the flows
in `core/` turn the `Command`s and file lists declared here into guest-agent calls. That keeps each CLI's
quirks (flags, files, output format) in one module per CLI and lets the flows be the same for all three.

Paths are paths inside the guest. Everything the CLIs need to reach the outside (proxy, extra CA, an API
base-URL override used by the test stand-ins) comes in through `GuestEnv`, decided by the platform.
"""

from __future__ import annotations

import base64
import functools
import json
import shlex
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from polydev.config.cli_versions import version_key

ProviderName = Literal["claude_code", "codex", "gemini_cli"]
LoginMethod = Literal["browser", "device"]
EventType = Literal["text", "tool_call", "tool_result", "status", "error", "done"]
EVENT_TYPES: tuple[str, ...] = ("text", "tool_call", "tool_result", "status", "error", "done")

GUEST_HOME = "/root"
GUEST_WORKDIR = "/root/work"
# The login helper: a `$BROWSER` / `xdg-open` hook that appends every URL it is asked to open to a file.
# The platform writes it into the guest before a login (so the image does not have to change for it) and
# puts its directory first on PATH, which also catches CLIs that call `xdg-open` through the `open` package.
LOGIN_DIR = "/run/polydev/login"
# Where the platform puts an extra CA (GUEST_CA_CERT_FILE) for the CLIs to trust.
GUEST_CA_PATH = "/usr/local/share/polydev/extra-ca.pem"
# Some CLIs open the browser only when a display is set (Claude and Gemini on Linux). Display :1 is where
# the login browser's VNC server runs when there is one.
LOGIN_DISPLAY = ":1"


@dataclass(frozen=True)
class GuestEnv:
    """How the platform has wired this guest to the outside world."""

    https_proxy: str | None = None  # the proxy URL as the guest reaches it
    ca_cert_path: str | None = None  # an extra CA (PEM) inside the guest, trusted by the CLI
    api_base_url: str | None = None  # override of the provider's API base URL (test stand-ins)
    no_proxy: str = "127.0.0.1,localhost,::1"
    # Where things live; the defaults are the guest's. Tests that run a CLI on the host point them at a
    # temporary directory instead.
    home: str = GUEST_HOME
    workdir: str = GUEST_WORKDIR
    login_dir: str = LOGIN_DIR

    @property
    def hook_bin(self) -> str:
        return f"{self.login_dir}/bin"

    @property
    def browser_hook(self) -> str:
        return f"{self.hook_bin}/browser-open"

    @property
    def urls_file(self) -> str:
        return f"{self.login_dir}/urls"

    def home_path(self, relative: str) -> str:
        return f"{self.home.rstrip('/')}/{relative}"

    def proxy_vars(self) -> dict[str, str]:
        """The proxy variables all three CLIs honour (both spellings: Node and Rust read different ones)."""
        if not self.https_proxy:
            return {}
        return {"HTTPS_PROXY": self.https_proxy, "https_proxy": self.https_proxy,
                "HTTP_PROXY": self.https_proxy, "http_proxy": self.https_proxy,
                "NO_PROXY": self.no_proxy, "no_proxy": self.no_proxy}


@dataclass(frozen=True)
class GuestFile:
    path: str
    data: bytes
    mode: int = 0o600


@dataclass(frozen=True)
class Command:
    """One process to start in the guest through the agent's exec."""

    argv: list[str]
    env: dict[str, str]
    cwd: str
    pty: bool = False
    stdin: bytes | None = None
    keep_stdin_open: bool = False  # more input follows later (a pasted code)
    files: tuple[GuestFile, ...] = ()  # written (settings, hooks) before the process starts


@dataclass(frozen=True)
class LoginPrompt:
    """What the login's output asks the user to do; empty fields mean "not seen yet"."""

    auth_url: str | None = None
    device_code: str | None = None
    verification_url: str | None = None


@dataclass
class LoginPlan:
    """How one login runs: the command, and how the flow knows it has finished."""

    command: Command
    method: LoginMethod
    # "exit": the CLI exits 0 once its files are written. "files": the CLI goes on (Gemini runs a prompt
    # after logging in), so the flow stops it as soon as the required credential files are complete.
    ends: Literal["exit", "files"] = "exit"
    accepts_code: bool = False  # the user may paste a code, which is written to the CLI's input
    callback_port: int | None = None  # fixed localhost callback port, when the CLI has one


def event(kind: EventType, **fields: Any) -> dict[str, Any]:
    return {"type": kind, **fields}


class RunParser(Protocol):
    """Turns the CLI's streaming JSON, line by line, into Polydev events (see `event`).

    The schema: `text{text}`, `tool_call{id, name, input}`, `tool_result{id, output, is_error}`,
    `status{message}`, `error{message}`, and exactly one final `done{usage, result?}` (emitted by `finish`
    when the output had none, so a crashed CLI still ends the stream with an `error` then no `done`).
    """

    def feed(self, line: str) -> list[dict[str, Any]]: ...

    def finish(self, exit_code: int) -> list[dict[str, Any]]: ...


@dataclass(frozen=True, eq=False)
class ProviderFacts:
    """What an adapter declares about its CLI: the fields of ProviderAdapter that are data, not behaviour.
    The values live in catalog.toml beside this file; an adapter inherits this class and fills it from its
    entry there (`catalog_entry`)."""

    name: ProviderName
    display_name: str
    package: str  # npm package, for FACTS and doctor
    executable: str
    login_methods: tuple[LoginMethod, ...]
    credential_files: tuple[str, ...]
    required_credential_files: tuple[str, ...]
    api_key_env: str
    # The CLI's version this adapter was written and tested for (the image's default; FACTS.md records what
    # was observed at which version). A newer one is said in a run's first status event.
    written_for: str = ""
    # The hosts the CLI reaches (providers/FACTS.md, "Hosts a run reaches"), per purpose: "run" (a prompt,
    # including token refreshes) and "login" (the CLI's own sign-in and token calls; a login with the in-VM
    # browser may reach any public host). The egress gateway's allow-list is built from these.
    egress_hosts: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


CATALOG_FILE = Path(__file__).with_name("catalog.toml")


@functools.cache
def _catalog() -> dict[str, dict[str, Any]]:
    return tomllib.loads(CATALOG_FILE.read_text())


def catalog_entry(name: str) -> dict[str, Any]:
    """ProviderFacts' fields for provider `name`, from catalog.toml (lists as tuples)."""
    def frozen(value: Any) -> Any:
        if isinstance(value, list):
            return tuple(value)
        if isinstance(value, dict):
            return {k: frozen(v) for k, v in value.items()}
        return value

    return {"name": name, **{k: frozen(v) for k, v in _catalog()[name].items()}}


class ProviderAdapter(Protocol):
    name: ProviderName
    display_name: str
    package: str  # npm package, for FACTS and doctor
    login_methods: tuple[LoginMethod, ...]
    # Credential files, relative to the CLI user's home: captured after a login and restored before each
    # run. `required` ones decide that a login has completed; the rest are carried along when present.
    credential_files: tuple[str, ...]
    required_credential_files: tuple[str, ...]
    api_key_env: str
    egress_hosts: Mapping[str, tuple[str, ...]]  # per purpose (run, login): the egress allow-list

    def login_plan(self, method: LoginMethod, env: GuestEnv) -> LoginPlan: ...

    def parse_login_output(self, text: str) -> LoginPrompt:
        """The URL / device code from the login's own output (the fallback when no hook caught it)."""
        ...

    def code_input(self, code: str) -> bytes:
        """The bytes to write to the login's input for a code the user pasted."""
        ...

    def run_command(self, prompt: str, env: GuestEnv, *, api_key: str | None = None,
                    resume: str | None = None) -> Command:
        """The one-shot, non-interactive run. With `api_key` None the stored credential files are used. With
        `resume` (the session id a parser's `session started` status gave), the CLI continues that session of
        its own, run in the same working directory: the model sees the earlier turns."""
        ...

    def new_parser(self) -> RunParser: ...


def hook_files(env: GuestEnv, opener: Sequence[str] | None = None) -> tuple[GuestFile, ...]:
    """The login helper script, as `$BROWSER` and as `xdg-open`. It records every URL. With `opener` (a login
    with the in-VM browser; "{url}" in it stands for the URL) it then also runs that command, detached, for
    each http(s) URL, so the CLI never waits for the browser; without, the script is the recorder alone."""
    script = (b"#!/bin/sh\n# Polydev login helper: record the URL the CLI wants opened.\n"
              b"for u in \"$@\"; do printf '%s\\n' \"$u\" >> '" + env.urls_file.encode() + b"'; done\n")
    if opener:
        command = " ".join('"$u"' if arg == "{url}" else shlex.quote(arg) for arg in opener)
        log = shlex.quote(f"{env.login_dir}/open.log")
        script += (b"# ...and show it in the login browser (only http/https: never file: or javascript:).\n"
                   b"for u in \"$@\"; do case \"$u\" in http://*|https://*) setsid " + command.encode()
                   + b" </dev/null >>" + log.encode() + b" 2>&1 & ;; esac; done\n")
    script += b"exit 0\n"
    return (GuestFile(env.browser_hook, script, 0o755), GuestFile(f"{env.hook_bin}/xdg-open", script, 0o755))


def login_env(env: GuestEnv, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Variables every login needs: the hook as browser, a display, the network path."""
    base = {"HOME": env.home, "BROWSER": env.browser_hook, "DISPLAY": LOGIN_DISPLAY,
            "PATH": f"{env.hook_bin}:/usr/local/bin:/usr/bin:/bin", "TERM": "xterm-256color", "LANG": "C.UTF-8"}
    return {**base, **env.proxy_vars(), **(extra or {})}


# -- stored credential bundles ------------------------------------------------------------------------------
# What the vault seals for a provider: either an API key, or the credential files a login produced. One JSON
# document, so a run restores exactly what the login captured and a refresh replaces it whole.

@dataclass
class CredentialBundle:
    kind: Literal["oauth", "api_key"]
    files: dict[str, tuple[bytes, int]] = field(default_factory=dict)  # path under home -> (content, mode)
    api_key: str | None = None

    def to_bytes(self) -> bytes:
        if self.kind == "api_key":
            return json.dumps({"kind": "api_key", "api_key": self.api_key}).encode()
        files = {path: {"data": base64.b64encode(data).decode(), "mode": mode}
                 for path, (data, mode) in sorted(self.files.items())}
        return json.dumps({"kind": "oauth", "files": files}, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, raw: bytes, kind: str) -> CredentialBundle:
        """Read a sealed bundle. Older records of kind api_key hold the bare key."""
        try:
            doc = json.loads(raw)
        except ValueError:
            doc = None
        if not isinstance(doc, dict) or "kind" not in doc:
            if kind == "api_key":
                return cls("api_key", api_key=raw.decode())
            raise ValueError("stored credential is not a Polydev credential bundle")
        if doc["kind"] == "api_key":
            return cls("api_key", api_key=str(doc["api_key"]))
        files = {path: (base64.b64decode(f["data"]), int(f["mode"])) for path, f in doc["files"].items()}
        return cls("oauth", files=files)


def newer_than_written_for(facts: ProviderFacts, version: str | None) -> bool:
    """Whether `version` of the CLI is newer than the one its adapter was written for."""
    if not version or not facts.written_for:
        return False
    return version_key(version) > version_key(facts.written_for)
