"""The API and page gates: Flower's rules (spec 4.0, 7.1), hashed passwords, bearer tokens."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import bcrypt
import pytest
from argon2 import PasswordHasher
from fastapi import Depends, Request

from stamen.config import load_settings
from stamen.web.gate import UNAUTHENTICATED_MESSAGE, page_user
from stamen.web.roles import Identity
from tests.unit.conftest import AppHarness, many_harnesses

PageUser = Annotated[Identity, Depends(page_user)]


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def add_page(harness: AppHarness) -> None:
    """A stand-in UI page guarded by ``page_user``."""

    async def page(request: Request, user: PageUser) -> dict[str, Any]:
        return {"user": user.name, "role": user.role, "state_user": request.state.user}

    harness.client.app.add_api_route("/testpage", page, methods=["GET"])  # type: ignore[attr-defined]


@pytest.fixture
def app_factory(tmp_path: Path) -> Iterator[Any]:
    with many_harnesses(tmp_path, add_page) as build:
        yield build


def test_no_auth_closes_the_api_without_the_variable(app_factory: Any) -> None:
    h = app_factory(unauthenticated_api=False)
    r = h.client.get("/api/workers")
    assert r.status_code == 401
    assert r.text == UNAUTHENTICATED_MESSAGE
    assert r.headers["content-type"].startswith("text/plain")
    assert h.client.get("/testpage").json()["role"] == "admin"  # pages stay open
    assert h.client.get("/healthcheck").status_code in (200, 503)
    assert h.client.get("/metrics").status_code == 200


def test_no_auth_with_the_variable_opens_the_api(app_factory: Any) -> None:
    h = app_factory(unauthenticated_api=True)
    assert h.client.get("/api/workers").status_code == 200


def test_basic_auth_several_users(app_factory: Any) -> None:
    h = app_factory(basic_auth=["alice:wonder", "bob:builder"], unauthenticated_api=False)
    r = h.client.get("/api/workers")
    assert (r.status_code, r.text) == (401, "")
    assert "www-authenticate" not in r.headers
    assert h.client.get("/api/workers", headers=basic("alice", "wonder")).status_code == 200
    assert h.client.get("/api/workers", headers=basic("bob", "builder")).status_code == 200
    assert h.client.get("/api/workers", headers=basic("bob", "wonder")).status_code == 401
    assert h.client.get("/api/workers", headers=basic("alice", "wonder2")).status_code == 401
    assert h.client.get("/api/workers", headers={"Authorization": "Basic %%%"}).status_code == 401
    assert h.client.get("/metrics").status_code == 200


def test_basic_auth_page_challenge(app_factory: Any) -> None:
    h = app_factory(basic_auth=["alice:wonder"])
    r = h.client.get("/testpage")
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == 'Basic realm="flower"'
    assert r.text == "Access denied"
    r = h.client.get("/testpage", headers=basic("alice", "wonder"))
    assert r.json() == {"user": "alice", "role": "admin", "state_user": "alice"}


def test_non_ascii_credentials_are_no_500(app_factory: Any) -> None:
    # Flower answers 500 to every login once one configured password is not ASCII.
    h = app_factory(basic_auth=["user:pässword", "u2:p2"])
    assert h.client.get("/testpage", headers=basic("u2", "p2")).status_code == 200
    assert h.client.get("/testpage", headers=basic("user", "pässword")).status_code == 200
    assert h.client.get("/testpage", headers=basic("user", "pässwörd")).status_code == 401


def test_bcrypt_and_argon2_hashes(app_factory: Any) -> None:
    bhash = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(rounds=4)).decode()
    ahash = PasswordHasher(time_cost=1, memory_cost=1024).hash("hunter2")
    h = app_factory(basic_auth=[f"carol:{bhash}", f"dave:{ahash}"])
    assert h.client.get("/testpage", headers=basic("carol", "s3cret")).status_code == 200
    assert h.client.get("/testpage", headers=basic("carol", "s3cret")).status_code == 200  # cached
    assert h.client.get("/testpage", headers=basic("carol", "wrong")).status_code == 401
    assert h.client.get("/testpage", headers=basic("nobody", "s3cret")).status_code == 401
    assert h.client.get("/testpage", headers=basic("dave", "hunter2")).status_code == 200
    assert h.client.get("/testpage", headers=basic("dave", "hunter3")).status_code == 401
    # The hash itself is not a password.
    assert h.client.get("/testpage", headers=basic("carol", bhash)).status_code == 401


def test_argon2_hash_survives_the_comma_split(tmp_path: Path) -> None:
    ahash = PasswordHasher(time_cost=1, memory_cost=1024).hash("x")
    assert "," in ahash
    settings = load_settings([f"--basic_auth=a:{ahash},b:plain"], {}, tmp_path)
    assert settings.basic_auth == [f"a:{ahash}", "b:plain"]


def test_bearer_tokens(app_factory: Any) -> None:
    digest = hashlib.sha256(b"hashed-token").hexdigest()
    h = app_factory(
        basic_auth=["alice:wonder"],
        api_tokens=["ci:plain-token:operator", f"grafana:sha256:{digest}:viewer", "bot:tok3"],
    )
    ok = h.client.get("/testpage", headers={"Authorization": "Bearer plain-token"})
    assert ok.json() == {"user": "ci", "role": "operator", "state_user": "ci"}
    ok = h.client.get("/testpage", headers={"Authorization": "Bearer hashed-token"})
    assert ok.json()["role"] == "viewer"
    assert (
        h.client.get("/testpage", headers={"Authorization": "Bearer tok3"}).json()["role"]
        == "admin"
    )
    r = h.client.get("/api/workers", headers={"Authorization": "Bearer nope"})
    assert (r.status_code, r.text) == (401, "Invalid API token")
    assert (
        h.client.get("/api/workers", headers={"Authorization": "Bearer plain-token"}).status_code
        == 200
    )


def test_bearer_tokens_without_other_auth(app_factory: Any) -> None:
    h = app_factory(api_tokens=["ci:tok"], unauthenticated_api=False)
    assert h.client.get("/api/workers").text == UNAUTHENTICATED_MESSAGE
    assert h.client.get("/api/workers", headers={"Authorization": "Bearer tok"}).status_code == 200


def test_bad_api_tokens_option(tmp_path: Path) -> None:
    from stamen.config import ConfigError

    with pytest.raises(ConfigError, match="api_tokens"):
        load_settings(["--api_tokens=justaname"], {}, tmp_path)
    with pytest.raises(ConfigError) as info:
        load_settings(["--api_tokens=x:sha256:zz"], {}, tmp_path)
    assert "zz" not in str(info.value) or "hex" in str(info.value)
