"""A locust file: each simulated client takes one job (a login or a run) from POLYDEV_LOAD_JOBS, drives it over the
HTTP API to its end, writes how it ended to POLYDEV_LOAD_OUT (one JSON line a job), and stops; the last one to
finish stops locust. Every request's status is recorded, so a 5xx anywhere shows in the results.

    POLYDEV_LOAD_JOBS=jobs.json POLYDEV_LOAD_OUT=out.jsonl \\
        python -m locust -f tests/support/load_locust.py --headless -u N -r N --run-time 600s --host URL

A job is {"kind": "login" | "run", "token": API token, "provider": ..., "prompt": ... (runs), "timeout": s,
"url": its server (optional: else --host)}.
A login is started, the pasted code sent once it asks for one (the scripted CLI's "good-code"), and followed
to its end; a run is started and its event stream read to the end. Written by tests/support/load.py, which
also reads the results; used by tests/reliability/ and bench/load.py.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import gevent
from locust import HttpUser, constant, events, task
from locust.env import Environment
from locust.exception import StopUser

JOBS: list[dict[str, Any]] = json.loads(open(os.environ["POLYDEV_LOAD_JOBS"]).read())  # noqa: SIM115
OUT = os.environ["POLYDEV_LOAD_OUT"]
SESSION_END = ("completed", "failed", "timeout", "cancelled")
POLL_S = 0.5
_next = iter(range(len(JOBS)))
_finished = 0
_server_errors: list[str] = []  # "METHOD name → status" of every 5xx (and of every request that got no answer)
_requests = 0


@events.request.add_listener
def _count(request_type: str, name: str, response: Any, exception: BaseException | None, **_: Any) -> None:
    global _requests
    _requests += 1
    code = getattr(response, "status_code", 0) or 0
    if code >= 500 or (exception is not None and code == 0):
        _server_errors.append(f"{request_type} {name} → {code or type(exception).__name__}")


@events.quitting.add_listener
def _summary(environment: Environment, **_: Any) -> None:
    with open(OUT, "a") as out:
        out.write(json.dumps({"summary": {"requests": _requests, "server_errors": _server_errors,
                                          "finished": _finished, "jobs": len(JOBS)}}) + "\n")


def _write(result: dict[str, Any]) -> None:
    with open(OUT, "a") as out:
        out.write(json.dumps(result) + "\n")


def _error(response: Any) -> str:
    try:
        err = response.json()["error"]
        return f"{response.status_code} {err['code']}: {err['message']}"
    except Exception:  # noqa: BLE001 - not our error shape: say what came
        return f"{response.status_code} {response.text[:200]}"


class Client(HttpUser):
    wait_time = constant(0)

    @task
    def one_job(self) -> None:
        global _finished
        try:
            index = next(_next)
        except StopIteration:
            raise StopUser() from None
        job = JOBS[index]
        self.client.headers["Authorization"] = f"Bearer {job['token']}"
        self.base = job.get("url", "")  # the job's own server (several servers behind one load), else --host
        result: dict[str, Any] = {"index": index, "kind": job["kind"], "provider": job["provider"],
                                  "codes": [], "t_start": time.time()}
        try:
            if job["kind"] == "login":
                self._login(job, result)
            else:
                self._run(job, result)
        except Exception as exc:  # noqa: BLE001 - the client's own failure is a result too
            result.setdefault("status", "client_error")
            result["reason"] = f"{type(exc).__name__}: {exc}"
        result["t_end"] = time.time()
        _write(result)
        _finished += 1
        if _finished == len(JOBS):
            gevent.spawn_later(0.1, self.environment.runner.quit)  # not from this greenlet, which it would kill
        raise StopUser()

    def _note(self, result: dict[str, Any], response: Any) -> None:
        if response.status_code >= 300:
            result["codes"].append(response.status_code)

    def _start(self, path: str, body: dict[str, Any], result: dict[str, Any]) -> dict[str, Any] | None:
        """POST the start of a login or run: its answer, or None (the refusal noted in `result`)."""
        response = self.client.post(self.base + path, json=body, name=path)
        self._note(result, response)
        if response.status_code != 202:
            result.update(status=f"refused {response.status_code}", reason=_error(response))
            return None
        answer: dict[str, Any] = response.json()
        return answer

    def _login(self, job: dict[str, Any], result: dict[str, Any]) -> None:
        started = self._start("/api/auth/start", {"provider": job["provider"]}, result)
        if started is None:
            return
        sid = result["id"] = started["session_id"]
        deadline = time.monotonic() + job.get("timeout", 600)
        sent = False
        while time.monotonic() < deadline:
            response = self.client.get(self.base + f"/api/auth/sessions/{sid}", name="/api/auth/sessions/{id}")
            self._note(result, response)
            state = response.json() if response.status_code == 200 else {}
            status = state.get("status")
            if status in SESSION_END:
                result.update(status=status, reason=state.get("error_message"))
                return
            if status == "awaiting_user_auth" and not sent:
                result["t_url"] = time.time()
                code = self.client.post(self.base + f"/api/auth/sessions/{sid}/code", json={"code": "good-code"},
                                        name="/api/auth/sessions/{id}/code")
                self._note(result, code)
                sent = True
            gevent.sleep(POLL_S)
        result.update(status="client_timeout", reason=f"still {status} after {job.get('timeout', 600)} s")

    def _run(self, job: dict[str, Any], result: dict[str, Any]) -> None:
        body = {"provider": job["provider"], "prompt": job["prompt"], "timeout": job.get("timeout", 600)}
        started = self._start("/api/runs", body, result)
        if started is None:
            return
        run_id = result["id"] = started["id"]
        # The event stream, read to its end: the moment the last event reaches the client is the run's end as a
        # user sees it; the scripted CLI's own time arrives as a status event (its "timed" prompts).
        with self.client.get(self.base + f"/api/runs/{run_id}/events", stream=True, name="/api/runs/{id}/events",
                             headers={"Accept": "text/event-stream"}, timeout=(30, job.get("timeout", 600) + 60),
                             catch_response=True) as stream:
            self._note(result, stream)
            for raw in stream.iter_lines(decode_unicode=True):
                if not raw or not raw.startswith("data:"):
                    continue
                ev = json.loads(raw[5:])
                if ev.get("type") == "status" and str(ev.get("message", "")).startswith("cli_ms "):
                    result["cli_ms"] = float(ev["message"].split()[1])
                elif ev.get("type") in ("text", "tool_call") and "t_first" not in result:
                    result["t_first"] = time.time()
                if ev.get("type") in ("done", "error"):
                    result["t_last_event"] = time.time()
            stream.success()
        response = self.client.get(self.base + f"/api/runs/{run_id}", name="/api/runs/{id}")
        self._note(result, response)
        row = response.json() if response.status_code == 200 else {}
        result.update(status=row.get("status"), reason=row.get("error_message"))
