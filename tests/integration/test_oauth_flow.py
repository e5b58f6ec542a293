"""The whole OAuth/OIDC login flow against a small provider of our own on loopback.

``LocalProvider`` speaks just enough of OAuth2 and OpenID Connect (discovery, authorize,
token with client authentication and PKCE, userinfo, JWKS, RS256 ID tokens) and of the
GitHub, GitLab, Google and Okta APIs for Stamen's providers. The browser is played by the
test: it follows the redirects by hand so every hop can be checked.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import html
import json
import secrets
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qs, quote, urlencode, urlsplit

import httpx
import pytest
from fastapi import Depends, Request
from fastapi.testclient import TestClient
from joserfc import jwt
from joserfc.jwk import RSAKey

from stamen.web.auth import LoginResult, OAuthProvider, load_provider, provider_of
from stamen.web.gate import page_user
from stamen.web.roles import Identity
from tests.unit.conftest import AppHarness, many_harnesses

CLIENT_ID, CLIENT_SECRET = "stamen-client", "stamen-secret"

PageUser = Annotated[Identity, Depends(page_user)]


@functools.cache
def _keys() -> tuple[RSAKey, RSAKey]:
    """The provider's signing key and an impostor's with the same key id (made once)."""
    return (
        RSAKey.generate_key(2048, parameters={"kid": "k1"}),
        RSAKey.generate_key(2048, parameters={"kid": "k1"}),
    )


class LocalProvider:
    """A loopback OAuth2/OIDC provider that approves whoever ``user`` is."""

    def __init__(self) -> None:
        self.key, self.other_key = _keys()
        self.sign_with_other_key = False
        self.user: dict[str, Any] = {}
        self.emails: list[dict[str, Any]] = []
        self.codes: dict[str, dict[str, Any]] = {}
        self.tokens: dict[str, dict[str, Any]] = {}
        self.requests: list[tuple[str, str, dict[str, list[str]]]] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> LocalProvider:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    # -- endpoints --

    def discovery(self) -> dict[str, Any]:
        return {
            "issuer": self.base,
            "authorization_endpoint": f"{self.base}/authorize",
            "token_endpoint": f"{self.base}/token",
            "userinfo_endpoint": f"{self.base}/userinfo",
            "jwks_uri": f"{self.base}/jwks",
            "response_types_supported": ["code"],
            "id_token_signing_alg_values_supported": ["RS256"],
        }

    def authorize(self, q: dict[str, str]) -> tuple[int, dict[str, str], Any]:
        if q.get("client_id") != CLIENT_ID or q.get("response_type") != "code":
            return 400, {}, {"error": "invalid_request"}
        code = secrets.token_urlsafe(16)
        self.codes[code] = dict(q)
        target = q["redirect_uri"] + "?" + urlencode({"code": code, "state": q.get("state", "")})
        return 302, {"Location": target}, None

    def token(self, form: dict[str, str], headers: Any) -> tuple[int, dict[str, str], Any]:
        client_id, secret = form.get("client_id"), form.get("client_secret")
        auth = headers.get("Authorization", "")
        if auth.startswith("Basic "):
            client_id, _, secret = base64.b64decode(auth[6:]).decode().partition(":")
        if (client_id, secret) != (CLIENT_ID, CLIENT_SECRET):
            return 401, {}, {"error": "invalid_client"}
        grant = self.codes.pop(form.get("code", ""), None)
        if grant is None or grant["redirect_uri"] != form.get("redirect_uri"):
            return 400, {}, {"error": "invalid_grant"}
        if "code_challenge" in grant:
            verifier = form.get("code_verifier", "")
            digest = hashlib.sha256(verifier.encode()).digest()
            if base64.urlsafe_b64encode(digest).rstrip(b"=").decode() != grant["code_challenge"]:
                return 400, {}, {"error": "invalid_grant", "error_description": "PKCE"}
        access = secrets.token_urlsafe(16)
        self.tokens[access] = dict(self.user)
        answer: dict[str, Any] = {"access_token": access, "token_type": "bearer", "expires_in": 300}
        if "openid" in grant.get("scope", "").split():
            now = int(time.time())
            claims = {
                "iss": self.base,
                "aud": CLIENT_ID,
                "sub": self.user.get("sub", "u1"),
                "iat": now,
                "exp": now + 300,
                "nonce": grant.get("nonce"),
                **{k: v for k, v in self.user.items() if k != "sub"},
            }
            key = self.other_key if self.sign_with_other_key else self.key
            answer["id_token"] = jwt.encode({"alg": "RS256", "kid": key.kid}, claims, key)
        return 200, {}, answer

    def api(self, path: str, q: dict[str, str], headers: Any) -> tuple[int, dict[str, str], Any]:
        auth = headers.get("Authorization", "")
        user = self.tokens.get(auth.partition(" ")[2])
        if user is None:
            return 401, {}, {"error": "invalid_token"}
        if path.endswith("/user/emails"):
            return 200, {}, self.emails
        if path.endswith("/api/v4/groups"):
            return 200, {}, [{"full_path": g} for g in user.get("groups", [])]
        return 200, {}, {"sub": user.get("sub", "u1"), **user}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        provider = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _answer(self, status: int, headers: dict[str, str], body: Any) -> None:
                data = json.dumps(body).encode() if body is not None else b""
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                parts = urlsplit(self.path)
                q = {k: v[-1] for k, v in parse_qs(parts.query).items()}
                provider.requests.append(("GET", parts.path, parse_qs(parts.query)))
                if parts.path == "/.well-known/openid-configuration":
                    self._answer(200, {}, provider.discovery())
                elif parts.path == "/jwks":
                    self._answer(200, {}, {"keys": [provider.key.as_dict(private=False)]})
                elif parts.path.endswith("/authorize"):
                    self._answer(*provider.authorize(q))
                else:
                    self._answer(*provider.api(parts.path, q, self.headers))

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length).decode()
                form = {k: v[-1] for k, v in parse_qs(raw).items()}
                provider.requests.append(("POST", self.path, parse_qs(raw)))
                if self.path.endswith(("/token", "/access_token")):
                    self._answer(*provider.token(form, self.headers))
                else:
                    self._answer(404, {}, {"error": "not_found"})

        return Handler


@pytest.fixture
def idp() -> Iterator[LocalProvider]:
    with LocalProvider() as provider:
        provider.user = {"email": "dev@corp.com", "email_verified": True, "groups": ["sre"]}
        yield provider


@pytest.fixture
def stamen(tmp_path: Path, idp: LocalProvider) -> Iterator[Any]:
    """Build an in-process Stamen with OAuth settings pointing at ``idp``."""

    def add_whoami(h: AppHarness) -> None:
        async def whoami(request: Request, user: PageUser) -> dict[str, Any]:
            return {"user": user.name, "role": user.role, "groups": list(user.groups)}

        h.client.app.add_api_route("/whoami", whoami, methods=["GET"])  # type: ignore[attr-defined]

    with many_harnesses(tmp_path, add_whoami) as build:

        def build_oauth(**overrides: Any) -> AppHarness:
            return build(
                **{
                    "auth": ".*@corp.com",
                    "oauth2_key": CLIENT_ID,
                    "oauth2_secret": CLIENT_SECRET,
                    "unauthenticated_api": False,
                    **overrides,
                }
            )

        yield build_oauth


def start(client: TestClient, next_url: str = "/whoami") -> httpx.Response:
    """Open ``/login`` and return the provider's answer (a redirect back to Stamen)."""
    r = client.get(f"/login?next={quote(next_url, safe='')}", follow_redirects=False)
    assert r.status_code == 302, r.text
    assert "oauth_state=" in r.headers["set-cookie"]
    return httpx.get(r.headers["location"], follow_redirects=False)


def login(client: TestClient, next_url: str = "/whoami") -> httpx.Response:
    back = start(client, next_url)
    assert back.status_code == 302, back.text
    return client.get(back.headers["location"], follow_redirects=False)


def shown(response: httpx.Response) -> str:
    """The message as a reader sees it (error pages are HTML once the pages module is in)."""
    return html.unescape(response.text)


def user_cookie_set(response: httpx.Response) -> bool:
    return any(
        h.startswith("user=") and not h.startswith('user="";')
        for h in response.headers.get_list("set-cookie")
    )


def test_oidc_login_roles_and_logout(stamen: Any, idp: LocalProvider) -> None:
    h = stamen(auth_provider="oidc", oauth2_issuer=idp.base, operators=["group:sre"])
    c = h.client
    assert c.get("/whoami", follow_redirects=False).headers["location"] == "/login?next=%2Fwhoami"
    r = login(c, "/whoami?x=1")
    assert (r.status_code, r.headers["location"]) == (302, "/whoami?x=1")
    cookies = r.headers.get_list("set-cookie")
    user_cookie = next(x for x in cookies if x.startswith("user="))
    assert "HttpOnly" in user_cookie and "SameSite=lax" in user_cookie
    assert "Secure" not in user_cookie  # plain http here; see the TLS test
    assert c.get("/whoami").json() == {
        "user": "dev@corp.com",
        "role": "operator",
        "groups": ["sre"],
    }
    assert c.get("/api/workers").status_code == 200
    # PKCE and a nonce were used.
    authorize = next(q for m, p, q in idp.requests if p == "/authorize")
    assert authorize["code_challenge_method"] == ["S256"] and authorize["nonce"]
    assert "openid" in authorize["scope"][0]
    c.get("/logout")
    c.cookies.clear()
    assert c.get("/whoami", follow_redirects=False).status_code == 302


def test_wrong_state_is_refused(stamen: Any, idp: LocalProvider) -> None:
    h = stamen(auth_provider="oidc", oauth2_issuer=idp.base)
    back = start(h.client)
    location = back.headers["location"].replace("state=", "state=tampered")
    r = h.client.get(location, follow_redirects=False)
    assert r.status_code == 403
    assert (
        "OAuth authenticator error: State tokens do not match. Please try logging in again."
    ) in shown(r)
    assert not user_cookie_set(r)


def test_code_without_our_state_cookie_is_refused(stamen: Any, idp: LocalProvider) -> None:
    """Login CSRF: a victim's browser handed an attacker's code has no matching cookie."""
    h = stamen(auth_provider="oidc", oauth2_issuer=idp.base)
    back = start(h.client)
    h.client.cookies.clear()
    r = h.client.get(back.headers["location"], follow_redirects=False)
    assert r.status_code == 403 and "State tokens do not match" in shown(r)


def test_foreign_email_is_refused(stamen: Any, idp: LocalProvider) -> None:
    idp.user = {"email": "mallory@corp.com.evil.org", "email_verified": True}
    h = stamen(auth_provider="oidc", oauth2_issuer=idp.base)
    r = login(h.client)
    assert r.status_code == 403
    assert "Access denied. Please use another account" in shown(r)
    assert not user_cookie_set(r)


def test_unverified_email_is_refused(stamen: Any, idp: LocalProvider) -> None:
    idp.user = {"email": "dev@corp.com", "email_verified": False}
    h = stamen(auth_provider="oidc", oauth2_issuer=idp.base)
    assert login(h.client).status_code == 403


def test_forged_id_token_is_refused(stamen: Any, idp: LocalProvider) -> None:
    idp.sign_with_other_key = True
    h = stamen(auth_provider="oidc", oauth2_issuer=idp.base)
    r = login(h.client)
    assert r.status_code == 403 and "invalid ID token" in shown(r)
    assert not user_cookie_set(r)


@pytest.mark.parametrize(
    "evil", ["https://evil.example/", "//evil.example/x", "/\\evil.example", "/\t/evil.example"]
)
def test_open_redirect_through_next(stamen: Any, idp: LocalProvider, evil: str) -> None:
    h = stamen(auth_provider="oidc", oauth2_issuer=idp.base)
    r = login(h.client, evil)
    assert (r.status_code, r.headers["location"]) == (302, "/")


def test_provider_error_is_reported(stamen: Any, idp: LocalProvider) -> None:
    h = stamen(auth_provider="oidc", oauth2_issuer=idp.base)
    r = h.client.get("/login?error=access_denied")
    assert r.status_code == 403
    assert "OpenID Connect auth failed: access_denied. Please try logging in again." in shown(r)


def test_okta(stamen: Any, idp: LocalProvider) -> None:
    h = stamen(auth_provider="flower.views.auth.OktaLoginHandler", okta_base_url=f"{idp.base}/o2")
    assert login(h.client).headers["location"] == "/whoami"
    assert h.client.get("/whoami").json()["user"] == "dev@corp.com"
    assert any(p == "/o2/v1/authorize" for _, p, _ in idp.requests)
    idp.user = {"email": "dev@corp.com", "email_verified": False}
    h.client.cookies.clear()
    assert login(h.client).status_code == 403


def _rebase(h: AppHarness, base: str, **urls: str) -> None:
    provider = provider_of(h.client.app)  # type: ignore[attr-defined]
    assert provider is not None
    for name, path in urls.items():
        setattr(provider, name, base + path)


def test_github(stamen: Any, idp: LocalProvider) -> None:
    h = stamen(auth_provider="github")
    _rebase(
        h, idp.base,
        authorize_url="/login/oauth/authorize",
        token_url="/login/oauth/access_token",
        emails_url="/user/emails",
    )  # fmt: skip
    idp.emails = [
        {"email": "first@corp.com", "verified": True},
        {"email": "Second@Corp.com", "verified": True},  # not matched: case-sensitive
        {"email": "Third@corp.com", "verified": True},
        {"email": "unverified@corp.com", "verified": False},
    ]
    assert login(h.client).status_code == 302
    assert h.client.get("/whoami").json()["user"] == "third@corp.com"  # last, lowercased
    idp.emails = [{"email": "x@elsewhere.com", "verified": True}]
    h.client.cookies.clear()
    r = login(h.client)
    assert r.status_code == 403 and "Access denied." in shown(r)


def test_gitlab_groups(stamen: Any, idp: LocalProvider) -> None:
    h = stamen(
        auth_provider="gitlab",
        gitlab_auth_allowed_groups=["corp/ops"],
        gitlab_min_access_level=30,
        admins=["group:corp/ops"],
    )
    _rebase(
        h, idp.base,
        authorize_url="/oauth/authorize",
        token_url="/oauth/token",
        user_url="/api/v4/user",
        groups_url="/api/v4/groups",
    )  # fmt: skip
    idp.user = {"email": "dev@corp.com", "groups": ["corp/ops", "corp/dev"]}
    assert login(h.client).status_code == 302
    assert h.client.get("/whoami").json()["role"] == "admin"
    groups_call = next(q for m, p, q in idp.requests if p == "/api/v4/groups")
    assert groups_call["min_access_level"] == ["30"]
    idp.user = {"email": "dev@corp.com", "groups": ["corp/dev"]}
    h.client.cookies.clear()
    r = login(h.client)
    assert r.status_code == 403
    assert "Access denied. Please use another account or contact your admin." in shown(r)


def test_google(stamen: Any, idp: LocalProvider) -> None:
    h = stamen(auth_provider="google")
    _rebase(h, idp.base, authorize_url="/authorize", token_url="/token", userinfo_url="/me")
    assert login(h.client).status_code == 302
    assert h.client.get("/whoami").json()["user"] == "dev@corp.com"
    idp.user = {"email": "dev@other.com"}
    h.client.cookies.clear()
    r = login(h.client)
    assert r.status_code == 403
    assert "Access denied to 'dev@other.com'." in shown(r)


class StaticProvider(OAuthProvider):
    """A custom provider, as a user would write one (named by dotted path)."""

    title = "Static"


def test_provider_names(idp: LocalProvider) -> None:
    from stamen.config import Settings, resolve_auth_provider

    settings = Settings(okta_base_url="https://okta.example/oauth2/default")
    for flower_name, cls in [
        ("flower.views.auth.GoogleAuth2LoginHandler", "GoogleProvider"),
        ("flower.views.auth.GithubLoginHandler", "GitHubProvider"),
        ("flower.views.auth.GitLabLoginHandler", "GitLabProvider"),
        ("flower.views.auth.OktaLoginHandler", "OktaProvider"),
    ]:
        resolved = resolve_auth_provider(flower_name)
        provider = load_provider(Settings(auth_provider=resolved, okta_base_url="https://o"))
        assert type(provider).__name__ == cls
    custom = load_provider(
        Settings(auth_provider="tests.integration.test_oauth_flow.StaticProvider")
    )
    assert isinstance(custom, StaticProvider)
    with pytest.raises(ValueError, match="cannot import"):
        load_provider(Settings(auth_provider="no.such.Provider"))
    with pytest.raises(ValueError, match="not supported"):
        load_provider(Settings(auth_provider="stamen.web.auth.LoginResult"))
    assert LoginResult("a").groups == ()
    assert settings.okta_base_url


def test_oidc_key_rotation(stamen: Any, idp: LocalProvider) -> None:
    h = stamen(auth_provider="oidc", oauth2_issuer=idp.base)
    assert login(h.client).status_code == 302
    idp.key = RSAKey.generate_key(2048, parameters={"kid": "k2"})  # rotated at the provider
    provider = provider_of(h.client.app)  # type: ignore[attr-defined]
    provider._discovered_at -= 120  # type: ignore[union-attr]  # our keys are now stale
    h.client.cookies.clear()
    r = login(h.client)
    assert r.status_code == 302, shown(r)
    assert h.client.get("/whoami").json()["user"] == "dev@corp.com"
