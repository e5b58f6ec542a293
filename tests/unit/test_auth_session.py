"""Sessions, the OAuth gate, ``/login`` without provider, ``/logout``, CSRF (spec 7.4, 7.5)."""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import pytest
from fastapi import Depends, Request
from fastapi.testclient import TestClient

from stamen.web.auth import safe_next, sign_value, unsign_value
from stamen.web.gate import UNAUTHENTICATED_MESSAGE, api_gate, csrf_token, page_user
from stamen.web.roles import Identity
from tests.unit.conftest import AppHarness, many_harnesses

PageUser = Annotated[Identity, Depends(page_user)]


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


@pytest.fixture
def factory(tmp_path: Path) -> Iterator[Any]:
    def add_routes(h: AppHarness) -> None:
        app = h.client.app  # type: ignore[attr-defined]

        async def page(request: Request, user: PageUser) -> dict[str, Any]:
            return {"user": user.name, "token": csrf_token(request)}

        async def act(request: Request) -> dict[str, Any]:
            return {"ok": True}

        app.add_api_route("/testpage", page, methods=["GET"])
        app.add_api_route("/api/test/act", act, methods=["POST"], dependencies=[Depends(api_gate)])

    with many_harnesses(tmp_path, add_routes) as build:
        yield build


def test_signed_values() -> None:
    signed = sign_value("k", "user", "me@x.com")
    assert signed.startswith("2|1:0|10:")
    assert unsign_value("k", "user", signed, 60) == "me@x.com"
    assert unsign_value("other", "user", signed, 60) is None
    assert unsign_value("k", "oauth_state", signed, 60) is None
    forged = signed.replace("12:bWVAeC5jb20=", "12:eW91QHguY29t")
    assert forged != signed and unsign_value("k", "user", forged, 60) is None
    # Change the signature's last hex digit (always to a different one: this was a 1-in-16
    # flake when it was simply set to "0").
    tampered = signed[:-1] + ("1" if signed[-1] == "0" else "0")
    assert unsign_value("k", "user", tampered, 60) is None
    old = sign_value("k", "user", "me@x.com", now=time.time() - 120)
    assert unsign_value("k", "user", old, 60) is None
    assert unsign_value("k", "user", "garbage", 60) is None
    assert unsign_value("k", "user", "2|1:0|99999:", 60) is None


def test_tornado_signed_value_vector() -> None:
    # tornado.web.create_signed_value("secret", "user", "me@example.com", version=2) with the
    # clock at 1700000000 (Tornado 6): a Flower session cookie stays valid in Stamen.
    vector = (
        "2|1:0|10:1700000000|4:user|20:bWVAZXhhbXBsZS5jb20=|"
        "2d987b0385e3d8e5ad8e087c1a4b07160bcc6e938d2cc415f3852ba81db94e41"
    )
    assert sign_value("secret", "user", "me@example.com", now=1700000000) == vector
    assert unsign_value("secret", "user", vector, 10**10) == "me@example.com"


@pytest.mark.parametrize(
    ("value", "prefix", "expected"),
    [
        (None, "", "/"),
        ("", "flower", "/flower/"),
        ("/tasks?state=FAILURE", "", "/tasks?state=FAILURE"),
        ("https://evil.example/", "", "/"),
        ("//evil.example/", "", "/"),
        ("/\\evil.example", "", "/"),
        ("/\t/evil.example", "", "/"),
        ("javascript:alert(1)", "", "/"),
        ("workers", "flower", "/workers"),
        ("/flower/workers", "flower", "/flower/workers"),
        ("http:/evil", "", "/"),
    ],
)
def test_safe_next(value: str | None, prefix: str, expected: str) -> None:
    assert safe_next(value, prefix) == expected


def test_oauth_gate_without_cookie(factory: Any) -> None:
    h = factory(auth=".*@corp.com", auth_provider="google")
    c: TestClient = h.client
    r = c.get("/testpage", follow_redirects=False)
    assert (r.status_code, r.headers["location"]) == (302, "/login?next=%2Ftestpage")
    r = c.get("/api/workers?refresh=1", follow_redirects=False)
    assert (r.status_code, r.headers["location"]) == (
        302,
        "/login?next=%2Fapi%2Fworkers%3Frefresh%3D1",
    )
    r = c.post("/api/test/act")
    assert (r.status_code, r.text) == (403, "'_xsrf' argument missing from POST")
    r = c.post("/api/test/act", headers={"Authorization": "whatever"})
    assert (r.status_code, r.text) == (403, "")


def test_oauth_session_cookie(factory: Any) -> None:
    h = factory(auth=".*@corp.com")
    c: TestClient = h.client
    secret = h.services.settings.cookie_secret
    c.cookies.set("user", sign_value(secret, "user", "me@corp.com"))
    assert c.get("/testpage").json()["user"] == "me@corp.com"
    assert c.get("/api/workers").status_code == 200
    c.cookies.set("user", sign_value(secret, "user", "me@corp.com.evil.org"))
    assert c.get("/testpage", follow_redirects=False).status_code == 302
    c.cookies.set("user", sign_value("not-the-secret", "user", "me@corp.com"))
    assert c.get("/testpage", follow_redirects=False).status_code == 302


def test_basic_and_oauth_need_both(factory: Any) -> None:
    h = factory(auth=".*@corp.com", basic_auth=["u:p"])
    c: TestClient = h.client
    assert c.get("/testpage").status_code == 401
    r = c.get("/testpage", headers=basic("u", "p"), follow_redirects=False)
    assert r.status_code == 302
    c.cookies.set("user", sign_value(h.services.settings.cookie_secret, "user", "a@corp.com"))
    assert c.get("/testpage").status_code == 401
    assert c.get("/testpage", headers=basic("u", "p")).json()["user"] == "a@corp.com"


def test_login_without_provider_is_404_and_logout(factory: Any) -> None:
    h = factory(auth=".*@corp.com")
    c: TestClient = h.client
    assert c.get("/login").status_code == 404
    c.cookies.set("user", sign_value(h.services.settings.cookie_secret, "user", "me@corp.com"))
    r = c.get("/logout")
    assert r.status_code == 200
    assert "You have been logged out" in r.text
    cookie = r.headers["set-cookie"]
    assert cookie.startswith('user="";') and "Path=/" in cookie and "Max-Age=0" in cookie


def test_csrf_token_flow(factory: Any) -> None:
    h = factory(auth=".*@corp.com")
    c: TestClient = h.client
    c.cookies.set("user", sign_value(h.services.settings.cookie_secret, "user", "me@corp.com"))
    r = c.get("/testpage")
    set_cookie = r.headers["set-cookie"]
    assert set_cookie.startswith("_xsrf=") and "HttpOnly" not in set_cookie
    token = r.json()["token"]
    assert c.cookies.get("_xsrf") and c.cookies.get("_xsrf") != token  # masked each time
    assert c.post("/api/test/act", headers={"X-XSRFToken": token}).json() == {"ok": True}
    assert c.post("/api/test/act", headers={"X-CSRFToken": token}).status_code == 200
    assert c.post("/api/test/act", data={"_xsrf": token, "a": "b"}).status_code == 200
    assert c.post("/api/test/act", files={"f": b"x"}, data={"_xsrf": token}).status_code == 200
    r = c.post("/api/test/act", headers={"X-XSRFToken": "zz"})
    assert (r.status_code, r.text) == (403, "'_xsrf' argument has invalid format")
    r = c.post("/api/test/act", headers={"X-XSRFToken": "00112233445566778899aabbccddeeff"})
    assert (r.status_code, r.text) == (403, "XSRF cookie does not match POST argument")


def test_origin_and_fetch_site_checks(factory: Any) -> None:
    h = factory(basic_auth=["u:p"])
    c: TestClient = h.client
    auth = basic("u", "p")
    assert c.post("/api/test/act", headers=auth).status_code == 200  # curl-like
    r = c.post("/api/test/act", headers={**auth, "Origin": "http://evil"})
    assert (r.status_code, r.text) == (403, "Cross-origin request forbidden")
    r = c.post("/api/test/act", headers={**auth, "Origin": "http://testserver"})
    assert r.status_code == 200
    r = c.post("/api/test/act", headers={**auth, "Sec-Fetch-Site": "cross-site"})
    assert (r.status_code, r.text) == (403, "Cross-site request forbidden")
    r = c.post("/api/test/act", headers={**auth, "Sec-Fetch-Site": "same-site"})
    assert r.status_code == 403
    r = c.post("/api/test/act", headers={**auth, "Sec-Fetch-Site": "same-origin"})
    assert r.status_code == 200
    # Unauthenticated POSTs are refused before authentication runs.
    r = c.post("/api/test/act", headers={"Origin": "http://evil"})
    assert r.text == "Cross-origin request forbidden"


def test_no_auth_skips_csrf(factory: Any) -> None:
    h = factory()
    r = h.client.post("/api/test/act", headers={"Origin": "http://evil"})
    assert r.status_code == 200


def test_cookie_flags_under_tls(factory: Any, tmp_path: Path) -> None:
    h = factory(auth=".*@corp.com")
    c = TestClient(h.client.app, base_url="https://testserver")  # type: ignore[attr-defined]
    c.cookies.set("user", sign_value(h.services.settings.cookie_secret, "user", "me@corp.com"))
    r = c.get("/logout")
    assert "Secure" in r.headers["set-cookie"] and "HttpOnly" in r.headers["set-cookie"]
    assert "SameSite=lax" in r.headers["set-cookie"]
    r = c.get("/testpage")
    assert "Secure" in r.headers["set-cookie"]


def test_cors_and_options(factory: Any) -> None:
    closed = factory(unauthenticated_api=False)
    r = closed.client.options("/api/workers")
    assert (r.status_code, r.text) == (401, UNAUTHENTICATED_MESSAGE)
    assert closed.client.options("/testpage").status_code == 204
    assert "access-control-allow-origin" not in closed.client.get("/testpage").headers
    opened = factory(unauthenticated_api=True)
    r = opened.client.options("/api/workers")
    assert r.status_code == 204 and r.headers["access-control-allow-origin"] == "*"
    r = opened.client.get("/api/workers")
    assert r.headers["access-control-allow-methods"] == "PUT, DELETE, OPTIONS, POST, GET, PATCH"
    with_auth = factory(basic_auth=["u:p"], unauthenticated_api=True)
    assert with_auth.client.options("/api/workers").status_code == 204
    r = with_auth.client.get("/api/workers", headers=basic("u", "p"))
    assert "access-control-allow-origin" not in r.headers
