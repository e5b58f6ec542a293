"""Throw-away ``redis-server`` and Sentinel instances for integration tests.

Tests that need a differently configured Redis (TLS, a Unix socket, Sentinel, ...) start their
own server here, on a free loopback port in a temp dir, and stop it afterwards; the shared
Redis on 6379 is never touched. Readiness is polled with a deadline, never slept for.

    server = start_redis(tmp_path, "--maxmemory", "10mb")
    try:
        ... server.url ...
    finally:
        server.stop()

Binaries: Debian's ``redis-server`` (package ``redis-server``); Sentinel runs as
``redis-sentinel`` when that exists, else as ``redis-server <conf> --sentinel`` (same program).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

__all__ = [
    "RedisServer",
    "TlsFiles",
    "free_port",
    "make_tls_files",
    "require_binary",
    "start_redis",
    "start_sentinel",
]

READY_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 10.0
#: sun_path is 108 bytes on Linux; pytest's tmp_path can be longer than that.
_MAX_SOCKET_PATH = 100


def require_binary(name: str) -> str:
    """Path of ``name``; skip the test when it is missing (fail instead when ``CI=true``)."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} not found on PATH (Debian package: redis-server)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the caller retries on a clash)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class TlsFiles:
    """A test CA and a server certificate for ``localhost``/``127.0.0.1`` signed by it."""

    ca_cert: Path
    cert: Path
    key: Path


def make_tls_files(directory: Path) -> TlsFiles:
    """Generate a throw-away CA and server certificate with the ``openssl`` CLI."""
    openssl = require_binary("openssl")
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = directory / "ca.key", directory / "ca.crt"
    key, csr, cert = directory / "server.key", directory / "server.csr", directory / "server.crt"
    ext = directory / "server.ext"
    ext.write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    ca = ["-x509", "-days", "2", "-subj", "/CN=stamen-test-ca"]
    sign = ["-CA", ca_cert, "-CAkey", ca_key, "-CAcreateserial", "-days", "2", "-extfile", ext]
    commands = [
        [openssl, "req", *ca, *ec, "-keyout", ca_key, "-out", ca_cert],
        [openssl, "req", *ec, "-keyout", key, "-out", csr, "-subj", "/CN=localhost"],
        [openssl, "x509", "-req", "-in", csr, *sign, "-out", cert],
    ]
    for command in commands:
        subprocess.run([str(c) for c in command], check=True, capture_output=True, timeout=30)
    return TlsFiles(ca_cert=ca_cert, cert=cert, key=key)


@dataclass
class RedisServer:
    """A running ``redis-server`` (or Sentinel) that this test process started."""

    process: subprocess.Popen[bytes]
    port: int
    directory: Path
    log_file: Path
    tls: TlsFiles | None = None
    unix_socket: Path | None = None
    sentinel: bool = False

    @property
    def url(self) -> str:
        """``redis://``, ``rediss://`` (TLS) or ``sentinel://`` URL of the TCP port, db 0."""
        if self.sentinel:
            return f"sentinel://127.0.0.1:{self.port}"
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://127.0.0.1:{self.port}/0"

    @property
    def socket_url(self) -> str:
        """``redis+socket://`` URL (only when started with ``unix_socket=True``)."""
        if self.unix_socket is None:
            raise ValueError("server was started without a unix socket")
        return f"redis+socket://{self.unix_socket}"

    def client(self, **kwargs: Any) -> redis.Redis:
        """A redis-py client for this server's TCP port (TLS verified against the test CA)."""
        options: dict[str, Any] = {"host": "127.0.0.1", "port": self.port}
        if self.tls:
            options |= {"ssl": True, "ssl_ca_certs": str(self.tls.ca_cert)}
        return redis.Redis(**(options | kwargs))

    def log(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM, wait, SIGKILL if it will not go (idempotent)."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(STOP_TIMEOUT_S)
        if self.unix_socket is not None and self.unix_socket.parent != self.directory:
            shutil.rmtree(self.unix_socket.parent, ignore_errors=True)  # see _socket_dir

    def __enter__(self) -> RedisServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _ping(server: RedisServer) -> bool:
    try:
        with server.client(socket_connect_timeout=0.5, socket_timeout=0.5) as client:
            return bool(client.ping())
    except (redis.RedisError, OSError):
        return False


def _wait_ready(server: RedisServer, deadline_s: float = READY_TIMEOUT_S) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(
                f"redis exited with code {server.process.returncode}:\n{server.log()[-3000:]}"
            )
        if _ping(server):
            return
        time.sleep(0.02)  # polling interval, bounded by the deadline above
    server.stop()
    raise RuntimeError(f"redis not ready after {deadline_s}s:\n{server.log()[-3000:]}")


def _socket_dir(directory: Path) -> Path:
    if len(str(directory / "redis.sock")) <= _MAX_SOCKET_PATH:
        return directory
    return Path(tempfile.mkdtemp(prefix="stamen-redis-"))


def start_redis(
    tmp_path: Path,
    *extra_args: str,
    tls: TlsFiles | None = None,
    unix_socket: bool = False,
) -> RedisServer:
    """Start a ``redis-server`` on a free 127.0.0.1 port in a directory under ``tmp_path``.

    No persistence, log to ``<dir>/redis.log``. ``tls`` serves TLS only (``--port 0`` plus
    ``--tls-port``, clients not required to present certificates); ``unix_socket`` also
    listens on ``<dir>/redis.sock``. ``extra_args`` go last, so they may override anything.
    Returns once the server answers ``PING``.
    """
    binary = require_binary("redis-server")
    last_error: Exception | None = None
    for _attempt in range(3):  # a port taken between free_port() and bind: try another one
        port = free_port()
        directory = tmp_path / f"redis-{port}"
        directory.mkdir(parents=True, exist_ok=True)
        log_file = directory / "redis.log"
        args = [binary, "--bind", "127.0.0.1", "--dir", str(directory)]
        args += ["--save", "", "--appendonly", "no", "--daemonize", "no"]
        args += ["--logfile", str(log_file)]
        if tls:
            args += ["--port", "0", "--tls-port", str(port)]
            args += ["--tls-cert-file", str(tls.cert), "--tls-key-file", str(tls.key)]
            args += ["--tls-ca-cert-file", str(tls.ca_cert), "--tls-auth-clients", "no"]
        else:
            args += ["--port", str(port)]
        socket_path = None
        if unix_socket:
            socket_path = _socket_dir(directory) / "redis.sock"
            args += ["--unixsocket", str(socket_path), "--unixsocketperm", "700"]
        args += list(extra_args)
        process = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        server = RedisServer(process, port, directory, log_file, tls, socket_path)
        try:
            _wait_ready(server)
            return server
        except RuntimeError as exc:
            server.stop()
            last_error = exc
    raise RuntimeError(f"could not start redis-server: {last_error}")


def start_sentinel(
    tmp_path: Path, master: RedisServer, master_name: str = "mymaster"
) -> RedisServer:
    """Start a Redis Sentinel on a free port monitoring ``master`` (quorum 1).

    Returns once the sentinel answers ``PING`` and knows the master's address.
    """
    redis_server = require_binary("redis-server")
    sentinel_binary = shutil.which("redis-sentinel")
    last_error: Exception | None = None
    for _attempt in range(3):
        port = free_port()
        directory = tmp_path / f"sentinel-{port}"
        directory.mkdir(parents=True, exist_ok=True)
        log_file = directory / "sentinel.log"
        config = directory / "sentinel.conf"  # Sentinel rewrites its config: it must be writable
        config.write_text(
            f"port {port}\n"
            "bind 127.0.0.1\n"
            f"dir {directory}\n"
            f"logfile {log_file}\n"
            f"sentinel monitor {master_name} 127.0.0.1 {master.port} 1\n"
            f"sentinel down-after-milliseconds {master_name} 5000\n"
        )
        if sentinel_binary:
            args = [sentinel_binary, str(config)]
        else:
            args = [redis_server, str(config), "--sentinel"]
        process = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        server = RedisServer(process, port, directory, log_file, sentinel=True)
        try:
            _wait_ready(server)
            _wait_master_known(server, master_name)
            return server
        except RuntimeError as exc:
            server.stop()
            last_error = exc
    raise RuntimeError(f"could not start redis sentinel: {last_error}")


def _wait_master_known(server: RedisServer, master_name: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    with redis.Redis(host="127.0.0.1", port=server.port, socket_timeout=0.5) as client:
        while time.monotonic() < deadline:
            try:
                if client.execute_command("SENTINEL", "get-master-addr-by-name", master_name):
                    return
            except (redis.RedisError, OSError):
                pass
            time.sleep(0.02)  # polling interval, bounded by the deadline above
    raise RuntimeError(f"sentinel does not know {master_name!r}:\n{server.log()[-3000:]}")
