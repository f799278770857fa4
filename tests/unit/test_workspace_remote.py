"""A workspace's git remote, checked before any VM is made, and the token's handling (core/workspace_git.py)."""

from __future__ import annotations

import base64

import pytest

from polydev.core.workspace_git import GitUrlError, check_branch, clone_args, git_env, parse_remote, redact

HOSTS = ("github.com", "*.example.org")


def test_an_https_url_on_an_allowed_host_is_taken_as_given() -> None:
    remote = parse_remote(" https://GitHub.com/me/app.git ", "main", HOSTS)
    assert (remote.url, remote.host, remote.branch) == ("https://GitHub.com/me/app.git", "github.com", "main")
    assert parse_remote("https://git.example.org:443/x/y", None, HOSTS).host == "git.example.org"
    assert clone_args(remote, "/workspace") == ["git", "clone", "--quiet", "--branch", "main", "--",
                                                "https://GitHub.com/me/app.git", "/workspace"]


@pytest.mark.parametrize(("url", "words"), [
    ("http://github.com/me/app.git", "https://"), ("git@github.com:me/app.git", "https://"),
    ("ssh://github.com/me/app.git", "https://"), ("https://tok@github.com/me/app.git", "credentials"),
    ("https://u:p@github.com/me/app.git", "credentials"), ("https://github.com/", "no repository path"),
    ("https://github.com:8443/me/app", "port 443"), ("https://github.com:abc/me/app", "port 443"),
    ("https://github.com/me/app?x=1", "query"), ("https://gitlab.com/me/app", "WORKSPACE_GIT_HOSTS"),
    ("https://example.org/me/app", "WORKSPACE_GIT_HOSTS"),  # *.example.org is below it, not it
])
def test_a_url_a_workspace_cannot_use_is_refused_saying_why(url: str, words: str) -> None:
    with pytest.raises(GitUrlError, match=words.replace("?", r"\?")):
        parse_remote(url, None, HOSTS)


@pytest.mark.parametrize("branch", ["-f", "a..b", "x.lock", "a//b", "end/", "sp ace", "a@{1}", "x" * 201, ""])
def test_a_branch_name_git_would_refuse_is_refused(branch: str) -> None:
    with pytest.raises(GitUrlError):
        check_branch(branch)
    assert check_branch("polydev/turn-1") == "polydev/turn-1"


def test_the_token_goes_only_into_one_hosts_header_and_out_of_any_error_text() -> None:
    env = git_env("http://10.0.2.99:3128", "github.com", "ghp_secret123", has_ca=True)
    assert env["https_proxy"] == "http://10.0.2.99:3128" and env["GIT_TERMINAL_PROMPT"] == "0"
    assert env["GIT_CONFIG_KEY_0"] == "http.https://github.com/.extraHeader"
    header = env["GIT_CONFIG_VALUE_0"]
    assert header == "Authorization: Basic " + base64.b64encode(b"x-access-token:ghp_secret123").decode()
    assert "GIT_SSL_CAINFO" in env and "GIT_CONFIG_COUNT" not in git_env(None, "github.com", None, False)
    assert git_env(None, "h", "me:pat", False)["GIT_CONFIG_VALUE_0"].endswith(base64.b64encode(b"me:pat").decode())
    said = f"fatal: auth failed for ghp_secret123 ({header})"
    assert "ghp_secret123" not in redact(said, "ghp_secret123")
    assert base64.b64encode(b"x-access-token:ghp_secret123").decode() not in redact(said, "ghp_secret123")
    assert redact(said, None) == said
