"""Login sessions across instances behind a load balancer: real ``stamen`` processes.

Instances A and B share ``--cookie_secret`` and the public ``--oauth2_redirect_uri`` (the
balancer's address), C has another secret. A login started on A whose callback the balancer
sends to B completes there (B accepts A's signed ``oauth_state`` cookie); the session cookie
B sets is accepted by A; C refuses it (sends the browser to log in, as without a cookie).
The provider is the loopback OIDC provider of test_oauth_flow.py; the browser is played by
hand, and cookies are passed explicitly because a cookie jar ignores ports.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote, urlsplit

import httpx
import pytest

from tests.integration.conftest import StamenProcess, cluster_env
from tests.integration.servers import start_redis
from tests.integration.test_oauth_flow import CLIENT_ID, CLIENT_SECRET, LocalProvider

pytestmark = pytest.mark.integration

#: The load balancer's address, as the provider redirects to it; never contacted.
PUBLIC = "http://stamen.lb.invalid"


@pytest.fixture
def idp() -> Iterator[LocalProvider]:
    with LocalProvider() as provider:
        provider.user = {"email": "dev@corp.com", "email_verified": True}
        yield provider


def instance(env: dict[str, str], idp: LocalProvider, secret: str, log: Path) -> StamenProcess:
    args = [
        "-A", "tests.integration.celeryapp", "--enable_events=False",
        "--auth=.*@corp.com", "--auth_provider=oidc", f"--oauth2_issuer={idp.base}",
        f"--oauth2_key={CLIENT_ID}", f"--oauth2_secret={CLIENT_SECRET}",
        f"--oauth2_redirect_uri={PUBLIC}/login", f"--cookie_secret={secret}",
    ]  # fmt: skip
    return StamenProcess(args, env).start(log)


def sent_to_login(response: httpx.Response) -> bool:
    return response.status_code == 302 and response.headers["location"].startswith("/login")


def cookie_header(response: httpx.Response) -> str:
    """The cookies ``response`` sets, as a browser would send them back."""
    return "; ".join(f"{c.name}={c.value}" for c in response.cookies.jar if c.value)


def test_a_session_made_on_one_instance_is_accepted_by_another(
    tmp_path: Path, logs_dir: Path, idp: LocalProvider
) -> None:
    redis = start_redis(tmp_path)
    base = redis.url.rsplit("/", 1)[0]
    env = cluster_env(f"{base}/0", f"{base}/1", "sessions")
    env.pop("FLOWER_UNAUTHENTICATED_API")
    started: list[StamenProcess] = []
    try:
        for name, secret in (("a", "shared-secret"), ("b", "shared-secret"), ("c", "other")):
            started.append(instance(env, idp, secret, logs_dir / f"stamen-session-{name}.log"))
        a, b, c = started

        # Before logging in, nothing is served.
        assert sent_to_login(a.get("/api/tasks"))

        begin = a.get(f"/login?next={quote('/tasks', safe='')}")
        assert begin.status_code == 302, begin.text
        at_provider = httpx.get(begin.headers["location"], follow_redirects=False)
        callback = urlsplit(at_provider.headers["location"])
        assert f"{callback.scheme}://{callback.netloc}" == PUBLIC
        # The balancer sends the callback to B, which never saw the login start.
        finish = b.get(
            f"{callback.path}?{callback.query}", headers={"Cookie": cookie_header(begin)}
        )
        assert (finish.status_code, finish.headers.get("location")) == (302, "/tasks"), finish.text
        session = cookie_header(finish)
        assert session.startswith("user=")

        for accepted in (a, b):
            response = accepted.get("/api/tasks", headers={"Cookie": session})
            assert response.status_code == 200, (accepted.url, response.text)
            assert accepted.get("/tasks", headers={"Cookie": session}).status_code == 200

        assert sent_to_login(c.get("/api/tasks", headers={"Cookie": session}))
        assert sent_to_login(c.get("/tasks", headers={"Cookie": session}))
        # C cannot finish a login A started either: it cannot read A's state cookie.
        again = a.get("/login")
        back = urlsplit(httpx.get(again.headers["location"]).headers["location"])
        denied = c.get(f"{back.path}?{back.query}", headers={"Cookie": cookie_header(again)})
        assert denied.status_code == 403 and "State tokens do not match" in denied.text
    finally:
        for stamen in started:
            stamen.stop()
        redis.stop()
