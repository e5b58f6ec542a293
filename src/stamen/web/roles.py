"""Who may change what: three roles, how users get one, and the check handlers call.

Roles, weakest first:

* ``viewer`` sees every page and every read endpoint and changes nothing;
* ``operator`` may also act on tasks (revoke, abort, rate limit, time limits, apply),
  pause/purge queues and change worker pools and consumers;
* ``admin`` may do everything, worker shutdown included.

Mapping (options ``--admins``, ``--operators``, ``--viewers``, each a comma list). An entry
is a basic-auth user name, an email or ``--auth``-style email pattern (``.*@corp.com``,
``a@x.com|b@x.com``), or ``group:<name>`` for an OpenID Connect group. The strongest list that
matches wins. When none of the three options is set every authenticated user is ``admin``,
which is Flower's behaviour (anyone who can log in can do everything); once one is set, an
authenticated user on no list is a ``viewer``. ``--read_only`` keeps Flower's meaning: nobody
changes anything, whatever their role (403 ``Read only mode is enabled``).

The identity of the current request is resolved once by :class:`IdentityMiddleware`
(``stamen.web.auth``) and kept in ``request.state.identity``; ``request.state.user`` holds
the user name or email (for audit logs) and ``request.state.role`` the role, both ``None``
for an anonymous request.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request

from stamen.web.errors import ApiError

VIEWER, OPERATOR, ADMIN = "viewer", "operator", "admin"
ROLES: tuple[str, ...] = (VIEWER, OPERATOR, ADMIN)
_RANK = {role: rank for rank, role in enumerate(ROLES)}

READ_ONLY_MESSAGE = "Read only mode is enabled"

#: Characters Flower lets ``.*`` stand for in an ``--auth`` pattern (an email local part).
_LOCAL_PART_CHARS = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.\-]*"


@dataclass(frozen=True)
class Identity:
    """An authenticated (or deliberately anonymous) caller.

    ``method`` says how it was established: ``basic``, ``session`` (login cookie),
    ``token`` (bearer API token) or ``anonymous`` (no authentication configured and the
    request allowed anyway, as Flower allows it).
    """

    name: str | None
    role: str
    method: str
    groups: tuple[str, ...] = field(default=())

    def can(self, role: str) -> bool:
        """True when this identity's role is at least ``role``."""
        return _RANK[self.role] >= _RANK[role]


def auth_pattern_matches(pattern: str, email: str) -> bool:
    """Flower 2.2's ``--auth`` test (spec 7.2): a ``|`` list of exact addresses, or one
    ``.*`` standing for local-part characters, or plain equality. Always a full match, so
    ``.*@example.com`` never accepts ``x@example.com.evil.org``; case-sensitive as in Flower.
    """
    if not pattern or not email:
        return False
    if "|" in pattern:
        return email in pattern.split("|")
    if "*" in pattern:
        regex = re.escape(pattern).replace(re.escape(".*"), _LOCAL_PART_CHARS)
        return re.fullmatch(regex, email) is not None
    return pattern == email


def _entry_matches(entry: str, name: str, groups: tuple[str, ...]) -> bool:
    entry = entry.strip()
    if entry.startswith("group:"):
        return entry[len("group:") :] in groups
    return auth_pattern_matches(entry, name)


def roles_configured(settings: Any) -> bool:
    """Whether any role list is set; without one everybody authenticated is admin."""
    return any(getattr(settings, opt, None) for opt in ("admins", "operators", "viewers"))


def role_for(settings: Any, name: str | None, groups: tuple[str, ...] = ()) -> str:
    """The role of an authenticated user ``name`` (user name or email) with OIDC ``groups``."""
    if not roles_configured(settings):
        return ADMIN
    for role, option in ((ADMIN, "admins"), (OPERATOR, "operators"), (VIEWER, "viewers")):
        for entry in getattr(settings, option, None) or []:
            if _entry_matches(entry, name or "", groups):
                return role
    return VIEWER


def current_identity(request: Request) -> Identity | None:
    """The identity the middleware resolved for this request (``None``: not authenticated)."""
    return getattr(request.state, "identity", None)


def set_identity(request: Request, identity: Identity | None) -> None:
    """Record ``identity`` where handlers and audit logs look for it."""
    request.state.identity = identity
    request.state.user = identity.name if identity else None
    request.state.role = identity.role if identity else None


def require_role(request: Request, role: str) -> Identity:
    """Refuse the request unless its caller holds ``role`` (``operator`` or ``admin``).

    Call it at the top of every state-changing handler, after the API gate has
    authenticated the caller. Raises ``ApiError``: 401 when nobody is authenticated, 403
    ``Read only mode is enabled`` under ``--read_only`` (Flower's text), 403 naming the
    missing role otherwise. Returns the identity, whose ``name`` is for the audit log.
    """
    if role not in _RANK:
        raise ValueError(f"unknown role {role!r}")
    identity = current_identity(request)
    if identity is None:
        raise ApiError(401)
    settings = request.app.state.services.settings
    if settings.read_only and role != VIEWER:
        raise ApiError(403, READ_ONLY_MESSAGE)
    if not identity.can(role):
        who = identity.name or "anonymous"
        raise ApiError(
            403,
            f"Forbidden: '{who}' has the {identity.role} role; this action needs the {role} role",
        )
    return identity
