"""The real CLIs for stand-in tests: npm install into a cache outside the repo, and how to run each one.

Installs go to ``~/.cache/polydev-test/npm/<sha256(spec)[:16]>`` (``POLYDEV_TEST_NPM_CACHE`` overrides the
root) and are reused when present. The command and environment builders here are what the stand-in tests
verified at the pinned versions (see ``src/polydev/providers/FACTS.md``); what the product needs of them
(switches, provider entries, settings, paths) comes from the adapters in ``polydev.providers``, so these tests
keep the adapters' knowledge true. ``tests.standins.adapters`` runs the adapters' own commands.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from polydev.providers import ADAPTERS, claude_code, codex, gemini_cli
from tests.standins.api import ToolCall

NODE_MIN_MAJOR = 20


@dataclass(frozen=True)
class CliSpec:
    key: str
    package: str
    version: str
    bin: str

    @property
    def spec(self) -> str:
        return f"{self.package}@{self.version}"


CLAUDE = CliSpec("claude", "@anthropic-ai/claude-code", "2.1.197", "claude")
CODEX = CliSpec("codex", "@openai/codex", "0.171.0", "codex")
GEMINI = CliSpec("gemini", "@google/gemini-cli", "0.61.0", "gemini")
ALL = {c.key: c for c in (CLAUDE, CODEX, GEMINI)}


def cache_root() -> Path:
    return Path(os.environ.get("POLYDEV_TEST_NPM_CACHE") or Path.home() / ".cache" / "polydev-test" / "npm")


def node_major(node: str = "node") -> int | None:
    exe = shutil.which(node)
    if exe is None:
        return None
    out = subprocess.run([exe, "--version"], check=False, capture_output=True, text=True, timeout=30).stdout.strip()
    try:
        return int(out.lstrip("v").split(".")[0])
    except ValueError:
        return None


def install(cli: CliSpec, root: Path | None = None) -> Path:
    """The CLI's executable, installed with npm into the cache on first use (under a file lock)."""
    root = root or cache_root()
    root.mkdir(parents=True, exist_ok=True)
    target = root / hashlib.sha256(cli.spec.encode()).hexdigest()[:16]
    exe = target / "node_modules" / ".bin" / cli.bin
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / ".spec").is_file() and (target / ".spec").read_text().strip() == cli.spec and exe.exists():
            return exe
        tmp = root / f"{target.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(target, ignore_errors=True)
        tmp.mkdir()
        npm = shutil.which("npm")
        if npm is None:
            raise RuntimeError("npm is not installed")
        result = subprocess.run([npm, "install", "--prefix", str(tmp), "--no-save", "--no-audit", "--no-fund",
                                 "--loglevel=error", cli.spec], check=False, capture_output=True, text=True,
                                timeout=1200)
        if result.returncode != 0:
            raise RuntimeError(f"npm install {cli.spec} failed:\n{result.stderr[-4000:]}")
        (tmp / ".spec").write_text(cli.spec + "\n")
        tmp.rename(target)
    if not exe.exists():
        raise RuntimeError(f"{cli.spec} installed but {exe} is missing")
    return exe


def node_dir(root: Path | None = None) -> Path:
    """A directory whose `node` is >= NODE_MIN_MAJOR: the host's when it is new enough, else the Node
    the golden image uses, taken from the npm registry once into the cache (Debian 12 ships Node 18)."""
    major = node_major()
    if major is not None and major >= NODE_MIN_MAJOR:
        return Path(shutil.which("node") or "/usr/bin/node").parent
    from polydev.vm.images import NODE_PACKAGE

    name, version = NODE_PACKAGE
    root = root or cache_root()
    target = root / f"{name}-{version}"
    node = target / "bin" / "node"
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if node.exists():
            return node.parent
        npm = shutil.which("npm")
        if npm is None:
            raise RuntimeError("npm is not installed")
        work = root / f"{target.name}.tmp"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        subprocess.run([npm, "pack", f"{name}@{version}", "--pack-destination", str(work), "--loglevel=error"],
                       check=True, capture_output=True, timeout=600, cwd=work)
        tgz = next(work.glob("*.tgz"))
        subprocess.run(["tar", "-xzf", str(tgz), "-C", str(work)], check=True, timeout=600)
        (work / "package" / "bin").rename(work / "bin")
        shutil.rmtree(target, ignore_errors=True)
        work.rename(target)
    return node.parent


def base_env(home: Path, extra_path: list[Path] | None = None) -> dict[str, str]:
    """A clean environment: nothing of the test runner's leaks into the CLI."""
    path = [str(p) for p in extra_path or []] + [str(node_dir()), "/usr/local/bin", "/usr/bin", "/bin"]
    return {"HOME": str(home), "PATH": ":".join(dict.fromkeys(path)), "LANG": "C.UTF-8", "TERM": "dumb",
            "USER": "root", "SHELL": "/bin/bash", "TMPDIR": os.environ.get("TMPDIR", "/tmp")}


def json_lines(text: str) -> list[dict[str, Any]]:
    events = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                events.append(json.loads(line))
            except ValueError:
                continue
    return events


# ---------------------------------------------------------------- Claude Code

def claude_env(home: Path, **extra: str) -> dict[str, str]:
    env = {**base_env(home), **claude_code.background_off()}
    env.update(extra)
    return env


def claude_run_args(exe: Path, prompt: str, allowed_tools: str = "Bash,Read") -> list[str]:
    return [str(exe), "-p", prompt, "--output-format", "stream-json", "--verbose", "--allowedTools", allowed_tools]


def claude_shell_tool(command: str) -> ToolCall:
    return ToolCall("Bash", {"command": command, "description": "Run a command for the stand-in"})


def claude_credentials(home: Path) -> Path:
    return home / ADAPTERS["claude_code"].required_credential_files[0]


# ---------------------------------------------------------------- Codex

#: Codex 0.171's default model (gpt-6.2-sol) sent no ``tools`` at all to a custom provider [observed];
#: ``gpt-5.5`` is in its built-in catalog and offers ``exec_command``. A name outside the catalog works too but
#: adds an ``error`` item ("Model metadata for ... not found") to the stream.
CODEX_MODEL = codex.CUSTOM_PROVIDER_MODEL


def codex_env(home: Path, **extra: str) -> dict[str, str]:
    env = base_env(home)
    env["CODEX_HOME"] = str(home / ".codex")
    (home / ".codex").mkdir(parents=True, exist_ok=True)
    env.update(extra)
    return env


codex_background_off = codex.background_off


def codex_provider_args(api_url: str, *, chatgpt_auth: bool = False) -> list[str]:
    """Point Codex at the stand-in: a custom provider (Codex ignores OPENAI_BASE_URL).

    API-key mode sends ``CODEX_API_KEY``; ``chatgpt_auth`` sends the login's access token instead
    (``requires_openai_auth``), which is what makes Codex refresh it on a 401.
    """
    return codex.provider_args(api_url, api_key_env=None if chatgpt_auth else ADAPTERS["codex"].api_key_env)


def codex_run_args(exe: Path, prompt: str, api_url: str, *, chatgpt_auth: bool = False,
                   model: str | None = CODEX_MODEL) -> list[str]:
    """``codex exec --json``; the sandbox is off (``danger-full-access``): in Polydev the VM is the sandbox."""
    return [str(exe), "exec", "--json", "--skip-git-repo-check", *codex_provider_args(api_url, chatgpt_auth=chatgpt_auth),
            *codex_background_off(), *(["-m", model] if model else []), "-s", "danger-full-access", prompt]


def codex_shell_tool(command: str) -> ToolCall:
    """Codex 0.171 offers ``exec_command`` (unified exec); older builds ``shell_command`` or ``shell``."""

    def args(name: str) -> dict[str, Any]:
        if name == "exec_command":
            return {"cmd": command}
        if name == "shell":
            return {"command": ["bash", "-lc", command]}
        return {"command": command}

    return ToolCall(("exec_command", "shell_command", "shell"), args)


def codex_credentials(home: Path) -> Path:
    return home / ADAPTERS["codex"].required_credential_files[0]


# ---------------------------------------------------------------- Gemini CLI

def gemini_settings(home: Path, auth_type: str) -> Path:
    settings = home / gemini_cli.SETTINGS_FILE
    settings.parent.mkdir(parents=True, exist_ok=True)
    settings.write_bytes(gemini_cli.settings(auth_type))
    return settings


def gemini_env(home: Path, **extra: str) -> dict[str, str]:
    env = base_env(home)
    env["GEMINI_CLI_TRUST_WORKSPACE"] = "true"
    env.update(extra)
    return env


def gemini_run_args(exe: Path, prompt: str, *, yolo: bool = True) -> list[str]:
    return [str(exe), "-p", prompt, "--output-format", "stream-json", *(["--yolo"] if yolo else [])]


def gemini_shell_tool(command: str) -> ToolCall:
    return ToolCall("run_shell_command", {"command": command, "description": "Run a command for the stand-in"})


def gemini_credentials(home: Path) -> Path:
    return home / ADAPTERS["gemini_cli"].required_credential_files[0]
