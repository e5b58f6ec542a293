"""Who may use the API: Flower's gate, checked before every ``/api/*`` handler.

Without any authentication configured the API stays closed unless
``FLOWER_UNAUTHENTICATED_API`` is set, exactly as in Flower. With ``--basic_auth`` a
request must carry one of the configured user/password pairs, compared in constant time.
"""

from __future__ import annotations

import base64
import binascii
import hmac

from starlette.requests import Request

from stamen.web.errors import ApiError

UNAUTHENTICATED_MESSAGE = (
    "FLOWER_UNAUTHENTICATED_API environment variable is required to enable API "
    "without authentication"
)


def basic_credentials(request: Request) -> tuple[str, str] | None:
    header = request.headers.get("authorization", "")
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic" or not encoded:
        return None
    try:
        decoded = base64.b64decode(encoded, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, sep, password = decoded.partition(":")
    return (user, password) if sep else None


def basic_user(request: Request, entries: list[str]) -> str | None:
    """The user name when the request's Basic credentials match an entry, else None."""
    given = basic_credentials(request)
    if given is None:
        return None
    offered = f"{given[0]}:{given[1]}".encode()
    matched = None
    for entry in entries:
        if hmac.compare_digest(offered, entry.encode()):
            matched = given[0]
    return matched


async def api_gate(request: Request) -> None:
    settings = request.app.state.services.settings
    if not settings.basic_auth and not settings.auth:
        if not settings.unauthenticated_api:
            raise ApiError(401, UNAUTHENTICATED_MESSAGE)
        return
    if settings.basic_auth and basic_user(request, settings.basic_auth) is not None:
        return
    raise ApiError(401)
