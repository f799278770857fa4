"""OAuth/token stand-in for the three CLIs, reached as HTTPS through :mod:`tests.standins.proxy`.

It tells the real hosts apart by the ``Host`` header and answers:

- Claude: ``POST platform.claude.com/v1/oauth/token`` (JSON; ``authorization_code`` and ``refresh_token``
  grants), ``GET api.anthropic.com/api/oauth/profile``, ``.../claude_cli/roles``, ``.../create_api_key``.
- Codex: ``POST auth.openai.com/oauth/token`` (form ``authorization_code``, form token exchange for an API
  key, JSON ``refresh_token``), and the device-code endpoints ``/api/accounts/deviceauth/usercode`` and
  ``/api/accounts/deviceauth/token`` (pending until the test calls :meth:`OAuthState.approve_device_codes`).
- Google: ``POST oauth2.googleapis.com/token`` (form; both grants) and ``www.googleapis.com/oauth2/v2/userinfo``.

Tokens are numbered per provider: a login issues ``<p>-access-1``/``<p>-refresh-1``, the refresh with
``<p>-refresh-1`` issues ``<p>-access-2``/``<p>-refresh-2`` and so on, so a test can see rotated tokens
written back. Every request is recorded in :attr:`OAuthState.requests`.
"""

from __future__ import annotations

import base64
import json
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

CLAUDE, CODEX, GOOGLE = "claude", "codex", "google"
EMAIL = "standin-user@example.com"


@dataclass
class OAuthRequest:
    host: str
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: Any
    status: int = 200
    #: "login", "refresh", "token_exchange", "profile", "device_code", "device_poll", "other"
    kind: str = "other"


def fake_jwt(claims: dict[str, Any]) -> str:
    """An unsigned-looking JWT (the CLIs only decode the payload)."""

    def b64(d: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(d, separators=(",", ":")).encode()).rstrip(b"=").decode()

    return f"{b64({'alg': 'RS256', 'typ': 'JWT', 'kid': 'standin'})}.{b64(claims)}.c3RhbmRpbi1zaWduYXR1cmU"


@dataclass
class _Issuer:
    provider: str
    generation: int = 0
    valid_refresh: set[str] = field(default_factory=set)
    used_refresh: set[str] = field(default_factory=set)

    def issue(self) -> tuple[str, str]:
        self.generation += 1
        access = f"{self.provider}-access-{self.generation}"
        refresh = f"{self.provider}-refresh-{self.generation}"
        self.valid_refresh.add(refresh)
        return access, refresh


class OAuthState:
    def __init__(self, *, access_ttl: int = 3600, single_use_refresh: bool = True) -> None:
        self.access_ttl = access_ttl
        self.single_use_refresh = single_use_refresh
        self._lock = threading.Lock()
        self._requests: list[OAuthRequest] = []
        self._issuers = {p: _Issuer(p) for p in (CLAUDE, CODEX, GOOGLE)}
        self.codes: dict[str, str] = {}  # authorization code -> provider
        self.device: dict[str, dict[str, Any]] = {}  # device_auth_id -> {user_code, approved}

    # -- test side
    def new_code(self, provider: str) -> str:
        code = f"{provider}-code-{secrets.token_hex(6)}"
        with self._lock:
            self.codes[code] = provider
        return code

    def seed_tokens(self, provider: str) -> tuple[str, str]:
        """Tokens as a login would issue them, for tests that write a credential file themselves."""
        with self._lock:
            return self._issuers[provider].issue()

    def generation(self, provider: str) -> int:
        with self._lock:
            return self._issuers[provider].generation

    def approve_device_codes(self) -> int:
        with self._lock:
            for d in self.device.values():
                d["approved"] = True
            return len(self.device)

    @property
    def requests(self) -> list[OAuthRequest]:
        with self._lock:
            return list(self._requests)

    def of_kind(self, kind: str) -> list[OAuthRequest]:
        return [r for r in self.requests if r.kind == kind]

    def record(self, rec: OAuthRequest) -> None:
        with self._lock:
            self._requests.append(rec)

    # -- server side helpers
    def take_code(self, code: str | None, provider: str) -> bool:
        with self._lock:
            return code is not None and self.codes.pop(code, None) == provider

    def refresh(self, provider: str, token: str | None) -> tuple[str, str] | str:
        """New (access, refresh), or an error string."""
        with self._lock:
            iss = self._issuers[provider]
            if token in iss.used_refresh:
                return "refresh_token_reused"
            if token not in iss.valid_refresh:
                return "invalid_grant"
            if self.single_use_refresh:
                iss.valid_refresh.discard(token)
                iss.used_refresh.add(token)
            return iss.issue()

    def issue(self, provider: str) -> tuple[str, str]:
        with self._lock:
            return self._issuers[provider].issue()

    def access_token_known(self, provider: str, token: str | None) -> bool:
        """Whether ``token`` is an access token this stand-in issued for ``provider``."""
        prefix = f"{provider}-access-"
        if not token or not token.startswith(prefix) or not token[len(prefix):].isdigit():
            return False
        with self._lock:
            return 1 <= int(token[len(prefix):]) <= self._issuers[provider].generation


async def _parse(request: Request) -> Any:
    raw = await request.body()
    if not raw:
        return {}
    ctype = request.headers.get("content-type", "")
    if "json" in ctype or raw[:1] in (b"{", b"["):
        try:
            return json.loads(raw)
        except ValueError:
            pass
    return {k: v[0] for k, v in parse_qs(raw.decode(errors="replace"), keep_blank_values=True).items()}


def _err(status: int, error: str, description: str = "") -> JSONResponse:
    return JSONResponse({"error": error, "error_description": description or error}, status_code=status)


# ---------------------------------------------------------------- Claude


def _claude_token(state: OAuthState, body: dict[str, Any], rec: OAuthRequest) -> Response:
    grant = body.get("grant_type")
    if grant == "authorization_code":
        rec.kind = "login"
        if not state.take_code(body.get("code"), CLAUDE):
            return _err(401, "invalid_grant", "Invalid authorization code")
        access, refresh = state.issue(CLAUDE)
    elif grant == "refresh_token":
        rec.kind = "refresh"
        got = state.refresh(CLAUDE, body.get("refresh_token"))
        if isinstance(got, str):
            return _err(400, "invalid_grant", got)
        access, refresh = got
    else:
        return _err(400, "unsupported_grant_type")
    return JSONResponse({
        "token_type": "Bearer", "access_token": access, "refresh_token": refresh, "expires_in": state.access_ttl,
        "scope": "user:inference user:profile user:sessions:claude_code user:mcp_servers user:file_upload",
        "organization": {"uuid": "00000000-0000-4000-8000-00000000a001", "name": "Stand-in Org"},
        "account": {"uuid": "00000000-0000-4000-8000-00000000b001", "email_address": EMAIL},
    })


def _claude_profile() -> dict[str, Any]:
    return {
        "account": {"uuid": "00000000-0000-4000-8000-00000000b001", "email": EMAIL, "email_address": EMAIL,
                    "full_name": "Stand-in User", "display_name": "Stand-in", "has_claude_max": True,
                    "has_claude_pro": False, "created_at": "2025-01-01T00:00:00Z"},
        "organization": {"uuid": "00000000-0000-4000-8000-00000000a001", "name": "Stand-in Org",
                         "organization_type": "claude_max", "billing_type": "stripe_subscription",
                         "rate_limit_tier": "default_claude_max_20x", "has_extra_usage_enabled": False,
                         "subscription_created_at": "2025-01-01T00:00:00Z"},
    }


# ---------------------------------------------------------------- Codex


def codex_id_token(plan: str = "pro") -> str:
    now = int(time.time())
    return fake_jwt({
        "iss": "https://auth.openai.com", "aud": ["app_standin"], "sub": "standin-user", "email": EMAIL,
        "email_verified": True, "iat": now, "exp": now + 3600, "auth_time": now,
        "https://api.openai.com/auth": {"chatgpt_account_id": "acc-standin", "chatgpt_plan_type": plan,
                                        "chatgpt_user_id": "user-standin", "user_id": "user-standin",
                                        "organization_id": "org-standin", "project_id": "proj-standin",
                                        "completed_platform_onboarding": True, "is_org_owner": True},
        "https://api.openai.com/profile": {"email": EMAIL, "email_verified": True},
    })


def codex_access_token(access: str, expires_in: int = 3600) -> str:
    """A Codex access token (a JWT) standing for the stand-in token name ``access``; negative = expired."""
    now = int(time.time())
    return fake_jwt({"iss": "https://auth.openai.com", "sub": "standin-user", "iat": now,
                     "exp": now + expires_in,
                     "standin_token": access,
                     "https://api.openai.com/auth": {"chatgpt_account_id": "acc-standin",
                                                     "chatgpt_plan_type": "pro"}})


def _codex_token(state: OAuthState, body: dict[str, Any], rec: OAuthRequest) -> Response:
    grant = body.get("grant_type")
    if grant == "authorization_code":
        rec.kind = "login"
        if not state.take_code(body.get("code"), CODEX):
            return _err(400, "invalid_grant", "Invalid authorization code")
        access, refresh = state.issue(CODEX)
    elif grant == "refresh_token":
        rec.kind = "refresh"
        got = state.refresh(CODEX, body.get("refresh_token"))
        if isinstance(got, str):
            return JSONResponse({"error": {"message": "refresh failed", "type": "invalid_request_error",
                                           "code": got}}, status_code=401)
        access, refresh = got
    elif grant == "urn:ietf:params:oauth:grant-type:token-exchange":
        rec.kind = "token_exchange"
        return JSONResponse({"access_token": "sk-standin-exchanged-key", "token_type": "Bearer",
                             "issued_token_type": "urn:ietf:params:oauth:token-type:access_token"})
    else:
        return _err(400, "unsupported_grant_type")
    return JSONResponse({"id_token": codex_id_token(), "access_token": codex_access_token(access, state.access_ttl),
                         "refresh_token": refresh, "token_type": "Bearer", "expires_in": state.access_ttl})


def _codex_device(state: OAuthState, path: str, body: dict[str, Any], rec: OAuthRequest) -> Response:
    if path.endswith("/usercode"):
        rec.kind = "device_code"
        device_id = "dev-" + secrets.token_hex(6)
        user_code = "STND-" + secrets.token_hex(2).upper()
        with state._lock:
            state.device[device_id] = {"user_code": user_code, "approved": False}
        return JSONResponse({"device_auth_id": device_id, "user_code": user_code,
                             "interval": "1", "expires_at": "2099-01-01T00:00:00Z"})
    rec.kind = "device_poll"
    device_id = body.get("device_auth_id")
    with state._lock:
        entry = state.device.get(device_id or "")
    if entry is None:
        return _err(404, "not_found")
    if not entry["approved"]:
        return JSONResponse({"error": {"code": "deviceauth_authorization_pending",
                                       "message": "authorization pending"}}, status_code=403)
    code = state.new_code(CODEX)
    verifier = "standin-verifier-" + secrets.token_hex(8)
    return JSONResponse({"authorization_code": code, "code_verifier": verifier,
                         "code_challenge": "standin-challenge"})


# ---------------------------------------------------------------- Google


def _google_token(state: OAuthState, body: dict[str, Any], rec: OAuthRequest) -> Response:
    grant = body.get("grant_type")
    if grant == "authorization_code":
        rec.kind = "login"
        if not state.take_code(body.get("code"), GOOGLE):
            return _err(400, "invalid_grant", "Bad Request")
        access, refresh = state.issue(GOOGLE)
    elif grant == "refresh_token":
        rec.kind = "refresh"
        # Google keeps the refresh token: answer without a new one, as the real endpoint does.
        token = body.get("refresh_token")
        with state._lock:
            iss = state._issuers[GOOGLE]
            if token not in iss.valid_refresh:
                return _err(400, "invalid_grant", "Token has been expired or revoked.")
            iss.generation += 1
            access = f"{GOOGLE}-access-{iss.generation}"
        now = int(time.time())
        return JSONResponse({"access_token": access, "expires_in": state.access_ttl, "token_type": "Bearer",
                             "scope": "openid https://www.googleapis.com/auth/cloud-platform "
                                      "https://www.googleapis.com/auth/userinfo.email "
                                      "https://www.googleapis.com/auth/userinfo.profile",
                             "id_token": fake_jwt({"iss": "https://accounts.google.com", "email": EMAIL,
                                                   "sub": "1000", "iat": now, "exp": now + 3600})})
    else:
        return _err(400, "unsupported_grant_type")
    now = int(time.time())
    return JSONResponse({"access_token": access, "refresh_token": refresh, "expires_in": state.access_ttl,
                         "token_type": "Bearer",
                         "scope": "openid https://www.googleapis.com/auth/cloud-platform "
                                  "https://www.googleapis.com/auth/userinfo.email "
                                  "https://www.googleapis.com/auth/userinfo.profile",
                         "id_token": fake_jwt({"iss": "https://accounts.google.com", "email": EMAIL, "sub": "1000",
                                               "iat": now, "exp": now + 3600})})


# ---------------------------------------------------------------- dispatch


async def dispatch(request: Request) -> Response:
    state: OAuthState = request.app.state.oauth
    host = (request.headers.get("host") or "").split(":")[0].lower()
    path = request.url.path
    body = await _parse(request)
    rec = OAuthRequest(host, request.method, path, request.url.query, dict(request.headers), body)
    try:
        resp = _route(state, host, request.method, path, body if isinstance(body, dict) else {}, rec)
    except Exception as e:  # noqa: BLE001 - a test sees it as a 500 in the log
        resp = JSONResponse({"error": "standin_error", "error_description": repr(e)}, status_code=500)
    rec.status = resp.status_code
    state.record(rec)
    return resp


def _route(state: OAuthState, host: str, method: str, path: str, body: dict[str, Any],
           rec: OAuthRequest) -> Response:
    if method == "POST" and path == "/v1/oauth/token" and host in ("platform.claude.com", "console.anthropic.com",
                                                                   "api.anthropic.com"):
        return _claude_token(state, body, rec)
    if host == "api.anthropic.com" and path == "/api/oauth/profile":
        rec.kind = "profile"
        return JSONResponse(_claude_profile())
    if host == "api.anthropic.com" and path == "/api/oauth/claude_cli/roles":
        rec.kind = "profile"
        return JSONResponse({"organization_role": "admin", "workspace_role": None,
                             "organization_name": "Stand-in Org"})
    if host == "api.anthropic.com" and path == "/api/oauth/claude_cli/create_api_key":
        rec.kind = "token_exchange"
        return JSONResponse({"raw_key": "sk-ant-api03-standin-created-key"})
    if host == "api.anthropic.com" and path == "/v1/mcp_servers":
        rec.kind = "profile"
        return JSONResponse({"data": [], "has_more": False, "first_id": None, "last_id": None})
    if host == "auth.openai.com" and method == "POST" and path == "/oauth/token":
        return _codex_token(state, body, rec)
    if host == "auth.openai.com" and path.startswith("/api/accounts/deviceauth/"):
        return _codex_device(state, path, body, rec)
    if host == "oauth2.googleapis.com" and method == "POST" and path == "/token":
        return _google_token(state, body, rec)
    if host in ("oauth2.googleapis.com", "www.googleapis.com") and path in ("/tokeninfo", "/oauth2/v3/tokeninfo"):
        rec.kind = "profile"
        auth = rec.headers.get("authorization", "")
        token = auth[7:] if auth.lower().startswith("bearer ") else body.get("access_token")
        if not state.access_token_known(GOOGLE, token):
            return _err(400, "invalid_token", "Invalid Value")
        return JSONResponse({"azp": "standin", "aud": "standin", "sub": "1000", "email": EMAIL,
                             "email_verified": "true", "access_type": "offline", "expires_in": state.access_ttl,
                             "exp": str(int(time.time()) + state.access_ttl),
                             "scope": "openid https://www.googleapis.com/auth/cloud-platform "
                                      "https://www.googleapis.com/auth/userinfo.email "
                                      "https://www.googleapis.com/auth/userinfo.profile"})
    if host in ("www.googleapis.com", "openidconnect.googleapis.com") and "userinfo" in path:
        rec.kind = "profile"
        return JSONResponse({"id": "1000", "sub": "1000", "email": EMAIL, "verified_email": True,
                             "email_verified": True, "name": "Stand-in User"})
    return JSONResponse({"error": "not_found", "error_description": f"stand-in has no {method} {host}{path}"},
                        status_code=404)


def create_app(state: OAuthState | None = None) -> Starlette:
    """The OAuth stand-in as an ASGI app; ``app.state.oauth`` is the :class:`OAuthState`."""
    app = Starlette(routes=[Route("/{rest:path}", dispatch, methods=["GET", "POST", "PUT", "PATCH", "DELETE",
                                                                     "HEAD"])])
    app.state.oauth = state or OAuthState()
    return app
