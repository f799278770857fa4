"""A workspace's git remote: cloning it into the VM and pushing a branch back, through the egress gateway.

git runs inside the workspace's VM, with the gateway as its HTTPS proxy, like the CLIs: the connection is the
user's (their source address or upstream proxy, their limits, their accounting), and it reaches only the
hosts in WORKSPACE_GIT_HOSTS (the gateway's allow-list for workspace VMs). Only HTTPS URLs are taken: that is
what the gateway carries, and it keeps the host name the allow-list checks.

The user's git token (for a private repository, and for pushing) is sealed in the workspace's row. It goes
into the VM only as the environment of the one git command that needs it — as an `http.<url>.extraHeader`
given through GIT_CONFIG_* variables, so it is neither on a command line nor in the repository's config —
and it is cut out of any error text git prints.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from polydev.egress.policy import host_matches
from polydev.providers.base import GUEST_CA_PATH
from polydev.vm.agent_client import AgentClient

# The system's trust store and the operator's extra CA (GUEST_CA_CERT_FILE), one file for git to trust.
CA_BUNDLE = "/usr/local/share/polydev/git-ca.pem"
SYSTEM_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
# A branch name as a user would type one; `git check-ref-format` in the VM has the last word.
BRANCH = re.compile(r"^(?!-)(?!.*\.\.)(?!.*//)(?!.*@\{)[A-Za-z0-9._/+-]{1,200}(?<![./])(?<!\.lock)$")


class GitUrlError(ValueError):
    """The repository URL, branch or token is not one a workspace can use; the text says why."""


@dataclass(frozen=True)
class Remote:
    url: str  # https://host/path, as the user gave it (no credentials in it)
    host: str
    branch: str | None = None


def parse_remote(url: str, branch: str | None, allowed_hosts: tuple[str, ...]) -> Remote:
    """The repository to clone, checked: an HTTPS URL to a host the gateway lets workspaces reach, with no
    credentials in it (they go in `git_token`, which is sealed)."""
    url = url.strip()
    parts = urlsplit(url)
    if parts.scheme != "https":
        raise GitUrlError("the repository URL must start with https:// (git over HTTPS through the egress "
                          "gateway; ssh:// and git:// are not carried)")
    if parts.username or parts.password or "@" in parts.netloc:
        raise GitUrlError("put no credentials in the repository URL: give the token as git_token, which is "
                          "stored sealed")
    host = (parts.hostname or "").lower()
    if not host or not parts.path.strip("/"):
        raise GitUrlError("the repository URL names no host or no repository path")
    try:
        port = parts.port
    except ValueError:  # not a number, or out of range
        port = -1
    if port not in (None, 443):
        raise GitUrlError("the repository must be served on port 443")
    if parts.query or parts.fragment:
        raise GitUrlError("the repository URL may not have a query or fragment")
    if not any(host_matches(host, pattern) for pattern in allowed_hosts):
        allowed = ", ".join(allowed_hosts) or "none"
        raise GitUrlError(f"{host} is not a git host workspaces may reach (WORKSPACE_GIT_HOSTS: {allowed})")
    if branch is not None:
        check_branch(branch)
    return Remote(url=url, host=host, branch=branch)


def check_branch(branch: str) -> str:
    if not BRANCH.match(branch):
        raise GitUrlError(f"{branch!r} is not a usable branch name")
    return branch


def git_env(proxy: str | None, host: str, token: str | None, has_ca: bool) -> dict[str, str]:
    """The environment of a git command in the VM that talks to `host`: the gateway as proxy, no prompt for
    a password it does not have (it fails instead), the CA bundle when there is an extra CA, and the token
    as an Authorization header for that host only."""
    env = {"GIT_TERMINAL_PROMPT": "0", "GIT_ASKPASS": "/bin/false", "GCM_INTERACTIVE": "never"}
    if proxy:
        env.update({"https_proxy": proxy, "HTTPS_PROXY": proxy})
    if has_ca:
        env["GIT_SSL_CAINFO"] = CA_BUNDLE
    if token:
        # `user:token` as given, else the token as the password of a placeholder user (GitHub, GitLab and
        # Gitea take a personal access token so).
        pair = token if ":" in token else f"x-access-token:{token}"
        header = "Authorization: Basic " + base64.b64encode(pair.encode()).decode()
        env.update({"GIT_CONFIG_COUNT": "1", "GIT_CONFIG_KEY_0": f"http.https://{host}/.extraHeader",
                    "GIT_CONFIG_VALUE_0": header})
    return env


def install_ca(agent: AgentClient, ca_pem: bytes) -> None:
    """The trust store plus the extra CA as one bundle (GIT_SSL_CAINFO replaces git's default store)."""
    agent.put_file(GUEST_CA_PATH, ca_pem, 0o644)
    # Fixed paths, no user input: a shell only for the redirection.
    agent.exec(["sh", "-c", f"cat {SYSTEM_BUNDLE} {GUEST_CA_PATH} > {CA_BUNDLE} 2>/dev/null || "
                            f"cp {GUEST_CA_PATH} {CA_BUNDLE}"], timeout_s=60)


def clone_args(remote: Remote, into: str) -> list[str]:
    branch = ["--branch", remote.branch] if remote.branch else []
    return ["git", "clone", "--quiet", *branch, "--", remote.url, into]


def push_args(into: str, branch: str) -> list[str]:
    """HEAD (every turn is committed) to `branch` on origin; never forced."""
    return ["git", "-C", into, "push", "--quiet", "--porcelain", "origin", f"HEAD:refs/heads/{branch}"]


def redact(text: str, token: str | None) -> str:
    """git's error text with the token (and its Basic form) cut out, should any of it be echoed."""
    if token:
        pair = token if ":" in token else f"x-access-token:{token}"
        for secret in {token, base64.b64encode(pair.encode()).decode(), *token.split(":")}:
            if len(secret) >= 4:
                text = text.replace(secret, "[redacted]")
    return text
