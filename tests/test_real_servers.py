"""End to end with real servers nobody here wrote: uvicorn, gunicorn, redis-server, PostgreSQL,
nginx, HAProxy and ``websockets``, behind (or in front of) a real fastlb on both twins.

Each scenario asserts what a user of those servers would see through fastlb:
the redis and PostgreSQL benchmarks finish without an error, nginx and gunicorn
see the real client's address through the PROXY protocol, a killed server costs
only the requests it had in flight.  Clients bind to 127.0.0.2, 127.0.0.3, ...
to look like different hosts.  The servers come from ``tests/servers.py``; the
first tests check, without fastlb, the server behaviour the scenarios rely on.
"""

from __future__ import annotations

import socket
import struct

import pytest

from conftest import body_of, http_get, recv_all, status_of
from servers import Servers, http_get_from

GET = b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
PROXY_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


@pytest.fixture
def servers(tmp_path):
    """Start real servers (``tests/servers.py``); each is stopped by its PID when the test ends."""
    made = Servers(tmp_path)
    yield made
    made.stop_all()


def name_of(port: int, path: str = "/") -> bytes:
    response = http_get(port, path, timeout=5)
    assert status_of(response) == 200, response[:200]
    return body_of(response)


def answer_to(port: int, data: bytes, source: str = "127.0.0.1", timeout: float = 5.0) -> bytes:
    """Send ``data`` from ``source`` and read until the server closes; a reset counts as closed."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=(source, 0)) as sock:
        sock.sendall(data)
        try:
            return recv_all(sock, timeout)
        except ConnectionResetError:
            return b""


def proxy_v2(command: int, source: str = "", destination: str = "") -> bytes:
    """A PROXY protocol v2 header: LOCAL (0) without addresses, or PROXY (1) over TCP/IPv4."""
    if command == 0:
        return PROXY_V2_SIGNATURE + bytes([0x20, 0x00]) + struct.pack(">H", 0)
    addresses = socket.inet_aton(source) + socket.inet_aton(destination) + struct.pack(">HH", 40000, 80)
    return PROXY_V2_SIGNATURE + bytes([0x21, 0x11]) + struct.pack(">H", len(addresses)) + addresses


# -- the servers themselves, without fastlb -------------------------------------------


def test_nginx_answers_the_proxy_header_address_and_takes_the_probe_headers(servers):
    nginx = servers.nginx_proxy()
    assert body_of(answer_to(nginx.port, b"PROXY TCP4 127.0.0.9 127.0.0.1 5000 80\r\n" + GET)) == b"127.0.0.9\n"
    assert body_of(answer_to(nginx.port, proxy_v2(1, "127.0.0.8", "127.0.0.1") + GET)) == b"127.0.0.8\n"
    # What fastlb's probes send with --send-proxy: a header without a client.
    for header in (b"PROXY UNKNOWN\r\n", proxy_v2(0)):
        response = answer_to(nginx.port, header + GET.replace(b"/ ", b"/health "))
        assert status_of(response) == 200 and body_of(response) == b"\n", (header, response)
    # Without a header nginx closes the connection and logs no request.
    logged = len(nginx.requests())
    assert answer_to(nginx.port, GET) == b""
    assert len(nginx.requests()) == logged == 4
    assert "broken header" in nginx.output()


def test_haproxy_passes_the_client_address_on_in_a_v2_header(servers):
    nginx = servers.nginx_proxy()
    haproxy = servers.haproxy(nginx.port, "send-proxy-v2")
    assert body_of(http_get_from("127.0.0.4", haproxy.port)) == b"127.0.0.4\n"


def test_gunicorn_takes_remote_addr_from_a_v1_header_and_refuses_proxy_unknown(servers):
    app = servers.gunicorn_proxy("v1")
    assert body_of(answer_to(app.port, b"PROXY TCP4 127.0.0.3 127.0.0.1 5000 80\r\n" + GET)) == b"127.0.0.3\n"
    # gunicorn wants six fields in a v1 line: the client-less header that an
    # HTTP probe would send is a 400, so gunicorn gets tcp checks below.
    assert status_of(answer_to(app.port, b"PROXY UNKNOWN\r\n" + GET)) == 400


def test_uvicorn_app_answers_its_name_and_the_health_status_it_was_given(servers):
    healthy, sick = servers.uvicorn("A", wait=False), servers.uvicorn("S", health_status=503, wait=False)
    for app in (healthy, sick):
        app.wait_ready()
    assert name_of(healthy.port) == name_of(healthy.port, "/who") == b"A"
    assert status_of(http_get(healthy.port, "/health", timeout=5)) == 200
    assert name_of(sick.port) == b"S"
    assert status_of(http_get(sick.port, "/health", timeout=5)) == 503
