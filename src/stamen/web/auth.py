"""Logging in and out: the session cookie, the OAuth/OIDC providers, ``/login``, ``/logout``.

The session is Flower's: a cookie ``user`` holding the email, signed with
``--cookie_secret`` in Tornado's v2 signed-value format (so a Flower cookie made with the
same secret stays valid after switching), ``HttpOnly``, ``SameSite=Lax``, and ``Secure``
when the request came over TLS (directly or, with ``--xheaders``, through a proxy). OIDC
groups, used for roles, ride in a second signed cookie bound to the same email.

Providers (``--auth_provider``; Flower's dotted names map to the same ones): ``google``,
``github``, ``gitlab`` (``FLOWER_GITLAB_AUTH_ALLOWED_GROUPS``,
``FLOWER_GITLAB_MIN_ACCESS_LEVEL``), ``okta`` (``FLOWER_OAUTH2_OKTA_BASE_URL``) and ``oidc``,
any OpenID Connect provider found through ``--oauth2_issuer`` discovery, with PKCE, nonce
and ID-token signature checks. A custom provider is a dotted path to a subclass of
:class:`OAuthProvider`. The OAuth protocol work is done by Authlib's ``AsyncOAuth2Client``,
ID tokens are verified with ``joserfc``.

Every login carries a random ``state`` kept in a signed ``oauth_state`` cookie and checked
on return; ``next`` is followed only when it is a local path (no open redirect).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import importlib
import json
import logging
import secrets
import time
import warnings
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from html import escape
from typing import Any
from urllib.parse import urlsplit

import authlib.deprecate  # type: ignore[import-untyped]  # noqa: F401  (installs its "always" filter first)
import httpx
from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from stamen.web.csrf import CSRFMiddleware
from stamen.web.errors import plain
from stamen.web.gate import AuthResponse, auth_configured, resolve_identity
from stamen.web.roles import auth_pattern_matches, current_identity

with warnings.catch_warnings():
    # Authlib 1.9 prefers the httpx2 package and warns when it falls back to httpx.
    warnings.simplefilter("ignore")
    from authlib.integrations.httpx_client import (  # type: ignore[import-untyped]
        AsyncOAuth2Client,
        OAuthError,
    )

log = logging.getLogger(__name__)

USER_COOKIE = "user"
GROUPS_COOKIE = "stamen_groups"
STATE_COOKIE = "oauth_state"
SESSION_DAYS = 30  # cookie lifetime; signatures are accepted one day longer, as in Flower
STATE_MAX_AGE = 15 * 60  # seconds a login round trip may take
HTTP_TIMEOUT = 10.0

ACCESS_DENIED = (
    "Access denied. Please use another account or ask your admin to add your email to "
    "flower --auth."
)


# --- Tornado v2 signed values -------------------------------------------------------------


def _field(value: bytes) -> bytes:
    return str(len(value)).encode() + b":" + value


def sign_value(secret: str, name: str, value: str, now: float | None = None) -> str:
    """``value`` signed for cookie ``name`` (Tornado's ``create_signed_value``, version 2)."""
    timestamp = str(int(now if now is not None else time.time())).encode()
    payload = base64.b64encode(value.encode())
    to_sign = b"|".join(
        [b"2", _field(b"0"), _field(timestamp), _field(name.encode()), _field(payload), b""]
    )
    signature = hmac.new(secret.encode(), to_sign, hashlib.sha256).hexdigest().encode()
    return (to_sign + signature).decode()


def unsign_value(secret: str, name: str, signed: str, max_age: float) -> str | None:
    """The value of a v2 signed cookie, or None if forged, for another name or too old."""
    try:
        data = signed.encode()
        if not data.startswith(b"2|"):
            return None
        rest = data[2:]
        fields: list[bytes] = []
        for _ in range(4):
            length, _, rest = rest.partition(b":")
            size = int(length)
            fields.append(rest[:size])
            if rest[size : size + 1] != b"|":
                return None
            rest = rest[size + 1 :]
        signature = rest
        to_sign = data[: len(data) - len(signature)]
        expected = hmac.new(secret.encode(), to_sign, hashlib.sha256).hexdigest().encode()
        if not hmac.compare_digest(signature, expected):
            return None
        _key_version, timestamp, cookie_name, payload = fields
        if cookie_name != name.encode() or int(timestamp) < time.time() - max_age:
            return None
        return base64.b64decode(payload, validate=True).decode()
    except (ValueError, UnicodeDecodeError):
        return None


# --- the session ----------------------------------------------------------------------------


def _is_https(request: Request) -> bool:
    return request.url.scheme == "https"


def _set_cookie(response: Response, request: Request, name: str, value: str, max_age: int) -> None:
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        path="/",
        httponly=True,
        samesite="lax",
        secure=_is_https(request),
    )


def _clear_cookie(response: Response, request: Request, name: str) -> None:
    response.delete_cookie(name, path="/", httponly=True, samesite="lax", secure=_is_https(request))


def start_session(
    response: Response, request: Request, email: str, groups: tuple[str, ...] = ()
) -> None:
    """Log ``email`` in: the signed ``user`` cookie (plus groups, bound to the email)."""
    secret = request.app.state.services.settings.cookie_secret
    age = SESSION_DAYS * 86400
    _set_cookie(response, request, USER_COOKIE, sign_value(secret, USER_COOKIE, email), age)
    if groups:
        value = json.dumps([email, list(groups)])
        _set_cookie(response, request, GROUPS_COOKIE, sign_value(secret, GROUPS_COOKIE, value), age)
    else:
        _clear_cookie(response, request, GROUPS_COOKIE)


def session_from_cookie(request: Request, settings: Any) -> tuple[str, tuple[str, ...]] | None:
    """``(email, groups)`` of a valid login cookie still accepted by ``--auth``, or None.

    The ``--auth`` pattern is checked again on every request (Flower 2.2 does too), so
    narrowing it locks out existing sessions.
    """
    signed = request.cookies.get(USER_COOKIE)
    if not signed:
        return None
    max_age = (SESSION_DAYS + 1) * 86400
    email = unsign_value(settings.cookie_secret, USER_COOKIE, signed, max_age)
    if not email or not auth_pattern_matches(settings.auth, email):
        return None
    groups: tuple[str, ...] = ()
    signed_groups = request.cookies.get(GROUPS_COOKIE)
    if signed_groups:
        raw = unsign_value(settings.cookie_secret, GROUPS_COOKIE, signed_groups, max_age)
        try:
            owner, names = json.loads(raw) if raw else (None, [])
        except (ValueError, TypeError):
            owner, names = None, []
        if owner == email:
            groups = tuple(str(n) for n in names)
    return email, groups


def safe_next(value: str | None, url_prefix: str) -> str:
    """Where to go after login: ``value`` if it is a path on this site, else the home page.

    Refuses anything a browser could read as another site: a scheme or host,
    ``//host``, ``/\\host``, backslashes and control characters (browsers drop tabs and
    newlines, so ``/\\t/evil`` would become ``//evil``).
    """
    home = f"/{url_prefix}/" if url_prefix else "/"
    if not value:
        return home
    if url_prefix and not value.startswith("/"):
        value = "/" + value
    if not value.startswith("/") or value.startswith("//") or "\\" in value:
        return home
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value):
        return home
    parts = urlsplit(value)
    if parts.scheme or parts.netloc:
        return home
    return value


# --- providers ------------------------------------------------------------------------------


class AuthError(Exception):
    """The OAuth exchange failed (shown as ``<message>. Please try logging in again.``)."""


class AccessDenied(Exception):
    """The provider vouched for someone who may not use Stamen (shown as is, 403)."""


@dataclass
class LoginResult:
    """Who the provider says logged in."""

    email: str
    groups: tuple[str, ...] = ()


@dataclass
class LoginAttempt:
    """Values that must survive the round trip to the provider (kept in ``oauth_state``)."""

    state: str
    next: str | None = None
    code_verifier: str | None = None
    nonce: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class OAuthProvider:
    """An OAuth2 login. Subclass it for a custom provider (``--auth_provider=pkg.mod.Cls``)
    and implement :meth:`identify`; set the endpoint attributes or override
    :meth:`prepare` to discover them.
    """

    title = "OAuth"
    scope = ""
    authorize_url = ""
    token_url = ""
    use_pkce = False
    use_nonce = False
    authorize_params: dict[str, str] = {}

    def __init__(self, settings: Any) -> None:
        self.settings = settings

    async def prepare(self) -> None:
        """Called before each use; a chance to fetch discovery documents (cached)."""

    def client(self, redirect_uri: str) -> AsyncOAuth2Client:
        return AsyncOAuth2Client(
            client_id=self.settings.oauth2_key,
            client_secret=self.settings.oauth2_secret,
            scope=self.scope or None,
            redirect_uri=redirect_uri,
            code_challenge_method="S256" if self.use_pkce else None,
            timeout=HTTP_TIMEOUT,
        )

    async def authorization_url(self, redirect_uri: str, attempt: LoginAttempt) -> str:
        """The provider URL the browser is sent to."""
        await self.prepare()
        params = dict(self.authorize_params)
        if self.use_nonce and attempt.nonce:
            params["nonce"] = attempt.nonce
        async with self.client(redirect_uri) as client:
            url, _ = client.create_authorization_url(
                self.authorize_url,
                state=attempt.state,
                code_verifier=attempt.code_verifier if self.use_pkce else None,
                **params,
            )
        return str(url)

    async def complete(self, code: str, redirect_uri: str, attempt: LoginAttempt) -> LoginResult:
        """Exchange ``code`` for a token, then ask who it belongs to."""
        await self.prepare()
        async with self.client(redirect_uri) as client:
            try:
                kwargs: dict[str, Any] = {"code": code}
                if self.use_pkce and attempt.code_verifier:
                    kwargs["code_verifier"] = attempt.code_verifier
                token = await client.fetch_token(self.token_url, **kwargs)
            except OAuthError as exc:
                raise AuthError(f"OAuth authenticator error: {exc.error}") from None
            return await self.identify(client, dict(token), attempt)

    async def identify(
        self, client: AsyncOAuth2Client, token: dict[str, Any], attempt: LoginAttempt
    ) -> LoginResult:
        """Who ``token`` belongs to; raise ``AccessDenied`` for someone not allowed."""
        raise NotImplementedError

    def allowed(self, email: str) -> bool:
        return auth_pattern_matches(self.settings.auth, email)


async def _json(client: AsyncOAuth2Client, url: str, **kwargs: Any) -> Any:
    response = await client.get(url, **kwargs)
    response.raise_for_status()
    return response.json()


class GoogleProvider(OAuthProvider):
    title = "Google"
    scope = "openid profile email"
    authorize_url = "https://accounts.google.com/o/oauth2/v2/auth"
    token_url = "https://www.googleapis.com/oauth2/v4/token"
    userinfo_url = "https://www.googleapis.com/userinfo/v2/me"

    async def identify(
        self, client: Any, token: dict[str, Any], attempt: LoginAttempt
    ) -> LoginResult:
        try:
            info = await _json(client, self.userinfo_url)
        except httpx.HTTPError as exc:
            raise AccessDenied(f"Google auth failed: {exc}") from None
        email = str(info.get("email") or "")
        if not email:
            raise AccessDenied("Google auth failed")
        if not self.allowed(email):
            raise AccessDenied(
                f"Access denied to '{email}'. Please use another account or ask your admin "
                "to add your email to flower --auth."
            )
        return LoginResult(email)


class GitHubProvider(OAuthProvider):
    title = "GitHub"
    scope = "user:email"

    def __init__(self, settings: Any) -> None:
        super().__init__(settings)
        domain = settings.github_oauth_domain or "github.com"
        self.authorize_url = f"https://{domain}/login/oauth/authorize"
        self.token_url = f"https://{domain}/login/oauth/access_token"
        self.emails_url = (
            "https://api.github.com/user/emails"
            if domain == "github.com"
            else f"https://{domain}/api/v3/user/emails"
        )

    async def identify(
        self, client: Any, token: dict[str, Any], attempt: LoginAttempt
    ) -> LoginResult:
        try:
            emails = await _json(client, self.emails_url, headers={"Accept": "application/json"})
        except (httpx.HTTPError, ValueError):
            raise AccessDenied(
                "Failed to fetch user emails from GitHub. Make sure the GitHub OAuth app has "
                "permission to read email addresses (Account permissions > Email addresses > "
                "Read-only)."
            ) from None
        chosen = [
            str(e.get("email"))
            for e in emails
            if isinstance(e, dict) and e.get("verified") and self.allowed(str(e.get("email")))
        ]
        if not chosen:
            raise AccessDenied(ACCESS_DENIED)
        return LoginResult(chosen[-1].lower())


class GitLabProvider(OAuthProvider):
    title = "GitLab"
    scope = "read_api"

    def __init__(self, settings: Any) -> None:
        super().__init__(settings)
        base = f"https://{settings.gitlab_oauth_domain or 'gitlab.com'}"
        self.authorize_url = f"{base}/oauth/authorize"
        self.token_url = f"{base}/oauth/token"
        self.user_url = f"{base}/api/v4/user"
        self.groups_url = f"{base}/api/v4/groups"

    async def identify(
        self, client: Any, token: dict[str, Any], attempt: LoginAttempt
    ) -> LoginResult:
        denied = "Access denied. Please use another account or contact your admin."
        try:
            user = await _json(client, self.user_url)
        except (httpx.HTTPError, ValueError) as exc:
            raise AccessDenied(f"GitLab auth failed: {exc}") from None
        email = str(user.get("email") or "")
        if not self.allowed(email):
            raise AccessDenied(denied)
        allowed_groups = self.settings.gitlab_auth_allowed_groups
        groups: tuple[str, ...] = ()
        if allowed_groups:
            level = self.settings.gitlab_min_access_level
            try:
                found = await _json(client, self.groups_url, params={"min_access_level": level})
            except (httpx.HTTPError, ValueError) as exc:
                raise AccessDenied(f"GitLab auth failed: {exc}") from None
            groups = tuple(str(g.get("full_path")) for g in found if isinstance(g, dict))
            if not set(groups) & set(allowed_groups):
                raise AccessDenied(denied)
        return LoginResult(email, groups)


class OktaProvider(OAuthProvider):
    title = "Okta"
    scope = "openid email"

    def __init__(self, settings: Any) -> None:
        super().__init__(settings)
        base = (settings.okta_base_url or "").rstrip("/")
        self.authorize_url = f"{base}/v1/authorize"
        self.token_url = f"{base}/v1/token"
        self.userinfo_url = f"{base}/v1/userinfo"

    async def identify(
        self, client: Any, token: dict[str, Any], attempt: LoginAttempt
    ) -> LoginResult:
        try:
            info = await _json(client, self.userinfo_url)
        except (httpx.HTTPError, ValueError) as exc:
            raise AuthError(f"OAuth authenticator error: {exc}") from None
        email = str(info.get("email") or "").strip()
        if not info.get("email_verified") or not self.allowed(email):
            raise AccessDenied(ACCESS_DENIED)
        return LoginResult(email, _groups(info))


def _groups(claims: dict[str, Any], claim: str = "groups") -> tuple[str, ...]:
    value = claims.get(claim)
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list):
        return tuple(str(v) for v in value)
    return ()


class OIDCProvider(OAuthProvider):
    """Any OpenID Connect provider: endpoints from ``--oauth2_issuer`` discovery, PKCE,
    a nonce, a verified ID token (signature from the JWKS, issuer, audience, expiry,
    nonce). The email must not be marked unverified; groups come from the ``groups``
    claim of the ID token or the userinfo answer."""

    title = "OpenID Connect"
    scope = "openid email profile"
    use_pkce = True
    use_nonce = True
    groups_claim = "groups"

    def __init__(self, settings: Any) -> None:
        super().__init__(settings)
        issuer = (settings.oauth2_issuer or "").rstrip("/")
        suffix = "/.well-known/openid-configuration"
        self.discovery_url = issuer if issuer.endswith(suffix) else issuer + suffix
        self.issuer = ""
        self.userinfo_url: str | None = None
        self.jwks: dict[str, Any] | None = None
        self._discovered_at = 0.0

    async def prepare(self) -> None:
        if self.jwks is not None and time.monotonic() - self._discovered_at < 3600:
            return
        async with httpx.AsyncClient(timeout=HTTP_TIMEOUT) as http:
            meta = (await http.get(self.discovery_url)).raise_for_status().json()
            jwks = (await http.get(meta["jwks_uri"])).raise_for_status().json()
        self.issuer = meta["issuer"]
        self.authorize_url = meta["authorization_endpoint"]
        self.token_url = meta["token_endpoint"]
        self.userinfo_url = meta.get("userinfo_endpoint")
        self.jwks = jwks
        self._discovered_at = time.monotonic()

    def _id_claims(self, id_token: str, nonce: str | None) -> dict[str, Any]:
        from joserfc import jwt
        from joserfc.errors import JoseError
        from joserfc.jwk import KeySet

        try:
            keys = KeySet.import_key_set(self.jwks or {"keys": []})  # type: ignore[arg-type]
            decoded = jwt.decode(id_token, keys)
            claims = dict(decoded.claims)
            jwt.JWTClaimsRegistry(
                iss={"essential": True, "value": self.issuer},
                aud={"essential": True, "value": self.settings.oauth2_key},
                exp={"essential": True},
                nonce={"essential": True, "value": nonce or ""},
            ).validate(claims)
        except (JoseError, ValueError) as exc:
            raise AuthError(f"OAuth authenticator error: invalid ID token ({exc})") from None
        return claims

    async def identify(
        self, client: Any, token: dict[str, Any], attempt: LoginAttempt
    ) -> LoginResult:
        id_token = token.get("id_token")
        if not id_token:
            raise AuthError("OAuth authenticator error: no ID token")
        try:
            claims = self._id_claims(str(id_token), attempt.nonce)
        except AuthError:
            if time.monotonic() - self._discovered_at < 60:
                raise
            # The provider may have rotated its keys since we fetched them: once more.
            self.jwks = None
            await self.prepare()
            claims = self._id_claims(str(id_token), attempt.nonce)
        if self.userinfo_url and ("email" not in claims or self.groups_claim not in claims):
            try:
                info = await _json(client, self.userinfo_url)
            except (httpx.HTTPError, ValueError):
                info = {}
            if info.get("sub") == claims.get("sub"):  # OIDC core 5.3.2
                claims = {**info, **claims}
        email = str(claims.get("email") or "").strip()
        if not email or claims.get("email_verified") is False or not self.allowed(email):
            raise AccessDenied(ACCESS_DENIED)
        return LoginResult(email, _groups(claims, self.groups_claim))


BUILTIN_PROVIDERS: dict[str, type[OAuthProvider]] = {
    "google": GoogleProvider,
    "github": GitHubProvider,
    "gitlab": GitLabProvider,
    "okta": OktaProvider,
    "oidc": OIDCProvider,
}


def load_provider(settings: Any) -> OAuthProvider | None:
    """The provider ``--auth_provider`` names, or None when none is set.

    Raises ``ValueError`` for a name that is neither built in nor importable as a
    ``OAuthProvider`` subclass (or as one of Flower's handler names, via the compat shim).
    """
    from stamen.config import resolve_auth_provider

    name = resolve_auth_provider(settings.auth_provider or "")
    if not name:
        return None
    if name in BUILTIN_PROVIDERS:
        return BUILTIN_PROVIDERS[name](settings)
    module_name, _, attr = name.replace(":", ".").rpartition(".")
    try:
        target = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ValueError(f"cannot import auth provider {name!r}: {exc}") from None
    builtin = getattr(target, "stamen_provider", None)
    if builtin in BUILTIN_PROVIDERS:
        return BUILTIN_PROVIDERS[builtin](settings)
    if isinstance(target, type) and issubclass(target, OAuthProvider):
        return target(settings)
    raise ValueError(
        f"auth provider {name!r} is not supported: Stamen runs no Tornado handlers; "
        "subclass stamen.web.auth.OAuthProvider instead"
    )


def provider_of(app: Any) -> OAuthProvider | None:
    """The app's provider (built once; tests may replace ``app.state.auth_provider``)."""
    if not hasattr(app.state, "auth_provider"):
        app.state.auth_provider = load_provider(app.state.services.settings)
    return app.state.auth_provider  # type: ignore[no-any-return]


# --- pages ---------------------------------------------------------------------------------


def page_error(request: Request, status: int, message: str) -> Response:
    """An error page; the pages module may install ``app.state.render_page_error``."""
    renderer = getattr(request.app.state, "render_page_error", None)
    if renderer is not None:
        return renderer(request, status, message)  # type: ignore[no-any-return]
    return plain(status, message)


def _logout_page(request: Request) -> Response:
    renderer = getattr(request.app.state, "render_logout", None)
    if renderer is not None:
        return renderer(request)  # type: ignore[no-any-return]
    home = escape(request.scope.get("root_path", "").rstrip("/") + "/")
    return HTMLResponse(
        "<!DOCTYPE html><html><head><title>Logged out · Flower</title></head><body>"
        "<h1>You have been logged out</h1><p>Your Flower session has ended.</p>"
        f'<p><a href="{home}">Log in again</a></p></body></html>'
    )


def _redirect_uri(request: Request) -> str:
    configured = request.app.state.services.settings.oauth2_redirect_uri
    if configured:
        return str(configured)
    # request.base_url leaves out a Mount's root path (the --url_prefix): build it here.
    root = request.scope.get("root_path", "").rstrip("/")
    return str(request.url.replace(path=f"{root}/login", query="", fragment=""))


async def login(request: Request) -> Response:
    """``/login``: without ``code`` send the browser to the provider; with it, finish."""
    settings = request.app.state.services.settings
    try:
        provider = provider_of(request.app)
    except ValueError as exc:
        log.error("%s", exc)
        return page_error(request, 500, "The configured auth provider cannot be used")
    if provider is None:
        return page_error(request, 404, "Error, page not found")
    if not settings.auth:
        return page_error(request, 500, "OAuth login needs --auth (the emails to let in)")
    args = dict(request.query_params)
    if request.method == "POST":
        form = await request.form()
        args.update({k: v for k, v in form.items() if isinstance(v, str)})
    redirect_uri = _redirect_uri(request)
    try:
        if not args.get("code"):
            if args.get("error"):
                raise AuthError(f"{provider.title} auth failed: {args['error']}")
            return await _start_login(request, provider, redirect_uri, args.get("next"))
        return await _finish_login(request, provider, redirect_uri, args)
    except AuthError as exc:
        log.warning("Login failed: %s", exc)
        response = page_error(request, 403, f"{exc}. Please try logging in again.")
    except AccessDenied as exc:
        log.warning("Login refused: %s", exc)
        response = page_error(request, 403, str(exc))
    except (httpx.HTTPError, KeyError, ValueError) as exc:
        log.warning("Login failed, provider unreachable or confused: %r", exc)
        response = page_error(request, 500, "OAuth authentication failed")
    _clear_cookie(response, request, STATE_COOKIE)
    return response


async def _start_login(
    request: Request, provider: OAuthProvider, redirect_uri: str, next_url: str | None
) -> Response:
    attempt = LoginAttempt(
        state=secrets.token_urlsafe(32),
        next=next_url,
        code_verifier=secrets.token_urlsafe(48) if provider.use_pkce else None,
        nonce=secrets.token_urlsafe(24) if provider.use_nonce else None,
    )
    url = await provider.authorization_url(redirect_uri, attempt)
    response = RedirectResponse(url, status_code=302)
    secret = request.app.state.services.settings.cookie_secret
    value = sign_value(secret, STATE_COOKIE, json.dumps(attempt.__dict__))
    _set_cookie(response, request, STATE_COOKIE, value, STATE_MAX_AGE)
    return response


async def _finish_login(
    request: Request, provider: OAuthProvider, redirect_uri: str, args: dict[str, str]
) -> Response:
    settings = request.app.state.services.settings
    raw = unsign_value(
        settings.cookie_secret, STATE_COOKIE, request.cookies.get(STATE_COOKIE, ""), STATE_MAX_AGE
    )
    try:
        attempt = LoginAttempt(**json.loads(raw)) if raw else None
    except (TypeError, ValueError):
        attempt = None
    offered = args.get("state", "")
    if attempt is None or not hmac.compare_digest(offered.encode(), attempt.state.encode()):
        raise AuthError("OAuth authenticator error: State tokens do not match")
    result = await provider.complete(args["code"], redirect_uri, attempt)
    response = RedirectResponse(
        safe_next(attempt.next or args.get("next"), settings.url_prefix), 302
    )
    start_session(response, request, result.email, result.groups)
    _clear_cookie(response, request, STATE_COOKIE)
    log.info("Logged in: %s", result.email)
    return response


async def logout(request: Request) -> Response:
    """``/logout``: forget the session (needs none) and say so."""
    response = _logout_page(request)
    for name in (USER_COOKIE, GROUPS_COOKIE):
        _clear_cookie(response, request, name)
    return response


# --- wiring -----------------------------------------------------------------------------


Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Any, Any], Awaitable[None]]


class IdentityMiddleware:
    """Resolves the caller once per request into ``request.state`` (never refuses)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            path = scope["path"]
            root = scope.get("root_path", "")
            if root and path.startswith(root):
                path = path[len(root) :]
            # Open endpoints need no identity; skipping them keeps bcrypt off the hot path.
            if not path.startswith(_OPEN_PATHS):
                await resolve_identity(Request(scope))
        await self.app(scope, receive, send)


_OPEN_PATHS = ("/static/", "/metrics", "/healthcheck")


class ForwardedMiddleware:
    """``--xheaders``: client address and scheme from the proxy in front, Tornado's way.

    ``X-Real-Ip`` (else the last ``X-Forwarded-For`` hop) and ``X-Scheme`` (else
    ``X-Forwarded-Proto``). Like Flower it trusts whoever connects, so only enable it when
    Stamen is reachable through the proxy alone.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket"):
            headers = {
                k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]
            }
            ip = headers.get("x-real-ip") or headers.get("x-forwarded-for", "").split(",")[-1]
            ip = ip.strip()
            if ip and _valid_ip(ip):
                port = scope["client"][1] if scope.get("client") else 0
                scope["client"] = (ip, port)
            proto = headers.get("x-scheme") or headers.get("x-forwarded-proto", "")
            proto = proto.split(",")[-1].strip().lower()
            if proto in ("http", "https"):
                scope["scheme"] = (
                    proto if scope["type"] == "http" else {"http": "ws", "https": "wss"}[proto]
                )
        await self.app(scope, receive, send)


def _valid_ip(text: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


async def _auth_response(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, AuthResponse)
    return exc.response


def install_auth(app: FastAPI) -> None:
    """Add login/logout, the identity and CSRF middlewares and the gate's responses.

    Call once from ``create_app`` after the routers are included.
    """
    settings = app.state.services.settings
    app.add_exception_handler(AuthResponse, _auth_response)
    for path in ("/login", "/login/"):
        app.add_api_route(path, login, methods=["GET", "POST"], include_in_schema=False)
    app.add_api_route("/logout", logout, methods=["GET", "POST"], include_in_schema=False)
    # Added last runs first: forwarded headers, then CSRF (before auth, as in Flower),
    # then the identity.
    app.add_middleware(IdentityMiddleware)
    app.add_middleware(CSRFMiddleware, settings=settings)
    if settings.xheaders:
        app.add_middleware(ForwardedMiddleware)
    if auth_configured(settings) or getattr(settings, "api_tokens", None):
        if settings.sources.get("cookie_secret", "default") == "default":
            log.warning(
                "No --cookie_secret given: using a random one, so sessions and XSRF tokens "
                "end when Stamen restarts and are not shared between instances"
            )
        try:
            provider = provider_of(app)
        except ValueError as exc:
            log.error("%s", exc)
        else:
            if provider is not None and not (settings.oauth2_key and settings.oauth2_secret):
                log.warning("--auth_provider is set but --oauth2_key/--oauth2_secret are not")
            if isinstance(provider, OIDCProvider) and not settings.oauth2_issuer:
                log.error("--auth_provider=oidc needs --oauth2_issuer (the issuer URL)")
            if provider is not None and not settings.auth:
                log.error("--auth_provider is set but --auth is not: nobody can log in")


__all__ = [
    "AccessDenied",
    "AuthError",
    "LoginResult",
    "OAuthProvider",
    "current_identity",
    "install_auth",
    "safe_next",
    "session_from_cookie",
    "sign_value",
    "unsign_value",
]
