"""The dashboard: one static page plus small ES modules, served at /app, talking to the JSON API.

Auth stays with the API: the page keeps the user's API token in sessionStorage and sends it as a Bearer
header from fetch(), including for the SSE streams (read with fetch + ReadableStream, since EventSource
cannot send headers). No cookie is ever set, so no request carries credentials the browser adds by itself:
there is nothing for a cross-site request to ride on (no CSRF), and the API's auth is unchanged. The price
is that script running in the page could read the token, so the page allows only its own scripts (CSP).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, RedirectResponse, Response
from starlette.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send

from polydev.config import Settings
from polydev.web.vendor import PACKAGES, installed, package_dir

STATIC = Path(__file__).parent / "static"
_HOST = re.compile(r"[A-Za-z0-9.-]+(:[0-9]{1,5})?|\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?")

# Only the page's own files; the VNC and terminal WebSockets are same-origin (ws:/wss: spelled out: older
# browsers do not count them as 'self'). No inline script or style, no framing by other sites. (xterm.js
# writes its sizes and colours into <style> elements, which this refuses: js/terminal.js copies them into a
# constructed stylesheet, which it allows.)
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
       "connect-src 'self' {ws}; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
PAGE_HEADERS = {"Cache-Control": "no-store", "Referrer-Policy": "no-referrer",
                "X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY"}

# (status, code, message) → an error answer in the API's shape; the app that mounts the dashboard gives it.
ErrorResponse = Callable[[int, str, str], Response]


class VendorFiles:
    """A vendored package's files (vendor.py), or a JSON 404 that says how to install them (the page shows
    that message). Checked per request, so a `polydev web vendor` after start-up is picked up."""

    def __init__(self, settings: Settings, key: str, error_response: ErrorResponse) -> None:
        self.settings = settings
        self.key = key
        self.error_response = error_response
        self.files = StaticFiles(directory=package_dir(settings, key), check_dir=False)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not installed(self.settings, self.key):
            pkg = PACKAGES[self.key]
            response = self.error_response(404, f"{pkg.key.replace('-', '_')}_missing", f"{pkg.title} "
                                           f"{pkg.version} is not installed on this server: run `polydev web "
                                           "vendor` (scripts/run.sh does)")
            await response(scope, receive, send)
            return
        await self.files(scope, receive, send)


def _page(request: Request) -> Response:
    host = request.headers.get("host", "")
    # The Host header goes into a header value: only a plain host[:port] may, so it cannot add directives.
    ws = f"ws://{host} wss://{host}" if _HOST.fullmatch(host) else ""
    return FileResponse(STATIC / "index.html", media_type="text/html",
                        headers={**PAGE_HEADERS, "Content-Security-Policy": CSP.format(ws=ws)})


def install_dashboard(app: FastAPI, settings: Settings, error_response: ErrorResponse) -> None:
    """Mount the dashboard; call after the API routers (the /app catch-all must not shadow anything)."""
    app.mount("/app/static", StaticFiles(directory=STATIC), name="web-static")
    for key in PACKAGES:
        app.mount(f"/app/vendor/{key}", VendorFiles(settings, key, error_response), name=f"web-{key}")

    @app.get("/", include_in_schema=False)
    async def root() -> RedirectResponse:
        return RedirectResponse("/app", status_code=307)

    # Every dashboard address is the same page; its script picks the view from the path (history API), so
    # a reload or a pasted link lands on the right view.
    @app.get("/app", include_in_schema=False)
    async def app_page(request: Request) -> Response:
        return _page(request)

    @app.get("/app/{view:path}", include_in_schema=False)
    async def app_view(request: Request, view: str) -> Response:
        return _page(request)
