"""Custom pages and API routes from ``flowerconfig.py`` (``stamen_routes``), including the
shipped example dashboard, on the in-process app."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest

from stamen.config import ConfigError, load_settings
from tests.factories import lifecycle
from tests.unit.conftest import make_harness

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "deploy" / "examples" / "flowerconfig_custom_page.py"


def config(tmp_path: Path, source: str) -> dict[str, Any]:
    """Settings overrides for ``make_harness`` from a config file, loaded the real way."""
    path = tmp_path / "flowerconfig.py"
    path.write_text(textwrap.dedent(source))
    settings = load_settings([f"--conf={path}"], {}, tmp_path)
    return {"config_namespace": settings.config_namespace, "config_file": settings.config_file}


HELLO = """
    from fastapi import Request

    def stamen_routes(router, services):
        @router.get("/hello")
        async def hello(request: Request):
            return {"page": True, "max_tasks": services.settings.max_tasks}

        @router.get("/api/hello")
        async def api_hello():
            return {"api": True}
"""


def test_routes_from_the_config_file_are_served(tmp_path: Path) -> None:
    for h in make_harness(tmp_path, **config(tmp_path, HELLO)):
        assert h.client.get("/hello").json() == {"page": True, "max_tasks": 100000}
        assert h.client.get("/api/hello").json() == {"api": True}
        # API routes appear in the OpenAPI schema (and so in docs/api.md when shipped).
        assert "/api/hello" in h.client.get("/api/openapi.json").json()["paths"]


def test_extension_routes_are_gated_like_pages_and_the_api(tmp_path: Path) -> None:
    overrides = config(tmp_path, HELLO)
    for h in make_harness(tmp_path, basic_auth=["ann:s3cret"], **overrides):
        page = h.client.get("/hello")
        assert page.status_code == 401
        assert page.headers["www-authenticate"].startswith("Basic")
        assert h.client.get("/api/hello").status_code == 401
        assert h.client.get("/hello", auth=("ann", "s3cret")).status_code == 200
        assert h.client.get("/api/hello", auth=("ann", "s3cret")).status_code == 200
    # Without any authentication the API stays closed unless opted in, as Flower's is.
    (tmp_path / "closed").mkdir()
    for h in make_harness(tmp_path / "closed", unauthenticated_api=False, **overrides):
        assert h.client.get("/hello").status_code == 200
        assert h.client.get("/api/hello").status_code == 401


def test_a_route_may_not_shadow_a_built_in_one(tmp_path: Path) -> None:
    overrides = config(
        tmp_path,
        """
        def stamen_routes(router, services):
            @router.get("/api/workers")
            async def mine():
                return {}
        """,
    )
    with pytest.raises(ConfigError, match=r"adds GET /api/workers, which Stamen already serves"):
        next(make_harness(tmp_path, **overrides))


def test_a_failing_hook_is_a_one_line_config_error(tmp_path: Path) -> None:
    overrides = config(tmp_path, "def stamen_routes(router, services):\n    1 / 0\n")
    with pytest.raises(ConfigError, match=r"error in stamen_routes from .*ZeroDivisionError"):
        next(make_harness(tmp_path, **overrides))
    overrides = config(tmp_path, "stamen_routes = 'not a function'\n")
    with pytest.raises(ConfigError, match="must be a function"):
        next(make_harness(tmp_path, **overrides))


def test_several_hooks_and_no_hook(tmp_path: Path) -> None:
    overrides = config(
        tmp_path,
        """
        def one(router, services):
            router.add_api_route("/one", lambda: 1)

        def two(router, services):
            router.add_api_route("/two", lambda: 2)

        stamen_routes = [one, two]
        """,
    )
    for h in make_harness(tmp_path, **overrides):
        assert h.client.get("/one").json() == 1
        assert h.client.get("/two").json() == 2
    (tmp_path / "plain").mkdir()
    for h in make_harness(tmp_path / "plain"):
        assert h.client.get("/one").status_code == 404


def test_the_example_dashboard(tmp_path: Path) -> None:
    settings = load_settings([f"--conf={EXAMPLE}"], {}, tmp_path)
    overrides = {"config_namespace": settings.config_namespace, "config_file": str(EXAMPLE)}
    for h in make_harness(tmp_path, **overrides):
        h.feed(
            lifecycle("e1", "etl.extract", ts=100.0)
            + lifecycle("e2", "etl.load", ts=200.0, outcome="failed")
            + lifecycle("x1", "other.task", ts=300.0)
        )
        body = h.client.get("/api/family").json()
        assert [t["uuid"] for t in body["tasks"]] == ["e2", "e1"]
        assert body["counts"] == {"FAILURE": 1, "SUCCESS": 1}
        assert [t["uuid"] for t in h.client.get("/api/family?state=FAILURE").json()["tasks"]] == [
            "e2"
        ]

        page = h.client.get("/family")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert "e1" in page.text and "e2" in page.text and "x1" not in page.text
        assert "Task family" in page.text
