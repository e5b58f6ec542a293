"""Roles (viewer/operator/admin), ``require_role``, ``--read_only``, the ``--auth`` pattern."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import Depends, Request

from stamen.config import ConfigError, Settings, load_settings, validate_auth_pattern
from stamen.web.auth import sign_value
from stamen.web.gate import api_gate, require_role
from stamen.web.roles import auth_pattern_matches, role_for
from tests.unit.conftest import AppHarness, many_harnesses


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


@pytest.mark.parametrize(
    ("pattern", "email", "ok"),
    [
        (".*@example.com", "one@example.com", True),
        (".*@example.com", "attacker@example.com.attacker.com", False),
        ("one.*@example.com", "one@example.com", True),
        ("one.*@example.com", "one.two@example.com", True),
        (".*@corp.example.com", "attacker@corpZexample.com", False),
        ("mail@example.com", "long.mail@example.com", False),
        ("mail@example.com", "", False),
        ("mail@example.com", "*", False),
        ("me@gmail.com", "me@gmail.com.attacker.com", False),
        ("a@x.com|b@x.com", "b@x.com", True),
        ("a@x.com|b@x.com", "a@x.com|b@x.com", False),
        ("a@x.com|b@x.com", "c@x.com", False),
        ("Me@x.com", "me@x.com", False),  # case-sensitive, as Flower
        (".*@example.com", "x y@example.com", False),
    ],
)
def test_auth_pattern(pattern: str, email: str, ok: bool) -> None:
    assert auth_pattern_matches(pattern, email) is ok


@pytest.mark.parametrize(
    "pattern",
    [".*@.*example.com", "one@domain1.com|.*@domain2.com", "mail@.*example.com", ".*example.com"],
)
def test_invalid_auth_patterns(pattern: str) -> None:
    with pytest.raises(ConfigError, match="Invalid '--auth' option"):
        validate_auth_pattern(pattern)


def test_role_mapping() -> None:
    plain = Settings()
    assert role_for(plain, "anyone") == "admin"  # Flower: anyone let in may do everything
    s = Settings(
        admins=["root", "boss@corp.com"],
        operators=[".*@ops.corp.com", "group:sre"],
        viewers=["group:staff"],
    )
    assert role_for(s, "root") == "admin"
    assert role_for(s, "boss@corp.com") == "admin"
    assert role_for(s, "x@ops.corp.com") == "operator"
    assert role_for(s, "x@corp.com", ("staff", "sre")) == "operator"  # strongest wins
    assert role_for(s, "x@corp.com", ("staff",)) == "viewer"
    assert role_for(s, "stranger") == "viewer"
    assert role_for(s, "x@ops.corp.com.evil.org") == "viewer"


def test_role_options_are_validated(tmp_path: Path) -> None:
    s = load_settings(["--admins=root,group:ops", "--viewers=.*@x.com"], {}, tmp_path)
    assert (s.admins, s.viewers) == (["root", "group:ops"], [".*@x.com"])
    with pytest.raises(ConfigError):
        load_settings(["--operators=.*@.*x.com"], {}, tmp_path)


@pytest.fixture
def factory(tmp_path: Path) -> Iterator[Any]:
    def add_role_routes(h: AppHarness) -> None:
        app = h.client.app  # type: ignore[attr-defined]
        for role in ("viewer", "operator", "admin"):

            async def action(request: Request, role: str = role) -> dict[str, Any]:
                who = require_role(request, role)
                return {"user": request.state.user, "role": who.role}

            app.add_api_route(
                f"/api/test/{role}", action, methods=["POST"], dependencies=[Depends(api_gate)]
            )

    with many_harnesses(tmp_path, add_role_routes) as build:
        yield build


def test_default_role_is_admin(factory: Any) -> None:
    h = factory(basic_auth=["u:p"])
    r = h.client.post("/api/test/admin", headers=basic("u", "p"))
    assert r.json() == {"user": "u", "role": "admin"}


def test_roles_from_basic_users(factory: Any) -> None:
    h = factory(
        basic_auth=["v:p", "o:p", "a:p", "nobody:p"],
        admins=["a"],
        operators=["o"],
        viewers=["v"],
    )
    assert h.client.post("/api/test/viewer", headers=basic("v", "p")).status_code == 200
    r = h.client.post("/api/test/operator", headers=basic("v", "p"))
    assert r.status_code == 403
    assert r.text == "Forbidden: 'v' has the viewer role; this action needs the operator role"
    assert h.client.post("/api/test/operator", headers=basic("o", "p")).status_code == 200
    assert h.client.post("/api/test/admin", headers=basic("o", "p")).status_code == 403
    assert h.client.post("/api/test/admin", headers=basic("a", "p")).json()["role"] == "admin"
    assert h.client.post("/api/test/operator", headers=basic("nobody", "p")).status_code == 403
    assert h.client.post("/api/test/admin", headers=basic("a", "bad")).status_code == 401


def test_read_only_refuses_everyone(factory: Any) -> None:
    h = factory(basic_auth=["a:p"], read_only=True)
    r = h.client.post("/api/test/operator", headers=basic("a", "p"))
    assert (r.status_code, r.text) == (403, "Read only mode is enabled")
    assert h.client.post("/api/test/viewer", headers=basic("a", "p")).status_code == 200


def test_read_only_without_auth(factory: Any) -> None:
    h = factory(read_only=True)
    r = h.client.post("/api/test/admin")
    assert (r.status_code, r.text) == (403, "Read only mode is enabled")


def test_roles_from_email_and_groups(factory: Any) -> None:
    h = factory(auth=".*@corp.com", operators=["group:sre"], admins=["boss@corp.com"])
    secret = h.services.settings.cookie_secret
    client = h.client
    client.cookies.set("user", sign_value(secret, "user", "dev@corp.com"))
    # Any Authorization header exempts the POST from the XSRF token (Flower 2.2).
    hdr = {"Authorization": "x"}
    assert client.post("/api/test/operator", headers=hdr).status_code == 403
    groups = sign_value(secret, "stamen_groups", '["dev@corp.com", ["sre"]]')
    client.cookies.set("stamen_groups", groups)
    assert client.post("/api/test/operator", headers=hdr).json()["role"] == "operator"
    # Groups bound to another email are ignored.
    client.cookies.set("user", sign_value(secret, "user", "other@corp.com"))
    assert client.post("/api/test/operator", headers=hdr).status_code == 403
    client.cookies.set("user", sign_value(secret, "user", "boss@corp.com"))
    assert client.post("/api/test/admin", headers=hdr).json() == {
        "user": "boss@corp.com",
        "role": "admin",
    }


def test_token_role_overrides_lists(factory: Any) -> None:
    h = factory(basic_auth=["a:p"], api_tokens=["ci:t:operator"], viewers=["ci"])
    auth = {"Authorization": "Bearer t"}
    assert h.client.post("/api/test/operator", headers=auth).json() == {
        "user": "ci",
        "role": "operator",
    }
    assert h.client.post("/api/test/admin", headers=auth).status_code == 403


def test_real_control_endpoints_use_roles(factory: Any) -> None:
    """The worker/task control API asks ``require_role``: shutdown is admin-only."""
    h = factory(basic_auth=["v:p", "o:p", "a:p"], admins=["a"], operators=["o"])
    shutdown = "/api/worker/shutdown/nobody@nowhere"
    r = h.client.post(shutdown, headers=basic("v", "p"))
    assert r.status_code == 403 and "needs the admin role" in r.text
    r = h.client.post(shutdown, headers=basic("o", "p"))
    assert r.status_code == 403 and "needs the admin role" in r.text
    assert h.client.post(shutdown, headers=basic("a", "p")).status_code == 404  # unknown worker
    revoke = "/api/task/revoke/some-task-id"
    r = h.client.post(revoke, headers=basic("v", "p"))
    assert r.status_code == 403 and "needs the operator role" in r.text
    assert h.client.post(revoke, headers=basic("o", "p")).status_code != 403


def test_ui_csrf_refusal_is_a_page(factory: Any) -> None:
    h = factory(basic_auth=["a:p"])
    r = h.client.post("/tasks/datatable", headers={**basic("a", "p"), "Origin": "http://evil"})
    assert r.status_code == 403
    assert "Cross-origin request forbidden" in r.text
