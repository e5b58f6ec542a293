"""Cross-site request protection for every state-changing request (Flower 2.2, spec 7.5).

For every method other than GET, HEAD and OPTIONS, before authentication:

1. no authentication configured (no ``--basic_auth``, ``--auth``) -> nothing to protect
   (no browser credential could be abused), skip;
2. ``Sec-Fetch-Site`` present and not ``same-origin`` -> 403 ``Cross-site request
   forbidden``;
3. otherwise an ``Origin`` whose host:port differs from ``Host`` -> 403 ``Cross-origin
   request forbidden``;
4. Basic-only mode -> pass: API clients (curl, scripts) send no token;
5. any ``Authorization`` header (Basic or a bearer API token) -> pass: browsers never add
   one to a forged cross-site request on their own;
6. otherwise the double-submit token: the ``_xsrf`` form field (or query argument) or the
   ``X-XSRFToken`` / ``X-CSRFToken`` header must match the ``_xsrf`` cookie.

Tokens use Tornado's masked format (``2|mask|masked token|timestamp``), so the value put
in a page changes on every render (no BREACH oracle) and a Flower ``_xsrf`` cookie keeps
working. Templates get the value from :func:`csrf_token`; the middleware then sets the
cookie (readable by JS, which sends it back as ``X-XSRFToken``).
"""

from __future__ import annotations

import binascii
import hmac
import os
import time
from collections.abc import Awaitable, Callable, MutableMapping
from http.cookies import SimpleCookie
from typing import Any
from urllib.parse import parse_qs, urlsplit

from starlette.datastructures import MutableHeaders
from starlette.requests import Request
from starlette.responses import Response

from stamen.web.errors import plain

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

COOKIE = "_xsrf"
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_SCOPE_KEY = "stamen.xsrf_token"  # raw token chosen for this request's cookie
_MAX_FORM_BODY = 1 << 20  # bigger form bodies are not searched for the field
CORS_HEADERS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Headers": (
        "x-requested-with,access-control-allow-origin,authorization,content-type"
    ),
    # Flower sends a leading space; h11 refuses one and every client strips it anyway.
    "Access-Control-Allow-Methods": "PUT, DELETE, OPTIONS, POST, GET, PATCH",
}


def _mask(token: bytes) -> str:
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(token))
    mask_hex, masked_hex = binascii.hexlify(mask).decode(), binascii.hexlify(masked).decode()
    return f"2|{mask_hex}|{masked_hex}|{int(time.time())}"


def decode_token(value: str) -> bytes | None:
    """The raw token of a masked (``2|...``) or legacy (plain hex) token, or None."""
    try:
        if value.startswith("2|"):
            _, mask_hex, masked_hex, _ts = value.split("|")
            mask = binascii.unhexlify(mask_hex)
            masked = binascii.unhexlify(masked_hex)
            if not mask:
                return None
            return bytes(b ^ mask[i % len(mask)] for i, b in enumerate(masked))
        raw = binascii.unhexlify(value)
        return raw or None
    except (ValueError, binascii.Error):
        return None


def _cookie_token(request: Request) -> bytes | None:
    value = request.cookies.get(COOKIE)
    return decode_token(value) if value else None


def csrf_token(request: Request) -> str:
    """The token to embed in a page (``<input name="_xsrf">`` or a meta tag).

    Reuses the raw token of the request's ``_xsrf`` cookie, or picks a new one which the
    middleware sets as the cookie on this response.
    """
    raw = request.scope.get(_SCOPE_KEY) or _cookie_token(request)
    if raw is None:
        raw = os.urandom(16)
    request.scope[_SCOPE_KEY] = raw
    return _mask(raw)


def _same_origin(origin: str, host: str) -> bool:
    try:
        netloc = urlsplit(origin).netloc
    except ValueError:
        return False
    return bool(netloc) and netloc.lower() == host.strip().lower()


def _form_token(body: bytes, content_type: str) -> str | None:
    if content_type.startswith("application/x-www-form-urlencoded"):
        values = parse_qs(body.decode("latin-1"), keep_blank_values=True).get(COOKIE)
        return values[-1].strip() if values else None
    return None


async def _multipart_token(scope: Scope, body: bytes) -> str | None:
    async def receive() -> Message:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(scope, receive).form()
    except Exception:  # malformed multipart: no token, the check fails normally
        return None
    value = form.get(COOKIE)
    return value.strip() if isinstance(value, str) else None


def _relative_path(request: Request) -> str:
    """The path below ``--url_prefix`` (the mount's root path)."""
    root = request.scope.get("root_path", "")
    path = request.url.path
    return path[len(root) :] if root and path.startswith(root) else path


def _refuse(request: Request, message: str) -> Any:
    """403 as plain text for the API, as the error page for UI paths (Flower's split)."""
    path = _relative_path(request)
    app = request.scope.get("app")
    renderer = getattr(getattr(app, "state", None), "render_page_error", None)
    if renderer is not None and not path.startswith("/api/"):
        try:
            return renderer(request, 403, message)
        except Exception:  # an error page must never turn a refusal into a 500
            pass
    return plain(403, message)


class CSRFMiddleware:
    """ASGI middleware applying the rules above; sets the ``_xsrf`` cookie when asked."""

    def __init__(self, app: Any, settings: Any) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        open_api = self._cors_open()
        if scope["method"] == "OPTIONS":
            await self._preflight(request, open_api)(scope, receive, send)
            return
        if scope["method"] not in _SAFE_METHODS:
            refusal, receive = await self._check(request, scope, receive)
            if refusal is not None:
                await _refuse(request, refusal)(scope, receive, send)
                return

        cors = open_api and not _relative_path(request).startswith("/static/")

        async def send_with_cookie(message: Message) -> None:
            raw = scope.get(_SCOPE_KEY)
            if message["type"] == "http.response.start" and cors:
                headers = MutableHeaders(scope=message)
                for name, value in CORS_HEADERS.items():
                    headers[name] = value
            if message["type"] == "http.response.start" and raw is not None:
                cookie: SimpleCookie = SimpleCookie()
                cookie[COOKIE] = _mask(raw)
                cookie[COOKIE]["path"] = "/"
                cookie[COOKIE]["max-age"] = 30 * 86400
                cookie[COOKIE]["samesite"] = "Lax"
                if request.url.scheme == "https":
                    cookie[COOKIE]["secure"] = True
                headers = MutableHeaders(scope=message)
                headers.append("set-cookie", cookie.output(header="").strip())
            await send(message)

        await self.app(scope, receive, send_with_cookie)

    def _cors_open(self) -> bool:
        """Flower 2.2 sends CORS headers only with no authentication at all *and*
        ``FLOWER_UNAUTHENTICATED_API`` set (spec 2.3): the API is open anyway then."""
        s = self.settings
        return not (s.basic_auth or s.auth) and bool(s.unauthenticated_api)

    def _preflight(self, request: Request, open_api: bool) -> Any:
        """Every Flower handler answers OPTIONS with 204; the API gate's 401 comes first."""
        s = self.settings
        api = _relative_path(request).startswith("/api/")
        if api and not (s.basic_auth or s.auth or s.unauthenticated_api):
            from stamen.web.gate import UNAUTHENTICATED_MESSAGE

            return plain(401, UNAUTHENTICATED_MESSAGE)
        return Response(status_code=204, headers=CORS_HEADERS if open_api else None)

    async def _check(
        self, request: Request, scope: Scope, receive: Receive
    ) -> tuple[str | None, Receive]:
        settings = self.settings
        if not (settings.basic_auth or settings.auth):
            return None, receive
        fetch_site = request.headers.get("sec-fetch-site")
        if fetch_site is not None:
            if fetch_site.strip().lower() != "same-origin":
                return "Cross-site request forbidden", receive
        else:
            origin = request.headers.get("origin")
            if origin is not None and not _same_origin(origin, request.headers.get("host", "")):
                return "Cross-origin request forbidden", receive
        if not settings.auth:
            return None, receive
        if "authorization" in request.headers:
            return None, receive
        offered = (
            request.headers.get("x-xsrftoken")
            or request.headers.get("x-csrftoken")
            or request.query_params.get(COOKIE)
        )
        if not offered:
            offered, receive = await self._token_from_body(request, scope, receive)
        if not offered:
            return f"'{COOKIE}' argument missing from POST", receive
        token = decode_token(offered)
        if token is None:
            return f"'{COOKIE}' argument has invalid format", receive
        expected = _cookie_token(request)
        if expected is None or not hmac.compare_digest(token, expected):
            return "XSRF cookie does not match POST argument", receive
        return None, receive

    async def _token_from_body(
        self, request: Request, scope: Scope, receive: Receive
    ) -> tuple[str | None, Receive]:
        """Read a form body for ``_xsrf``, then hand the same body on to the app."""
        content_type = request.headers.get("content-type", "")
        if not content_type.startswith(
            ("application/x-www-form-urlencoded", "multipart/form-data")
        ):
            return None, receive
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
        body = b"".join(chunks)
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        if size > _MAX_FORM_BODY:
            return None, replay
        if content_type.startswith("multipart/form-data"):
            return await _multipart_token(scope, body), replay
        return _form_token(body, content_type), replay
