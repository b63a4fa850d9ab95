"""The admin endpoint bounds what a client can hold: idle connections time out, and only so many at once."""

from __future__ import annotations

import errno
import socket
import time
import urllib.request

import pytest

from conftest import wait_until
from fastlb.admin import ACCEPT_PAUSE, AdminServer


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


def test_out_of_descriptors_the_admin_endpoint_pauses_its_accepts_instead_of_spinning(admin, monkeypatch):
    # Measured in docs/reliability.md (fdlimit): with every descriptor taken,
    # one admin client waiting in the listen backlog kept the listener
    # readable, accept() failed with EMFILE at once, and http.server's loop
    # tried again at once: half a core spent while fastlb was saturated.
    server = admin()
    listener = server.httpd.socket
    attempts = []
    accept = socket.socket.accept

    def failing_accept(sock):
        if sock is listener:
            attempts.append(time.monotonic())
            raise OSError(errno.EMFILE, "Too many open files")
        return accept(sock)

    monkeypatch.setattr(socket.socket, "accept", failing_accept)
    with socket.create_connection(("127.0.0.1", server.port), timeout=5):
        wait_until(lambda: len(attempts) >= 4, 5, message="accept attempts")
    monkeypatch.undo()
    # A pause is a lower bound: a busy machine only stretches the gaps.
    gaps = [later - earlier for earlier, later in zip(attempts, attempts[1:4])]
    assert min(gaps) >= ACCEPT_PAUSE * 0.9, gaps
    assert healthz(server.port) == 200
