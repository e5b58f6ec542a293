"""Where a real ``python -m stamen`` process listens, and what stops it from listening:
the default ``--address=''`` on IPv4 and IPv6 (as Flower's Tornado), ``--unix_socket``
over an old socket file or onto a regular file, a port in use, and Flower's
``python -m flower -A proj flower`` form. Only the in-memory broker is needed."""

from __future__ import annotations

import os
import re
import socket
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import ROOT, free_port, stop_process, wait_until
from tests.net import can_bind_ipv6


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLOWER_", "CELERY_"))}
    return {**env, "PYTHONPATH": str(ROOT)}


def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "stamen", *args]


class Process:
    """A ``python -m stamen`` process whose output goes to a log file."""

    def __init__(self, args: list[str], log_path: Path) -> None:
        self.log_path = log_path
        self.proc = subprocess.Popen(
            args,
            env=_env(),
            cwd=log_path.parent,
            stdout=log_path.open("ab"),
            stderr=subprocess.STDOUT,
        )

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_for(self, probe: Callable[[], object], what: str) -> object:
        def ready() -> object:
            if self.proc.poll() is not None:
                raise AssertionError(f"stamen exited with {self.proc.returncode}: {self.log()}")
            try:
                return probe()
            except httpx.HTTPError:
                return None

        return wait_until(ready, timeout=40, what=f"{what} ({self.log_path})")


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Callable[..., Process]]:
    started: list[Process] = []

    def run(*args: str) -> Process:
        process = Process(list(args), tmp_path / f"stamen-{len(started)}.log")
        started.append(process)
        return process

    yield run
    for process in started:
        assert stop_process(process.proc) == 0, process.log()


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        _command(*args), env=_env(), cwd=cwd, capture_output=True, text=True, timeout=60
    )


@pytest.mark.skipif(not can_bind_ipv6("::1"), reason="no IPv6 loopback on this machine")
def test_the_default_address_listens_on_ipv4_and_ipv6(
    launch: Callable[..., Process], tmp_path: Path
) -> None:
    # --port=0: the port is the one the banner reports, the same for both families.
    stamen = launch(*_command("-b", "memory://", "--port=0"))
    found = stamen.wait_for(
        lambda: re.search(r"Visit me at http://127\.0\.0\.1:(\d+)", stamen.log()), "the banner"
    )
    assert isinstance(found, re.Match)
    port = int(found.group(1))
    for base in (f"http://127.0.0.1:{port}", f"http://[::1]:{port}"):
        response = httpx.get(f"{base}/healthcheck", timeout=10)
        assert (response.status_code, response.text) == (200, "OK"), base
    assert f"Listening on 0.0.0.0:{port}, [::]:{port}" in stamen.log()


def test_a_unix_socket_path_that_is_a_regular_file(tmp_path: Path) -> None:
    taken = tmp_path / "x"
    taken.write_text("mine\n")
    result = _run("-b", "memory://", f"--unix_socket={taken}", cwd=tmp_path)
    assert result.returncode == 3, result.stderr
    assert result.stderr.splitlines() == [
        f"stamen: error: invalid value for --unix_socket: {taken} exists and is not a socket"
    ]
    assert taken.read_text() == "mine\n"  # left alone


def test_a_stale_unix_socket_file_is_replaced(
    launch: Callable[..., Process], tmp_path: Path
) -> None:
    sock_path = tmp_path / "stamen.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as old:
        old.bind(str(sock_path))  # what a killed run leaves behind
    assert stat.S_ISSOCK(sock_path.stat().st_mode)
    stamen = launch(*_command("-b", "memory://", f"--unix_socket={sock_path}"))
    transport = httpx.HTTPTransport(uds=str(sock_path))
    with httpx.Client(transport=transport, base_url="http://stamen") as client:
        stamen.wait_for(lambda: client.get("/healthcheck").status_code == 200, "the socket")
    assert stat.S_IMODE(sock_path.stat().st_mode) == 0o777  # Flower's mode
    assert f"Visit me via unix socket file: {sock_path}" in stamen.log()


def test_a_port_in_use_is_one_line_and_status_3(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        for address, where in (("127.0.0.1", "127.0.0.1"), ("", "0.0.0.0")):
            result = _run("-b", "memory://", f"--port={port}", f"--address={address}", cwd=tmp_path)
            assert result.returncode == 3, result.stderr
            assert result.stderr.splitlines() == [
                f"stamen: error: cannot listen on {where}:{port}: Address already in use"
            ]


@pytest.mark.parametrize("word", ["flower", "stamen"])
def test_python_m_stamen_takes_flowers_command_line(
    launch: Callable[..., Process], tmp_path: Path, word: str
) -> None:
    (tmp_path / "proj.py").write_text(
        "from celery import Celery\n"
        "app = Celery('proj', broker='memory://')\n"
        "@app.task(name='proj.hello')\n"
        "def hello():\n"
        "    return 'hi'\n"
    )
    port = free_port()
    # Flower's: python -m flower -A proj flower --port=P
    stamen = launch(*_command("-A", "proj", word, f"--port={port}", "--address=127.0.0.1"))
    base = f"http://127.0.0.1:{port}"
    stamen.wait_for(lambda: httpx.get(f"{base}/healthcheck").status_code == 200, "healthcheck")
    # The -A app, not Celery's default one, whose tasks the banner lists.
    stamen.wait_for(lambda: "proj.hello" in stamen.log(), "the registered tasks")
