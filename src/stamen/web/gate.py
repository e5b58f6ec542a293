"""Who is calling, and may they: credentials, the API gate, the page gate.

Flower's rules (spec 4.0 and 7.1) with Stamen's additions:

* ``--basic_auth=user:password,...``: the password may be plain text or a bcrypt
  (``$2b$...``) or argon2 (``$argon2id$...``) hash, so no clear password has to sit in a
  config file or in ``ps``. Plain passwords are compared in constant time over every entry;
  a hash is checked only against the entry of the user named, and successful checks are
  remembered (keyed by an HMAC of the credentials) so bcrypt does not run on every request.
* ``--api_tokens=name:token[:role],...``: ``Authorization: Bearer <token>`` for API
  clients. ``token`` may be given as ``sha256:<hex digest>`` instead of the token itself.
* ``--auth`` (OAuth): the signed ``user`` cookie set by ``/login`` (see ``stamen.web.auth``).
* ``/metrics`` is open, as in Flower, unless ``flowerconfig.py`` applies Flower's recipe
  (``Metrics.get = tornado.web.authenticated(Metrics.get)``) and authentication is
  configured: then it takes what the pages take and answers 401 with a challenge (never a
  redirect to the login page, which a scraper cannot follow).

Without any authentication configured the API stays closed unless
``FLOWER_UNAUTHENTICATED_API`` is set, exactly as in Flower, and the pages are open.
The identity is resolved once per request by ``IdentityMiddleware`` (installed by
``stamen.web.auth.install_auth``); the gates here only decide.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import secrets
from functools import lru_cache
from typing import Any
from urllib.parse import quote

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from stamen.web.csrf import csrf_token
from stamen.web.errors import ApiError, plain
from stamen.web.roles import (
    ROLES,
    Identity,
    current_identity,
    require_role,
    role_for,
    set_identity,
)

__all__ = [
    "UNAUTHENTICATED_MESSAGE",
    "AuthResponse",
    "api_gate",
    "basic_credentials",
    "csrf_token",
    "metrics_gate",
    "metrics_protected",
    "page_user",
    "require_role",
    "resolve_identity",
]

log = logging.getLogger(__name__)

UNAUTHENTICATED_MESSAGE = (
    "FLOWER_UNAUTHENTICATED_API environment variable is required to enable API "
    "without authentication"
)
INVALID_TOKEN_MESSAGE = "Invalid API token"
BASIC_CHALLENGE = {"WWW-Authenticate": 'Basic realm="flower"'}

_CACHE_KEY = secrets.token_bytes(32)  # per process: cache keys are useless elsewhere
_VERIFIED: dict[bytes, str] = {}
_VERIFIED_MAX = 1024


class AuthResponse(Exception):
    """Raised by a gate to answer with ``response`` as is (a 302 to the login page, a 401
    with a Basic challenge). ``install_auth`` registers the handler that sends it."""

    def __init__(self, response: Response) -> None:
        super().__init__(response.status_code)
        self.response = response


# --- credentials ----------------------------------------------------------------------


def basic_credentials(request: Request) -> tuple[str, str] | None:
    """The ``(user, password)`` of a Basic ``Authorization`` header, or None."""
    header = request.headers.get("authorization", "")
    scheme, _, encoded = header.strip().partition(" ")
    if scheme.lower() != "basic" or not encoded.strip():
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, sep, password = decoded.partition(":")
    return (user, password) if sep else None


def bearer_token(request: Request) -> str | None:
    """The token of a ``Bearer`` ``Authorization`` header, or None."""
    scheme, _, token = request.headers.get("authorization", "").strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def is_password_hash(secret: str) -> bool:
    """bcrypt (``$2a$``/``$2b$``/``$2y$``) or argon2 (``$argon2i$``/``id$``/``d$``)."""
    return secret.startswith(("$2a$", "$2b$", "$2y$", "$argon2"))


def _verify_hash(password: str, hashed: str) -> bool:
    """Slow by design; callers run it in a thread."""
    try:
        if hashed.startswith("$argon2"):
            from argon2 import PasswordHasher
            from argon2.exceptions import Argon2Error, InvalidHashError

            try:
                return PasswordHasher().verify(hashed, password)
            except (Argon2Error, InvalidHashError):
                return False
        import bcrypt

        return bcrypt.checkpw(password.encode(), hashed.encode())
    except ValueError:  # malformed hash, over-long bcrypt password
        return False


async def check_basic(user: str, password: str, entries: list[str]) -> bool:
    """Whether ``user:password`` matches one of the ``--basic_auth`` entries."""
    offered_user = user.encode()
    offered_password = password.encode()
    plain_match = False
    hashed_for_user: str | None = None
    for entry in entries:
        entry_user, _, secret = entry.partition(":")
        same_user = hmac.compare_digest(offered_user, entry_user.encode())
        if is_password_hash(secret):
            if same_user and hashed_for_user is None:
                hashed_for_user = secret
            continue
        # No early exit: every plain entry costs the same whether or not it matches.
        same_password = hmac.compare_digest(offered_password, secret.encode())
        plain_match |= same_user and same_password
    if plain_match:
        return True
    if hashed_for_user is None:
        decoy = next(
            (e.partition(":")[2] for e in entries if is_password_hash(e.partition(":")[2])), None
        )
        if decoy is not None:
            # An unknown user costs one hash check too, so timing does not tell which
            # user names exist.
            await run_in_threadpool(_verify_hash, password, decoy)
        return False
    key = hmac.new(_CACHE_KEY, offered_user + b"\0" + offered_password, "sha256").digest()
    if _VERIFIED.get(key) == hashed_for_user:
        return True
    if not await run_in_threadpool(_verify_hash, password, hashed_for_user):
        return False
    if len(_VERIFIED) >= _VERIFIED_MAX:
        _VERIFIED.clear()
    _VERIFIED[key] = hashed_for_user
    return True


@lru_cache(maxsize=8)
def parse_api_tokens(entries: tuple[str, ...]) -> tuple[tuple[str, bytes, str | None], ...]:
    """``name:token[:role]`` entries as ``(name, sha256 digest, role)``.

    ``token`` may be ``sha256:<64 hex digits>``. Raises ``ValueError`` for a malformed entry
    (the message never repeats the token).
    """
    parsed = []
    for raw in entries:
        parts = raw.strip().split(":")
        role = None
        if len(parts) >= 3 and parts[-1] in ROLES:
            role = parts.pop()
        name, secret = parts[0], ":".join(parts[1:])
        if not name or not secret:
            raise ValueError("each entry must be of the form name:token[:role]")
        if secret.startswith("sha256:"):
            try:
                digest = bytes.fromhex(secret[len("sha256:") :])
            except ValueError:
                raise ValueError(f"token of {name!r}: sha256: needs a hex digest") from None
            if len(digest) != 32:
                raise ValueError(f"token of {name!r}: a sha256 digest has 64 hex digits")
        else:
            digest = hashlib.sha256(secret.encode()).digest()
        parsed.append((name, digest, role))
    return tuple(parsed)


def check_token(token: str, settings: Any) -> Identity | None:
    """The identity of a bearer ``token`` (constant time over all tokens), or None."""
    offered = hashlib.sha256(token.encode()).digest()
    found: tuple[str, bytes, str | None] | None = None
    for entry in parse_api_tokens(tuple(getattr(settings, "api_tokens", None) or ())):
        if hmac.compare_digest(offered, entry[1]) and found is None:
            found = entry
    if found is None:
        return None
    name, _, role = found
    return Identity(name=name, role=role or role_for(settings, name), method="token")


# --- resolving the identity of a request ----------------------------------------------


def auth_configured(settings: Any) -> bool:
    """Flower's test for "authentication is on": ``--basic_auth`` or ``--auth``."""
    return bool(settings.basic_auth or settings.auth)


async def resolve_identity(request: Request) -> Identity | None:
    """Work out who is calling, without refusing anything; stores and returns it.

    Order: a bearer token; then Basic (when configured); then, with ``--auth``, the login
    cookie (with both configured Flower requires both, and the email names the user).
    Without any authentication configured the caller is anonymous with Flower's rights.
    """
    from stamen.web.auth import session_from_cookie  # auth imports this module

    settings = request.app.state.services.settings
    identity: Identity | None = None
    request.state.auth_error = None
    request.state.needs_login = False
    token = bearer_token(request)
    if token is not None and getattr(settings, "api_tokens", None):
        identity = check_token(token, settings)
        if identity is None:
            request.state.auth_error = INVALID_TOKEN_MESSAGE
    elif not auth_configured(settings):
        identity = Identity(name=None, role=role_for(settings, None), method="anonymous")
    else:
        basic_ok = True
        basic_name: str | None = None
        if settings.basic_auth:
            given = basic_credentials(request)
            basic_ok = given is not None and await check_basic(*given, settings.basic_auth)
            basic_name = given[0] if basic_ok and given else None
        if basic_ok and settings.auth:
            session = session_from_cookie(request, settings)
            if session is not None:
                email, groups = session
                role = role_for(settings, email, groups)
                identity = Identity(name=email, role=role, method="session", groups=groups)
            else:
                request.state.needs_login = True
        elif basic_ok:
            identity = Identity(
                name=basic_name, role=role_for(settings, basic_name), method="basic"
            )
    set_identity(request, identity)
    return identity


async def ensure_identity(request: Request) -> Identity | None:
    """The resolved identity, resolving it now if no middleware did (e.g. a bare router)."""
    if not hasattr(request.state, "auth_error"):
        return await resolve_identity(request)
    return current_identity(request)


def login_url(request: Request) -> str:
    """``<root path>/login?next=<this path and query>`` (the prefix comes from the mount)."""
    root = request.scope.get("root_path", "").rstrip("/")
    path = request.url.path
    if request.url.query:
        path += "?" + request.url.query
    return f"{root}/login?next={quote(path, safe='')}"


# --- the gates --------------------------------------------------------------------------


async def api_gate(request: Request) -> None:
    """Flower's API gate (spec 4.0 steps 2-3), plus bearer tokens. A dependency of every
    ``/api/*`` route; handlers that change state also call ``require_role``."""
    settings = request.app.state.services.settings
    identity = await ensure_identity(request)
    if request.state.auth_error:
        raise ApiError(401, request.state.auth_error)
    if identity is not None and identity.method == "token":
        return
    if not auth_configured(settings):
        if not settings.unauthenticated_api:
            raise ApiError(401, UNAUTHENTICATED_MESSAGE)
        return
    if identity is not None:
        return
    if request.state.needs_login:
        # OAuth mode: a browser without its cookie is sent to log in; other methods 403.
        if request.method in ("GET", "HEAD"):
            raise AuthResponse(RedirectResponse(login_url(request), status_code=302))
        raise ApiError(403)
    raise ApiError(401)


async def page_user(request: Request) -> Identity:
    """Dependency for UI pages: the caller, or the login challenge Flower gives.

    Basic mode: 401 ``Access denied`` with ``WWW-Authenticate: Basic realm="flower"``;
    OAuth mode: 302 to ``<prefix>/login?next=<path>``. Without authentication configured
    pages are open (anonymous identity), as in Flower. A bearer token works for pages too.
    """
    identity = await ensure_identity(request)
    if identity is not None:
        return identity
    if request.state.auth_error:
        raise AuthResponse(plain(401, request.state.auth_error))
    if request.state.needs_login:
        raise AuthResponse(RedirectResponse(login_url(request), status_code=302))
    raise AuthResponse(plain(401, "Access denied", headers=BASIC_CHALLENGE))


def metrics_protected(settings: Any) -> bool:
    """Whether ``/metrics`` requires authentication: the config file asked for it
    (``Settings.protect_metrics``) and there is authentication to require."""
    return bool(getattr(settings, "protect_metrics", False)) and auth_configured(settings)


def metrics_challenge(settings: Any) -> dict[str, str]:
    """``WWW-Authenticate`` for ``/metrics``: the schemes a scraper can use (Basic with
    ``--basic_auth``, Bearer with ``--api_tokens``; Bearer when neither, as nothing else is
    possible without a browser)."""
    schemes = []
    if settings.basic_auth:
        schemes.append('Basic realm="flower"')
    if getattr(settings, "api_tokens", None) or not schemes:
        schemes.append('Bearer realm="flower"')
    return {"WWW-Authenticate": ", ".join(schemes)}


async def metrics_gate(request: Request) -> None:
    """Dependency of ``/metrics``: open unless ``metrics_protected``; then the caller must
    be authenticated as for a page (Basic, a bearer API token or, with ``--auth``, the login
    cookie), any role, else 401 with ``metrics_challenge``."""
    settings = request.app.state.services.settings
    if not metrics_protected(settings):
        return
    identity = await ensure_identity(request)
    if identity is not None:
        return
    message = request.state.auth_error or "Access denied"
    raise AuthResponse(plain(401, message, headers=metrics_challenge(settings)))
