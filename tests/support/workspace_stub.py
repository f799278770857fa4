"""The workspace, turn and terminal API as the dashboard calls it, answered inside the browser (Playwright routes
and a routed WebSocket) for the fast dashboard tests: the fake server's "VMs" are host processes, where a
workspace's /workspace would be the host's own, so workspaces cannot be made there. The answers have the API's
shapes (api/routes/workspaces.py, api/routes/runs.py); every call must carry the page's bearer token.
tests/vm/test_dashboard_workspaces.py drives the same views against the real API on real VMs."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, urlparse

TERMINAL = ("succeeded", "failed", "cancelled", "timeout")


def _now() -> str:
    return datetime.now(UTC).isoformat()


@dataclass
class Turn:
    """What the next prompt's run shows: its events, the files it changed and its patch."""
    events: list[dict[str, Any]]
    changes: list[dict[str, Any]] = field(default_factory=list)
    patch: str = ""


@dataclass
class Shell:
    """The terminal's far end: echoes keystrokes and answers `echo WORD` like a shell; `exit` ends it."""
    urls: list[str] = field(default_factory=list)
    keys: bytearray = field(default_factory=bytearray)
    controls: list[dict[str, Any]] = field(default_factory=list)
    refuse: tuple[int, str] | None = None  # close each connection at once with this code and reason
    closes: list[int | None] = field(default_factory=list)  # the close codes of the connections that opened

    def handle(self, ws: Any) -> None:
        self.urls.append(ws.url)
        if self.refuse:
            code, reason = self.refuse
            ws.close(code=code, reason=reason)
            return
        line = bytearray()

        def message(data: str | bytes) -> None:
            if isinstance(data, str):  # a control message
                self.controls.append(json.loads(data))
                return
            self.keys.extend(data)
            for byte in data:
                if byte == 13:
                    command = line.decode()
                    line.clear()
                    if command == "exit":
                        ws.send(b"\r\nlogout\r\n")
                        ws.close(code=1000, reason="shell exited (0)")
                        return
                    out = command[5:] + "\r\n" if command.startswith("echo ") else f"sh: {command}: not found\r\n"
                    ws.send(b"\r\n" + out.encode() + b"$ ")
                else:
                    line.append(byte)
                    ws.send(bytes([byte]))

        def closed(code: int | None, _reason: str | None) -> None:
            self.closes.append(code)

        ws.on_message(message)
        ws.on_close(closed)
        ws.send(b"\x1b[1;32mworkspace\x1b[0m:/workspace$ ")


class WorkspaceApi:
    def __init__(self, token: str, provider: str = "claude_code") -> None:
        self.token = token
        self.provider = provider
        self.workspaces: dict[str, dict[str, Any]] = {}
        self.conversations: dict[str, list[dict[str, Any]]] = {}  # workspace id → its conversations
        self.runs: dict[str, dict[str, Any]] = {}
        self.turns: dict[str, Turn] = {}  # run id → what it shows
        self.gets: dict[str, int] = {}  # run id → GETs so far (a new run is running at first, then done)
        self.created: list[dict[str, Any]] = []  # POST /api/workspaces bodies
        self.uploads: list[tuple[str, str, bytes]] = []  # (name, Content-Type, body)
        self.asked: list[dict[str, Any]] = []  # POST /api/runs bodies
        self.next_turn = Turn([{"type": "text", "text": "Done."}, {"type": "done", "usage": {"output_tokens": 3}}])
        self.archive = b"\x1f\x8b stand-in archive"
        self.shell = Shell()
        self.unauthenticated: list[str] = []
        self.tickets = 0

    # -- data --------------------------------------------------------------------------------------------------
    def add_workspace(self, name: str, state: str = "ready", source: str = "empty", size: int = 0,
                      **extra: Any) -> dict[str, Any]:
        w = {"id": str(uuid.uuid4()), "user_id": str(uuid.uuid4()), "name": name, "source": source,
             "repo_url": None, "state": state, "size_bytes": size, "error": None, "vm_id": None,
             "created_at": _now(), "used_at": _now(), **extra}
        self.workspaces[w["id"]] = w
        self.conversations[w["id"]] = []
        return w

    def add_turn(self, workspace_id: str, prompt: str, turn: Turn, conversation_id: str | None = None,
                 status: str = "succeeded") -> dict[str, Any]:
        convs = self.conversations[workspace_id]
        conv = next((c for c in convs if c["id"] == conversation_id), None)
        if conv is None:
            conv = {"id": str(uuid.uuid4()), "provider": self.provider, "turns": 0, "runs": [],
                    "created_at": _now(), "updated_at": _now()}
            convs.append(conv)
        run = {"id": str(uuid.uuid4()), "provider": conv["provider"], "status": status, "prompt": prompt,
               "error_message": None, "exit_code": 0, "usage": None, "result": None, "credential_refreshed": False,
               "created_at": _now(), "started_at": _now(), "finished_at": None, "workspace_id": workspace_id,
               "conversation_id": conv["id"], "changes": turn.changes}
        conv["runs"].append(run["id"])
        conv["turns"] += 1
        self.runs[run["id"]] = run
        self.turns[run["id"]] = turn
        return run

    # -- the routes ----------------------------------------------------------------------------------------------
    def install(self, page: Any) -> None:
        page.route(lambda url: "/api/workspaces" in url, self._workspaces)
        page.route(lambda url: "/api/runs" in url, self._runs)
        page.route_web_socket(lambda url: "/terminal?" in url, self.shell.handle)

    def _authorized(self, route: Any) -> bool:
        if route.request.headers.get("authorization") == f"Bearer {self.token}":
            return True
        self.unauthenticated.append(route.request.url)
        route.fulfill(status=401, json={"error": {"code": "unauthorized", "message": "no token"}})
        return False

    @staticmethod
    def _missing(route: Any, what: str = "no such workspace") -> None:
        route.fulfill(status=404, json={"error": {"code": "not_found", "message": what}})

    def _workspaces(self, route: Any) -> None:
        if not self._authorized(route):
            return
        request = route.request
        url = urlparse(request.url)
        parts = url.path.split("/")[3:]  # after /api/workspaces
        method = request.method
        if not parts and method == "GET":
            for w in self.workspaces.values():  # made: ready by the next look
                w["state"] = "ready" if w["state"] == "creating" else w["state"]
            route.fulfill(json=list(self.workspaces.values()))
        elif not parts and method == "POST":
            body = request.post_data_json
            self.created.append(body)
            w = self.add_workspace(body["name"], state="creating", source=body.get("source", "empty"),
                                   repo_url=body.get("repo_url"), branch=body.get("branch"))
            route.fulfill(status=202, json=w)
        elif parts == ["upload"] and method == "POST":
            name = parse_qs(url.query)["name"][0]
            self.uploads.append((name, request.headers.get("content-type", ""), request.post_data_buffer))
            route.fulfill(status=202, json=self.add_workspace(name, state="creating", source="archive"))
        elif parts[0] not in self.workspaces:
            self._missing(route)
        else:
            w = self.workspaces[parts[0]]
            rest = parts[1:]
            if not rest and method == "GET":
                route.fulfill(json=w)
            elif not rest and method == "DELETE":
                del self.workspaces[w["id"]]
                route.fulfill(status=204, body="")
            elif rest == ["pause"]:
                w["state"] = "paused"
                route.fulfill(json=w)
            elif rest == ["conversations"]:
                route.fulfill(json=self.conversations[w["id"]])
            elif rest == ["archive"]:
                route.fulfill(body=self.archive, headers={
                    "Content-Type": "application/gzip",
                    "Content-Disposition": f'attachment; filename="{w["name"]}.tar.gz"'})
            elif rest == ["terminal-ticket"]:
                self.tickets += 1
                ticket = f"ticket-{self.tickets}"
                route.fulfill(json={"ticket": ticket, "expires_in": 30,
                                    "url": f"/api/workspaces/{w['id']}/terminal?ticket={ticket}"})
            else:
                self._missing(route, "no such route")

    def _runs(self, route: Any) -> None:
        if not self._authorized(route):
            return
        request = route.request
        parts = urlparse(request.url).path.split("/")[3:]  # after /api/runs
        if not parts and request.method == "POST":
            body = request.post_data_json
            self.asked.append(body)
            if "conversation_id" in body:
                wid = next(w for w, convs in self.conversations.items()
                           if any(c["id"] == body["conversation_id"] for c in convs))
            else:
                wid = body["workspace_id"]
            run = self.add_turn(wid, body["prompt"], self.next_turn, body.get("conversation_id"), status="queued")
            route.fulfill(status=202, json=run)
            return
        if not parts or parts[0] not in self.runs:
            self._missing(route, "no such run")
            return
        run = self.runs[parts[0]]
        turn = self.turns[run["id"]]
        rest = parts[1:]
        if not rest:
            seen = self.gets[run["id"]] = self.gets.get(run["id"], 0) + 1
            if run["status"] == "queued" and seen > 1:
                run["status"] = "succeeded"
            shown = dict(run)
            if shown["status"] not in TERMINAL:
                shown["changes"] = None  # known once the turn ends
            route.fulfill(json=shown)
        elif rest == ["events"]:
            stream = "".join(f"id: {i}\nevent: {ev['type']}\ndata: {json.dumps(ev)}\n\n"
                             for i, ev in enumerate(turn.events))
            route.fulfill(body=stream, headers={"Content-Type": "text/event-stream"})
        elif rest == ["diff"]:
            route.fulfill(body=turn.patch, headers={"Content-Type": "text/x-diff"})
        else:
            self._missing(route, "no such route")
