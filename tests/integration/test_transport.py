"""Transport options on a real ``python -m stamen`` process: TLS (with a certificate made
here), a Unix socket, ``--url_prefix`` and ``--xheaders``. Only the in-memory broker is
needed, so these run anywhere."""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import ssl
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from stamen.web.auth import sign_value
from tests.integration.conftest import ROOT, free_port, stop_process, wait_until

SECRET = "transport-test-secret"


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    certfile, keyfile = directory / "cert.pem", directory / "key.pem"
    certfile.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    keyfile.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return certfile, keyfile


class Stamen:
    """One ``python -m stamen`` process with the in-memory broker."""

    def __init__(self, args: list[str], log_path: Path) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        env.pop("FLOWER_UNAUTHENTICATED_API", None)
        self.log_path = log_path
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "stamen", "-b", "memory://", *args],
            env=env,
            cwd=log_path.parent,
            stdout=log_path.open("ab"),
            stderr=subprocess.STDOUT,
        )

    def log(self) -> str:
        return self.log_path.read_text()

    def wait(self, probe: Callable[[], bool]) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"stamen exited: {self.log()}")
            try:
                return probe()
            except httpx.HTTPError:
                return False

        wait_until(ready, timeout=40, what=f"stamen ({self.log_path})")

    def stop(self) -> None:
        stop_process(self.proc)


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Callable[..., Stamen]]:
    started: list[Stamen] = []

    def run(*args: str) -> Stamen:
        process = Stamen(list(args), tmp_path / f"stamen-{len(started)}.log")
        started.append(process)
        return process

    yield run
    for process in started:
        process.stop()


def _session(email: str) -> dict[str, str]:
    return {"user": sign_value(SECRET, "user", email)}


def test_tls(launch: Callable[..., Stamen], tmp_path: Path) -> None:
    certfile, keyfile = make_certificate(tmp_path)
    port = free_port()
    stamen = launch(
        f"--port={port}",
        "--address=127.0.0.1",
        f"--certfile={certfile}",
        f"--keyfile={keyfile}",
        f"--ca_certs={certfile}",
        "--auth=.*@corp.com",
        f"--cookie_secret={SECRET}",
        "--debug",
    )
    base = f"https://127.0.0.1:{port}"
    trust = ssl.create_default_context(cafile=str(certfile))
    stamen.wait(lambda: httpx.get(f"{base}/healthcheck", verify=trust).status_code == 200)
    assert f"Visit me at https://127.0.0.1:{port}" in stamen.log()
    with httpx.Client(base_url=base, verify=trust, cookies=_session("me@corp.com")) as c:
        page = c.get("/workers")
        assert page.status_code == 200
        xsrf = next(h for h in page.headers.get_list("set-cookie") if h.startswith("_xsrf="))
        assert "Secure" in xsrf
        logout = c.get("/logout")
        user_cookie = next(
            h for h in logout.headers.get_list("set-cookie") if h.startswith("user=")
        )
        assert "Secure" in user_cookie and "HttpOnly" in user_cookie
        # Without --xheaders a client cannot claim another address.
        c.get("/healthcheck", headers={"X-Real-Ip": "203.0.113.99"})
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{port}/healthcheck", timeout=5)
    with pytest.raises(httpx.HTTPError):  # our certificate is not trusted by default
        httpx.get(f"{base}/healthcheck", timeout=5)
    wait_until(lambda: "GET /healthcheck" in stamen.log(), timeout=10, what="access log")
    assert "203.0.113.99" not in stamen.log()


def test_unix_socket(launch: Callable[..., Stamen], tmp_path: Path) -> None:
    sock = tmp_path / "stamen.sock"
    stamen = launch(f"--unix_socket={sock}", "--basic_auth=admin:pw")
    transport = httpx.HTTPTransport(uds=str(sock))
    with httpx.Client(transport=transport, base_url="http://stamen") as c:
        stamen.wait(lambda: c.get("/healthcheck").status_code == 200)
        assert stat.S_ISSOCK(sock.stat().st_mode)
        assert c.get("/api/workers").status_code == 401
        assert c.get("/api/workers", auth=("admin", "pw")).status_code == 200
    assert f"Visit me via unix socket file: {sock}" in stamen.log()
    assert "No --cookie_secret given: using a random one" in stamen.log()


def test_url_prefix_and_xheaders(launch: Callable[..., Stamen]) -> None:
    port = free_port()
    stamen = launch(
        f"--port={port}",
        "--address=127.0.0.1",
        "--url_prefix=/flower/",
        "--xheaders",
        "--auth=.*@corp.com",
        f"--cookie_secret={SECRET}",
        "--debug",
    )
    base = f"http://127.0.0.1:{port}"
    stamen.wait(lambda: httpx.get(f"{base}/flower/healthcheck").status_code == 200)
    assert f"Visit me at http://127.0.0.1:{port}/flower/" in stamen.log()
    # Nothing outside the prefix.
    for path in ("/healthcheck", "/workers", "/api/workers", "/login", "/metrics"):
        assert httpx.get(base + path).status_code == 404, path
    # Not logged in: the login redirect keeps the prefix, in the target and in next.
    r = httpx.get(f"{base}/flower/workers?x=1")
    assert r.status_code == 302
    assert r.headers["location"] == "/flower/login?next=%2Fflower%2Fworkers%3Fx%3D1"
    r = httpx.get(f"{base}/flower/api/workers")
    assert r.headers["location"] == "/flower/login?next=%2Fflower%2Fapi%2Fworkers"
    assert httpx.get(f"{base}/flower/metrics").status_code == 200
    with httpx.Client(base_url=base, cookies=_session("me@corp.com")) as c:
        page = c.get("/flower/workers")
        assert page.status_code == 200
        assets = re.findall(r'(?:href|src)="(/[^"]*\.(?:css|js|svg|ico)[^"]*)"', page.text)
        assert assets, "the page links no assets"
        for asset in assets:
            assert asset.startswith("/flower/static/"), asset
            assert c.get(asset).status_code == 200, asset
        links = re.findall(r'href="(/[^"#]*)"', page.text)
        assert all(link.startswith("/flower/") for link in links), links
        assert c.get("/flower/api/workers").status_code == 200
        assert c.get("/flower/api/tasks").status_code == 200
        # --xheaders: the scheme comes from the proxy (Secure cookies) ...
        logout = c.get("/flower/logout", headers={"X-Forwarded-Proto": "https"})
        assert "Secure" in logout.headers["set-cookie"]
        logout = c.get("/flower/logout", headers={"X-Scheme": "https"})
        assert "Secure" in logout.headers["set-cookie"]
        assert "Secure" not in c.get("/flower/logout").headers["set-cookie"]
        # ... and the client address too.
        c.get("/flower/healthcheck", headers={"X-Real-Ip": "203.0.113.7"})
        c.get("/flower/healthcheck", headers={"X-Forwarded-For": "198.51.100.1, 198.51.100.2"})
    wait_until(lambda: "203.0.113.7" in stamen.log(), timeout=10, what="X-Real-Ip in the log")
    wait_until(lambda: "198.51.100.2" in stamen.log(), timeout=10, what="X-Forwarded-For")


def test_login_needs_same_origin_under_prefix(launch: Callable[..., Stamen]) -> None:
    """CSRF checks work behind the prefix: a cross-site POST is refused before auth."""
    port = free_port()
    stamen = launch(f"--port={port}", "--address=127.0.0.1", "--url_prefix=ops", "--basic_auth=a:b")
    base = f"http://127.0.0.1:{port}/ops"
    stamen.wait(lambda: httpx.get(f"{base}/healthcheck").status_code == 200)
    r = httpx.post(
        f"{base}/api/task/revoke/x", auth=("a", "b"), headers={"Origin": "https://evil.example"}
    )
    assert (r.status_code, r.text) == (403, "Cross-origin request forbidden")
    r = httpx.post(f"{base}/api/task/revoke/x", auth=("a", "b"))
    assert r.status_code != 403


def test_oidc_login_through_a_real_process_under_a_prefix(launch: Callable[..., Stamen]) -> None:
    """The whole flow with uvicorn in between: the redirect URI, the cookies and ``next``
    all carry the prefix."""
    from tests.integration.test_oauth_flow import CLIENT_ID, CLIENT_SECRET, LocalProvider

    with LocalProvider() as idp:
        idp.user = {"email": "dev@corp.com", "email_verified": True}
        port = free_port()
        stamen = launch(
            f"--port={port}",
            "--address=127.0.0.1",
            "--url_prefix=flower",
            "--auth=.*@corp.com",
            "--auth_provider=oidc",
            f"--oauth2_issuer={idp.base}",
            f"--oauth2_key={CLIENT_ID}",
            f"--oauth2_secret={CLIENT_SECRET}",
        )
        base = f"http://127.0.0.1:{port}"
        stamen.wait(lambda: httpx.get(f"{base}/flower/healthcheck").status_code == 200)
        with httpx.Client(base_url=base) as browser:
            r = browser.get("/flower/workers")
            assert r.headers["location"] == "/flower/login?next=%2Fflower%2Fworkers"
            r = browser.get(r.headers["location"])
            assert r.status_code == 302 and r.headers["location"].startswith(idp.base)
            back = httpx.get(r.headers["location"])
            assert back.headers["location"].startswith(f"{base}/flower/login?code=")
            r = browser.get(back.headers["location"])
            assert (r.status_code, r.headers["location"]) == (302, "/flower/workers")
            assert browser.get("/flower/workers").status_code == 200
            assert browser.get("/flower/api/workers").status_code == 200
            assert browser.get("/flower/logout").status_code == 200
            browser.cookies.clear()
            assert browser.get("/flower/workers").status_code == 302


def test_flowerconfig_recipe_protects_metrics(
    launch: Callable[..., Stamen], tmp_path: Path
) -> None:
    """Flower's documented flowerconfig.py recipe, unchanged, in a real process (no Tornado
    installed): /metrics asks scrapers for credentials, /healthcheck stays open."""
    conf = tmp_path / "flowerconfig.py"
    conf.write_text(
        "import tornado.web\n"
        "from flower.views.monitor import Metrics\n"
        "Metrics.get = tornado.web.authenticated(Metrics.get)\n"
        "basic_auth = ['prom:s3cret']\n"
    )
    port = free_port()
    stamen = launch(f"--port={port}", "--address=127.0.0.1", f"--conf={conf}")
    base = f"http://127.0.0.1:{port}"
    stamen.wait(lambda: httpx.get(f"{base}/healthcheck").status_code == 200)
    refused = httpx.get(f"{base}/metrics")
    assert refused.status_code == 401
    assert refused.headers["WWW-Authenticate"].startswith("Basic")
    scraped = httpx.get(f"{base}/metrics", auth=("prom", "s3cret"))
    assert scraped.status_code == 200 and "flower_events_ingested_total" in scraped.text
