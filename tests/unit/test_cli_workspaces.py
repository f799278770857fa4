"""`polydev workspace …`, `polydev diff`, `polydev pull` and `polydev run --workspace/--conversation`, driven
through the real command-line app against a fake API on an httpx.MockTransport: what each command sends, what
it prints (stdout vs stderr, table vs JSON), how it fails, and that secrets never show."""

from __future__ import annotations

import io
import json
import re
import tarfile
import uuid
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

import polydev.client
from polydev.cli import app
from polydev.cli.archives import ArchiveError, safe_extract
from tests.support.workspace_checks import targz

API_TOKEN = "pd_unit_test_api_token_123"
GIT_TOKEN = "ghp_secret_git_token_456"
WS_ID = "11111111-1111-4111-8111-111111111111"
RUN_ID = "22222222-2222-4222-8222-222222222222"
CONV_ID = "33333333-3333-4333-8333-333333333333"
PATCH = ("diff --git a/README.md b/README.md\nindex 1..2 100644\n--- a/README.md\n+++ b/README.md\n"
         "@@ -1 +1 @@\n-old line\n+new line\n")


def workspace(state: str = "creating", **extra: Any) -> dict[str, Any]:
    return {"id": WS_ID, "user_id": str(uuid.UUID(int=7)), "name": "demo", "source": "empty", "repo_url": None,
            "state": state, "size_bytes": 2048, "error": None, "vm_id": None, "created_at": "2026-01-02T03:04:05Z",
            "used_at": "2026-01-02T03:04:06Z", **extra}


def error(status: int, code: str, message: str) -> httpx.Response:
    return httpx.Response(status, json={"error": {"code": code, "message": message}})


class FakeApi:
    """Answers by (method, path regex) from `routes`; keeps every request, body read, for the asserts."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []
        self.routes: list[tuple[str, str, Callable[[httpx.Request], httpx.Response]]] = []
        self.states = iter(["creating", "creating", "ready"])

    def on(self, method: str, path: str, answer: Callable[[httpx.Request], httpx.Response] | httpx.Response
           ) -> None:
        self.routes.insert(0, (method, path, answer if callable(answer) else (lambda _r, a=answer: a)))

    def __call__(self, request: httpx.Request) -> httpx.Response:
        request.read()
        self.requests.append(request)
        assert request.headers["authorization"] == f"Bearer {API_TOKEN}"
        for method, path, answer in self.routes:
            if request.method == method and re.fullmatch(path, request.url.path):
                return answer(request)
        return error(404, "not_found", f"no route {request.method} {request.url.path}")

    def sent(self, method: str, path: str) -> list[httpx.Request]:
        return [r for r in self.requests if r.method == method and r.url.path == path]


@pytest.fixture
def api(monkeypatch: pytest.MonkeyPatch) -> FakeApi:
    fake = FakeApi()
    transport = httpx.MockTransport(fake)

    class Client(polydev.client.PolydevClient):
        def __init__(self, url: str | None = None, token: str | None = None, **kw: Any) -> None:
            super().__init__(url, token, transport=transport, **kw)

    # call_api imports PolydevClient from the module when it runs: every command gets the fake transport.
    monkeypatch.setattr(polydev.client, "PolydevClient", Client)
    monkeypatch.setattr("polydev.cli.workspaces.WAIT_POLL_S", 0.0)
    monkeypatch.delenv("POLYDEV_GIT_TOKEN", raising=False)
    return fake


def cli(*args: str, input: str | None = None, env: dict[str, str] | None = None) -> Any:
    base = {"POLYDEV_URL": "http://polydev.test", "POLYDEV_TOKEN": API_TOKEN, "NO_COLOR": "1", "COLUMNS": "200"}
    result = CliRunner().invoke(app, list(args), input=input, env=base | (env or {}))
    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    assert API_TOKEN not in result.stdout + result.stderr
    return result


def test_create_from_a_directory_uploads_it_as_targz_and_waits_until_ready(api: FakeApi, tmp_path: Path) -> None:
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / ".git").mkdir()
    (project / "README.md").write_text("# demo\n")
    (project / "src" / "hello.py").write_text("print('hi')\n")
    (project / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    api.on("POST", "/api/workspaces/upload", httpx.Response(202, json=workspace()))
    api.on("GET", f"/api/workspaces/{WS_ID}", lambda _r: httpx.Response(200, json=workspace(next(api.states))))

    result = cli("workspace", "create", "demo", "--from", str(project), "--wait")

    assert result.exit_code == 0, result.stderr
    assert result.stdout == f"{WS_ID}\n"  # the id alone on stdout, for scripts
    assert "packed 5 entries" in result.stderr and "ready" in result.stderr
    (upload,) = api.sent("POST", "/api/workspaces/upload")
    assert upload.url.params["name"] == "demo" and upload.headers["content-type"] == "application/gzip"
    assert upload.headers["content-length"] == str(len(upload.content))
    with tarfile.open(fileobj=io.BytesIO(upload.content), mode="r:gz") as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert tar.extractfile(members["src/hello.py"]).read() == b"print('hi')\n"  # type: ignore[union-attr]
    # Names relative to the directory, everything included (.git too), no local owner names.
    assert set(members) == {".git", ".git/HEAD", "README.md", "src", "src/hello.py"}
    assert {(m.uname, m.gname, m.uid) for m in members.values()} == {("", "", 0)}
    assert len(api.sent("GET", f"/api/workspaces/{WS_ID}")) == 3  # polled until it was ready


@pytest.mark.parametrize(("suffix", "content_type"), [(".tar", "application/x-tar"), (".tar.gz", "application/gzip"),
                                                      (".tgz", "application/gzip"), (".zip", "application/zip")])
def test_create_from_an_archive_sends_it_as_is_with_its_type(api: FakeApi, tmp_path: Path, suffix: str,
                                                             content_type: str) -> None:
    archive = tmp_path / f"project{suffix}"
    archive.write_bytes(b"archive bytes " * 1000)
    api.on("POST", "/api/workspaces/upload", httpx.Response(202, json=workspace()))
    result = cli("workspace", "create", "demo", "--from", str(archive), "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["state"] == "creating"
    (upload,) = api.sent("POST", "/api/workspaces/upload")
    assert upload.headers["content-type"] == content_type and upload.content == archive.read_bytes()


def test_create_refuses_what_it_cannot_upload_or_combine(api: FakeApi, tmp_path: Path) -> None:
    (tmp_path / "project.rar").write_bytes(b"x")
    for args, said in ((["--from", str(tmp_path / "project.rar")], "--from takes a directory or an archive"),
                       (["--from", str(tmp_path / "missing")], "no such file or directory"),
                       (["--git", "https://example.test/r.git", "--from", str(tmp_path)], "give one"),
                       (["--branch", "main"], "go with --git"), (["--git-token"], "go with --git")):
        result = cli("workspace", "create", "demo", *args)
        assert result.exit_code == 2 and said in result.stderr, (args, result.stderr)
    assert api.requests == []


def test_create_wait_fails_with_the_workspaces_error(api: FakeApi, tmp_path: Path) -> None:
    api.on("POST", "/api/workspaces", httpx.Response(202, json=workspace()))
    api.on("GET", f"/api/workspaces/{WS_ID}", httpx.Response(200, json=workspace(
        "failed", error="unpacking the archive failed: not a tar")))
    result = cli("workspace", "create", "demo", "--wait")
    assert result.exit_code == 1
    assert f"workspace {WS_ID} failed: unpacking the archive failed: not a tar" in result.stderr
    assert json.loads(api.sent("POST", "/api/workspaces")[0].content) == {"name": "demo", "source": "empty"}


@pytest.mark.parametrize("how", ["env", "stdin"])
def test_create_from_git_sends_the_token_once_and_never_shows_it(api: FakeApi, how: str) -> None:
    api.on("POST", "/api/workspaces", httpx.Response(202, json=workspace(source="git",
                                                                         repo_url="https://git.test/r.git")))
    result = cli("workspace", "create", "demo", "--git", "https://git.test/r.git", "--branch", "dev", "--git-token",
                 env={"POLYDEV_GIT_TOKEN": GIT_TOKEN} if how == "env" else None,
                 input=None if how == "env" else GIT_TOKEN + "\n")
    assert result.exit_code == 0, result.stderr
    assert GIT_TOKEN not in result.stdout + result.stderr
    (made,) = api.sent("POST", "/api/workspaces")
    assert json.loads(made.content) == {"name": "demo", "source": "git", "repo_url": "https://git.test/r.git",
                                        "branch": "dev", "git_token": GIT_TOKEN}
    assert GIT_TOKEN not in str(made.url)  # in the body only, never in the address (logs, proxies)


def test_create_from_git_without_token_sends_none(api: FakeApi) -> None:
    api.on("POST", "/api/workspaces", httpx.Response(202, json=workspace(source="git")))
    result = cli("workspace", "create", "demo", "--git", "https://git.test/r.git",
                 env={"POLYDEV_GIT_TOKEN": GIT_TOKEN})  # set, but not asked for: not sent
    assert result.exit_code == 0, result.stderr
    assert json.loads(api.sent("POST", "/api/workspaces")[0].content) == {
        "name": "demo", "source": "git", "repo_url": "https://git.test/r.git"}
    empty = cli("workspace", "create", "demo", "--git", "https://git.test/r.git", "--git-token", input="\n")
    assert empty.exit_code == 2 and "no token" in empty.stderr


# -- ls, show, rm, pause, push, conversations ------------------------------------------------------------------
def test_ls_prints_a_table_or_json_and_all_asks_for_everyones(api: FakeApi) -> None:
    api.on("GET", "/api/workspaces", lambda r: httpx.Response(200, json=[
        workspace("ready", name="mine"), workspace("failed", name="theirs", error="boom")][
            : 2 if r.url.params.get("all") == "true" else 1]))
    table = cli("workspace", "ls")
    assert table.exit_code == 0 and "mine" in table.stdout and "2.0 KB" in table.stdout and "theirs" not in table.stdout
    everyone = cli("workspace", "ls", "--all")
    assert "theirs" in everyone.stdout and "boom" in everyone.stdout and str(uuid.UUID(int=7)) in everyone.stdout
    as_json = cli("workspace", "ls", "--json")
    assert [w["name"] for w in json.loads(as_json.stdout)] == ["mine"]
    assert [r.url.params.get("all") for r in api.requests] == [None, "true", None]


def test_show_rm_pause_push_and_conversations(api: FakeApi) -> None:
    api.on("GET", f"/api/workspaces/{WS_ID}", httpx.Response(200, json=workspace("ready", vm_id=WS_ID)))
    api.on("DELETE", f"/api/workspaces/{WS_ID}", httpx.Response(204))
    api.on("POST", f"/api/workspaces/{WS_ID}/pause", httpx.Response(200, json=workspace("paused")))
    api.on("POST", f"/api/workspaces/{WS_ID}/push", httpx.Response(
        200, json={"branch": "polydev/x", "commit": "abc123", "remote": "https://git.test/r.git"}))
    api.on("GET", f"/api/workspaces/{WS_ID}/conversations", httpx.Response(200, json=[
        {"id": CONV_ID, "provider": "codex", "turns": 2, "runs": [str(uuid.UUID(int=1)), RUN_ID],
         "created_at": "2026-01-02T03:04:05Z", "updated_at": "2026-01-02T04:05:06Z"}]))

    shown = cli("workspace", "show", WS_ID).stdout
    assert re.search(r"^state:\s+ready$", shown, re.M) and re.search(r"^repo_url:\s+-$", shown, re.M)
    assert "2.0 KB (2048 bytes)" in shown
    assert json.loads(cli("workspace", "show", WS_ID, "--json").stdout)["vm_id"] == WS_ID
    assert cli("workspace", "rm", WS_ID).stdout == f"deleted {WS_ID}\n"
    assert cli("workspace", "pause", WS_ID).stdout == f"{WS_ID}: paused\n"
    assert cli("workspace", "pause", WS_ID, "--disk-only").exit_code == 0
    assert [r.url.params["memory"] for r in api.sent("POST", f"/api/workspaces/{WS_ID}/pause")] == ["true", "false"]
    pushed = cli("workspace", "push", WS_ID, "--branch", "polydev/x")
    assert pushed.stdout == "pushed abc123 to polydev/x of https://git.test/r.git\n"
    assert json.loads(api.sent("POST", f"/api/workspaces/{WS_ID}/push")[0].content) == {"branch": "polydev/x"}
    no_branch = cli("workspace", "push", WS_ID)
    assert no_branch.exit_code == 2 and "--branch" in no_branch.stderr
    convs = cli("workspace", "conversations", WS_ID).stdout
    assert CONV_ID in convs and "codex" in convs and RUN_ID in convs  # the last turn's run, for `polydev diff`
    assert json.loads(cli("workspace", "conversations", WS_ID, "--json").stdout)[0]["turns"] == 2


def test_api_errors_end_the_command_with_the_message(api: FakeApi) -> None:
    for args in (["workspace", "show", WS_ID], ["workspace", "rm", WS_ID], ["diff", RUN_ID], ["pull", WS_ID, "-o", "-"]):
        result = cli(*args)
        assert result.exit_code == 1 and "not_found, HTTP 404" in result.stderr, (args, result.stderr)
    api.on("POST", "/api/workspaces", error(429, "workspace_limit", "you have 10 workspaces"))
    limited = cli("workspace", "create", "demo")
    assert limited.exit_code == 1 and "you have 10 workspaces (workspace_limit, HTTP 429)" in limited.stderr


# -- diff -----------------------------------------------------------------------------------------------------------
def test_diff_prints_the_patch_raw_when_piped_and_colored_when_asked(api: FakeApi) -> None:
    api.on("GET", f"/api/runs/{RUN_ID}/diff", httpx.Response(200, text=PATCH, headers={"content-type": "text/x-diff"}))
    raw = cli("diff", RUN_ID)
    assert raw.exit_code == 0 and raw.stdout == PATCH  # byte for byte: `polydev diff ID | git apply` works
    colored = cli("diff", RUN_ID, "--color", "always").stdout
    assert "\x1b[32m+new line\x1b[0m\n" in colored and "\x1b[31m-old line\x1b[0m\n" in colored
    assert "\x1b[36m@@ -1 +1 @@\x1b[0m" in colored and "\x1b[1m+++ b/README.md\x1b[0m" in colored
    assert re.sub(r"\x1b\[[0-9;]*m", "", colored) == PATCH
    assert cli("diff", RUN_ID, "--color", "sometimes").exit_code == 2
    api.on("GET", f"/api/runs/{RUN_ID}/diff", httpx.Response(200, text="", headers={"content-type": "text/x-diff"}))
    empty = cli("diff", RUN_ID)
    assert empty.stdout == "" and "no changes" in empty.stderr


# -- pull -----------------------------------------------------------------------------------------------------------
def archive_answer(body: bytes, filename: str = "demo.tar.gz") -> httpx.Response:
    return httpx.Response(200, content=body, headers={"content-type": "application/gzip",
                                                      "content-disposition": f'attachment; filename="{filename}"'})


class CutStream(httpx.SyncByteStream):
    """Some bytes, then the connection drops."""

    def __iter__(self) -> Iterator[bytes]:
        yield b"\x1f\x8b partial archive"
        raise httpx.ReadError("connection reset by peer")


def test_pull_saves_the_archive_and_a_cut_download_leaves_nothing(api: FakeApi, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    body = targz({"README.md": b"# demo\n"})
    api.on("GET", f"/api/workspaces/{WS_ID}/archive", archive_answer(body))
    out = tmp_path / "copy.tar.gz"
    saved = cli("pull", WS_ID, "-o", str(out))
    assert saved.exit_code == 0 and out.read_bytes() == body and f"saved {out}" in saved.stderr
    # No -o: the server's file name, here; a name that tries to lead elsewhere is cut to its last part.
    monkeypatch.chdir(tmp_path)
    api.on("GET", f"/api/workspaces/{WS_ID}/archive", archive_answer(body, "../../escape.tar.gz"))
    assert cli("pull", WS_ID).exit_code == 0 and (tmp_path / "escape.tar.gz").read_bytes() == body
    assert not (tmp_path.parent / "escape.tar.gz").exists()
    to_stdout = cli("pull", WS_ID, "-o", "-")
    assert to_stdout.stdout_bytes == body

    api.on("GET", f"/api/workspaces/{WS_ID}/archive", lambda _r: httpx.Response(
        200, stream=CutStream(), headers={"content-type": "application/gzip"}))
    cut = cli("pull", WS_ID, "-o", str(out))
    assert cut.exit_code == 1 and "cut off" in cut.stderr
    assert out.read_bytes() == body  # the earlier copy is untouched: the new one was never renamed over it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy.tar.gz", "escape.tar.gz"]  # no .part left
    assert cli("pull", WS_ID, "-o", str(tmp_path / "no" / "such" / "dir.tar.gz")).exit_code == 1
    assert cli("pull", WS_ID, "-o", str(out), "--extract", str(tmp_path / "x")).exit_code == 2


def test_pull_extract_unpacks_into_a_new_directory(api: FakeApi, tmp_path: Path) -> None:
    api.on("GET", f"/api/workspaces/{WS_ID}/archive", archive_answer(targz({
        "./README.md": b"# demo\n", "./src/hello.py": b"print('hi')\n", "./.git/HEAD": b"ref: refs/heads/main\n"})))
    dest = tmp_path / "checkout"
    result = cli("pull", WS_ID, "--extract", str(dest))
    assert result.exit_code == 0, result.stderr
    assert (dest / "src" / "hello.py").read_text() == "print('hi')\n" and (dest / ".git" / "HEAD").exists()
    again = cli("pull", WS_ID, "--extract", str(dest))  # not over existing files
    assert again.exit_code == 2 and "not an empty directory" in again.stderr


def test_pull_extract_refuses_members_that_escape(api: FakeApi, tmp_path: Path) -> None:
    evil = io.BytesIO()
    with tarfile.open(fileobj=evil, mode="w:gz") as tar:
        ok = tarfile.TarInfo("fine.txt")
        ok.size = 2
        tar.addfile(ok, io.BytesIO(b"ok"))
        bad = tarfile.TarInfo("../outside.txt")
        bad.size = 4
        tar.addfile(bad, io.BytesIO(b"evil"))
    api.on("GET", f"/api/workspaces/{WS_ID}/archive", archive_answer(evil.getvalue()))
    dest = tmp_path / "checkout"
    result = cli("pull", WS_ID, "--extract", str(dest))
    assert result.exit_code == 1 and "refused to unpack" in result.stderr
    assert not (tmp_path / "outside.txt").exists()
    assert not dest.exists()  # checked before anything was written: not even fine.txt


def test_safe_extract_refuses_links_out_and_keeps_absolute_paths_inside(tmp_path: Path) -> None:
    def tar_of(member: tarfile.TarInfo, data: bytes = b"") -> io.BytesIO:
        member.size = len(data) if member.isfile() else 0
        archive = io.BytesIO()
        with tarfile.open(fileobj=archive, mode="w") as tar:
            tar.addfile(member, io.BytesIO(data))
        archive.seek(0)
        return archive

    link = tarfile.TarInfo("link")
    link.type, link.linkname = tarfile.SYMTYPE, "../../etc"
    with pytest.raises(ArchiveError, match="refused to unpack"):
        safe_extract(tar_of(link), tmp_path / "links")
    assert not (tmp_path / "links" / "link").exists()
    # An absolute name is taken as relative to the destination (the data filter strips the leading /).
    assert safe_extract(tar_of(tarfile.TarInfo(str(tmp_path / "abs.txt")), b"x"), tmp_path / "abs") == 1
    assert not (tmp_path / "abs.txt").exists()
    assert (tmp_path / "abs" / str(tmp_path).lstrip("/") / "abs.txt").read_bytes() == b"x"
    with pytest.raises(ArchiveError, match="not a readable archive"):
        safe_extract(io.BytesIO(b"not a tar"), tmp_path / "junk")
    zipped = io.BytesIO()
    with zipfile.ZipFile(zipped, "w") as z:
        z.writestr("a.txt", "a")
    with pytest.raises(ArchiveError):
        safe_extract(io.BytesIO(zipped.getvalue()), tmp_path / "zip")


# -- run on a workspace ------------------------------------------------------------------------------------------
def sse_body(*events: dict[str, Any]) -> str:
    return "".join(f"id: {i}\nevent: {e['type']}\ndata: {json.dumps(e)}\n\n" for i, e in enumerate(events))


def test_run_on_a_workspace_passes_the_ids_and_lists_the_changed_files(api: FakeApi) -> None:
    run = {"id": RUN_ID, "provider": "claude_code", "status": "running", "workspace_id": WS_ID,
           "conversation_id": CONV_ID, "changes": None}
    done = {**run, "status": "succeeded", "changes": [
        {"path": "README.md", "status": "modified", "binary": False},
        {"path": "logo.png", "status": "added", "binary": True},
        {"path": "new.py", "from": "old.py", "status": "renamed", "binary": False}]}
    api.on("POST", "/api/runs", httpx.Response(202, json=run))
    api.on("GET", f"/api/runs/{RUN_ID}/events", httpx.Response(200, text=sse_body(
        {"type": "text", "text": "edited the readme"}, {"type": "done", "usage": {}}),
        headers={"content-type": "text/event-stream"}))
    api.on("GET", f"/api/runs/{RUN_ID}", httpx.Response(200, json=done))

    result = cli("run", "claude_code", "fix the readme", "--workspace", WS_ID)
    assert result.exit_code == 0, result.stderr
    assert result.stdout == "edited the readme\n"  # the answer alone on stdout; the summary is commentary
    assert json.loads(api.sent("POST", "/api/runs")[0].content) == {
        "provider": "claude_code", "prompt": "fix the readme", "workspace_id": WS_ID}
    assert f"3 files changed (the patch: polydev diff {RUN_ID}):" in result.stderr
    assert "  M README.md\n" in result.stderr and "  A logo.png (binary)\n" in result.stderr
    assert "  R old.py -> new.py\n" in result.stderr
    assert f"polydev run claude_code PROMPT --conversation {CONV_ID}" in result.stderr

    api.on("GET", f"/api/runs/{RUN_ID}", httpx.Response(200, json={**done, "changes": [], "status": "failed",
                                                                    "error_message": "the CLI crashed"}))
    follow_up = cli("run", "claude_code", "and again", "--conversation", CONV_ID)
    assert follow_up.exit_code == 1 and "no files changed" in follow_up.stderr and "the CLI crashed" in follow_up.stderr
    assert json.loads(api.sent("POST", "/api/runs")[1].content) == {
        "provider": "claude_code", "prompt": "and again", "conversation_id": CONV_ID}


def test_a_run_in_a_fresh_vm_prints_no_changes_summary(api: FakeApi) -> None:
    run = {"id": RUN_ID, "provider": "claude_code", "status": "succeeded", "workspace_id": None,
           "conversation_id": None, "changes": None}
    api.on("POST", "/api/runs", httpx.Response(202, json=run))
    api.on("GET", f"/api/runs/{RUN_ID}/events", httpx.Response(200, text=sse_body({"type": "done", "usage": {}}),
                                                                 headers={"content-type": "text/event-stream"}))
    api.on("GET", f"/api/runs/{RUN_ID}", httpx.Response(200, json=run))
    result = cli("run", "claude_code", "hi")
    assert result.exit_code == 0 and "changed" not in result.stderr and "follow up" not in result.stderr
    assert json.loads(api.sent("POST", "/api/runs")[0].content) == {"provider": "claude_code", "prompt": "hi"}


# -- the client on its own -------------------------------------------------------------------------------------------
def test_client_upload_streams_a_file_with_its_length_and_counts_progress(tmp_path: Path) -> None:
    class Transport(httpx.BaseTransport):
        """Sees the body as the client sends it (MockTransport would read it whole first)."""

        def handle_request(self, request: httpx.Request) -> httpx.Response:
            self.chunks = list(request.stream)  # type: ignore[arg-type]
            self.headers = request.headers
            return httpx.Response(202, json=workspace())

    data = bytes(range(256)) * 1000  # 256 000 bytes
    path = tmp_path / "a.tar"
    path.write_bytes(data)
    counted: list[int] = []
    transport = Transport()
    with polydev.client.PolydevClient("http://polydev.test", API_TOKEN, transport=transport) as pd, \
            path.open("rb") as f:
        assert pd.upload_workspace("a", f, "application/x-tar", progress=counted.append)["id"] == WS_ID
    # Sent in 64 KiB pieces as read from the file (never whole in memory), with the length announced.
    assert [len(c) for c in transport.chunks] == [65536, 65536, 65536, 59392] and b"".join(transport.chunks) == data
    assert transport.headers["content-length"] == str(len(data))
    assert "transfer-encoding" not in transport.headers
    assert counted == [65536, 65536, 65536, 59392]


def test_archive_type_by_suffix() -> None:
    from polydev.client_archives import archive_type

    assert [archive_type(n) for n in ("a.TAR.GZ", "b.tgz", "c.zip", "d.tar", "e.tar.xz", "f.gz", "g")] == [
        "application/gzip", "application/gzip", "application/zip", "application/x-tar", "application/x-tar",
        None, None]
