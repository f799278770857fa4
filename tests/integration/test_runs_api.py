"""The runs API's answers to bad input: checked before anything starts or streams, a JSON 4xx that names
what was wrong, and nothing recorded."""

from __future__ import annotations

import uuid

import pytest

from polydev.store.runs import StoredEvent
from tests.support.app import Api
from tests.support.flow_api import sse


async def ended_run(api: Api) -> tuple[str, dict[str, str]]:
    """A user's run that has ended with three stored events: (run id, the user's auth headers)."""
    uid, token = await api.new_user()
    row = await api.services.runs.create(uuid.UUID(uid), "claude_code", "hi", timeout_seconds=60,
                                         credential_kind="api_key")
    await api.services.runs.append_events(row.id, [StoredEvent(i, {"type": "text", "text": f"t{i}"})
                                                   for i in range(3)])
    await api.services.runs.finish(row.id, "succeeded")
    return str(row.id), api.auth(token)


@pytest.mark.parametrize("value", [
    "9223372036854775808",  # past SQLite's integers
    "2147483648",  # past the event number's column
    "-1", "-5",
    "+1", "1_0",  # int() takes these; an event id is digits only
])
async def test_a_last_event_id_that_is_not_an_event_id_is_400_naming_the_header(api: Api, value: str) -> None:
    rid, h = await ended_run(api)
    r = await api.client.get(f"/api/runs/{rid}/events", headers={**h, "Last-Event-ID": value})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "bad_last_event_id" and "Last-Event-ID" in error["message"]


async def test_a_good_last_event_id_resumes_and_a_huge_after_is_refused(api: Api) -> None:
    rid, h = await ended_run(api)
    r = await api.client.get(f"/api/runs/{rid}/events", headers={**h, "Last-Event-ID": "0"})
    assert r.status_code == 200 and [seq for seq, _, _ in sse(r.text)] == [1, 2]
    r = await api.client.get(f"/api/runs/{rid}/events", headers={**h, "Last-Event-ID": "2147483647"})
    assert r.status_code == 200 and sse(r.text) == []
    r = await api.client.get(f"/api/runs/{rid}/events", params={"after": "9223372036854775808"}, headers=h)
    assert r.status_code == 422 and r.json()["error"]["code"] == "validation_error"


@pytest.mark.parametrize("name", [
    ".", "dir/", "a/./b", "./a", "a//b",
    "line\nbreak.txt", "tab\there", "\u202etxt.exe", "zero\u200bwidth", "line\u2028sep", "para\u2029sep",
    "del\x7f",
])
async def test_bad_run_file_names_are_422_naming_the_file_and_start_nothing(api: Api, name: str) -> None:
    _, token = await api.new_user()
    h = api.auth(token)
    r = await api.client.post("/api/runs", json={"provider": "claude_code", "prompt": "x",
                                                 "files": {"ok.txt": "fine", name: "content"}}, headers=h)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["code"] == "bad_files"
    assert repr(name[:80])[:-1] in error["message"]  # named, escaped (a long one cut short)
    assert (await api.client.get("/api/runs", headers=h)).json() == []


async def test_ordinary_names_pass_and_a_file_that_is_also_a_directory_is_422(api: Api) -> None:
    _, token = await api.new_user()
    h = api.auth(token)
    for name in ("note.txt", "src/pkg/main.py", "ünïcode näme.txt", "-rf", ".hidden/x", "d/" * 300 + "f"):
        r = await api.client.post("/api/runs", json={"provider": "claude_code", "prompt": "x", "files": {name: "x"}},
                                  headers=h)
        # Past the files' check: this user has no credential, which is checked next.
        assert r.status_code == 409 and r.json()["error"]["code"] == "no_credential", (name, r.text)
    r = await api.client.post("/api/runs", json={"provider": "claude_code", "prompt": "x",
                                                 "files": {"src": "a file", "src/main.py": "print()"}}, headers=h)
    assert r.status_code == 422 and r.json()["error"]["code"] == "bad_files"
    assert "'src' is also a directory" in r.json()["error"]["message"]


async def test_an_empty_prompt_is_422_empty_prompt(api: Api) -> None:
    _, token = await api.new_user()
    h = api.auth(token)
    for prompt in ("", "  \n"):
        r = await api.client.post("/api/runs", json={"provider": "claude_code", "prompt": prompt}, headers=h)
        assert r.status_code == 422 and r.json()["error"]["code"] == "empty_prompt", r.text
    # (Which the prompt's length constraint, gone for the above, also refused: a lone surrogate.)
    r = await api.client.post("/api/runs", content=b'{"provider": "claude_code", "prompt": "\\ud800"}',
                              headers={**h, "content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "validation_error", r.text
    assert (await api.client.get("/api/runs", headers=h)).json() == []


@pytest.mark.parametrize("files", ['{"a.txt": "\\ud800"}', '{"a\\ud800.txt": "x"}'])
async def test_a_lone_surrogate_in_a_file_is_422_not_a_server_error(api: Api, files: str) -> None:
    _, token = await api.new_user()
    h = api.auth(token)
    body = f'{{"provider": "claude_code", "prompt": "x", "files": {files}}}'.encode()
    r = await api.client.post("/api/runs", content=body, headers={**h, "content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "bad_files", r.text
    assert (await api.client.get("/api/runs", headers=h)).json() == []
