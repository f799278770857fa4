"""The providers' sign-in pages, for a browser (the login VM's Chromium, seen through noVNC) to show and a
test to click: an ASGI app in front of the OAuth stand-in (`VmStandins(..., oauth_app=SignInPages)`).

- GET on a provider's authorize address (any path, with `redirect_uri` and `state`): a page with a banner
  in `BANNER_RGB` (no placeholder or error page has that colour, so a test can tell the page is drawn) and
  one big "Authorize" button filling the middle of the screen.
- The button (GET /standin/approve): a fresh code the OAuth stand-in will accept, recorded in `approvals`,
  and a redirect to `redirect_uri` with `code` and `state` — the CLI's localhost callback (Codex, Gemini)
  or Claude's hosted code page, which this app serves too, showing `code#state` for the user to paste.

Everything else goes to the OAuth stand-in unchanged.
"""

from __future__ import annotations

import html
import threading
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlencode

from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.types import Receive, Scope, Send

from tests.standins import oauth

BANNER_RGB = (0xE8, 0x5D, 0x04)
BUTTON_RGB = (0x1B, 0x5E, 0x20)
_OAUTH_OF_HOST = {"claude.com": oauth.CLAUDE, "claude.ai": oauth.CLAUDE, "auth.openai.com": oauth.CODEX,
                  "accounts.google.com": oauth.GOOGLE}
_PAGE = """<!doctype html><html><head><title>Sign in (stand-in)</title><style>
body {{ margin: 0; font: 28px sans-serif; background: #fff; }}
header {{ background: rgb{banner}; color: #fff; padding: 40px 60px; font-size: 44px; font-weight: bold; }}
form {{ margin: 0; }}
button {{ display: block; width: 100%; height: 380px; border: 0; background: rgb{button}; color: #fff;
          font-size: 56px; cursor: pointer; }}
</style></head><body><header>{title}</header><form method="get" action="/standin/approve">{fields}
<button type="submit">Authorize</button></form></body></html>"""


@dataclass
class Approval:
    provider: str
    code: str
    state: str
    redirect_uri: str  # where the browser was sent: the CLI's localhost callback, or Claude's code page


@dataclass
class SignInPages:
    oauth_state: oauth.OAuthState
    approvals: list[Approval] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.upstream = oauth.create_app(self.oauth_state)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = self._page(Request(scope, receive)) if scope["type"] == "http" else None
        await (response or self.upstream)(scope, receive, send)

    def last(self, provider: str) -> Approval | None:
        """The latest approval for an OAuth stand-in provider name (oauth.CLAUDE, ...), if any."""
        with self.lock:
            return next((a for a in reversed(self.approvals) if a.provider == provider), None)

    def _page(self, request: Request) -> Response | None:
        if request.method != "GET":
            return None
        host = (request.headers.get("host") or "").split(":")[0].lower()
        query = {k: v[0] for k, v in parse_qs(request.url.query).items()}
        provider = _OAUTH_OF_HOST.get(host)
        if provider and request.url.path == "/standin/approve" and "redirect_uri" in query:
            code = self.oauth_state.new_code(provider)
            with self.lock:
                self.approvals.append(Approval(provider, code, query.get("state", ""), query["redirect_uri"]))
            sep = "&" if "?" in query["redirect_uri"] else "?"
            target = query["redirect_uri"] + sep + urlencode({"code": code, "state": query.get("state", "")})
            return RedirectResponse(target, status_code=302)
        if provider and "redirect_uri" in query and "state" in query:
            fields = "".join(f'<input type="hidden" name="{html.escape(k)}" value="{html.escape(v)}">'
                             for k, v in query.items() if k in ("redirect_uri", "state"))
            return HTMLResponse(_PAGE.format(banner=BANNER_RGB, button=BUTTON_RGB,
                                             title=f"Sign in to {provider} (stand-in)", fields=fields))
        if host == "platform.claude.com" and request.url.path == "/oauth/code/callback":
            shown = html.escape(f"{query.get('code', '')}#{query.get('state', '')}")
            return HTMLResponse("<!doctype html><body style='font:32px sans-serif;margin:60px'>"
                                f"<p>Paste this code into Claude Code:</p><p><b>{shown}</b></p></body>")
        return None
