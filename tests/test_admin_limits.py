"""The admin endpoint bounds what a client can hold: idle connections time out, and only so many at once."""

from __future__ import annotations

import socket
import urllib.request

import pytest

from conftest import wait_until
from fastlb.admin import AdminServer


def fake_stats() -> dict:
    return {"state": "running"}


@pytest.fixture
def admin():
    made = []

    def make(**kwargs) -> AdminServer:
        server = AdminServer("127.0.0.1:0", fake_stats, **kwargs)
        server.start()
        made.append(server)
        return server

    yield make
    for server in made:
        server.stop()


def closed_by_server(sock: socket.socket, timeout: float) -> bool:
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def healthz(port: int) -> int:
    with urllib.request.urlopen("http://127.0.0.1:%d/healthz" % port, timeout=5) as answer:
        return answer.status


def test_an_idle_admin_connection_is_closed_after_the_timeout(admin):
    server = admin(timeout=0.5)
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as idle:
        assert closed_by_server(idle, 5)
    assert healthz(server.port) == 200


def test_connections_beyond_the_limit_are_closed_at_once_and_served_again_later(admin):
    server = admin(timeout=1.0, max_connections=4)
    idle = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(4)]
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as extra:
            assert closed_by_server(extra, 2)
        assert server.refused >= 1
        # The idle ones time out and free their slots.
        for sock in idle:
            assert closed_by_server(sock, 5)
        wait_until(lambda: healthz(server.port) == 200, 5, message="a slot to free up")
    finally:
        for sock in idle:
            sock.close()
