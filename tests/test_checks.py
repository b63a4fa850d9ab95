"""The probe kinds against real sockets: what each sends and how it judges the answer (SPEC §7).

``--check http`` asks for ``--check-path`` and judges the status by
``--check-status`` and the body by ``--check-expect``; ``--check tcp`` connects
and, with ``--check-send``/``--check-expect``, holds a tiny exchange;
``--check none`` never opens a connection.  Each backend below is a real
listening socket that records exactly what the probe sent.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest

from conftest import wait_until
from faults import refused_port
from fastlb import checks
from fastlb.checks import MAX_CHECK_ANSWER, probe, probe_many
from fastlb.settings import Address

PROXY_V1_UNKNOWN = b"PROXY UNKNOWN\r\n"
PROXY_V2_LOCAL = b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00"

# How long a test server waits for anything: far longer than any probe here.
SERVER_TIMEOUT = 10.0


def http_request_complete(data: bytes) -> bool:
    """The probe's HTTP request has arrived (a v2 header's signature also holds CRLFCRLF)."""
    return b" HTTP/1.1\r\n" in data and data.endswith(b"\r\n\r\n")


def line_complete(data: bytes) -> bool:
    return data.endswith(b"\r\n")


def never(data: bytes) -> bool:
    return False


def endless(conn: socket.socket) -> None:
    """Send bytes without end, until the probe goes away."""
    chunk = b"x" * 65536
    while True:
        conn.sendall(chunk)


class Responder:
    """A backend for one probe: reads until ``ready(received)`` (or EOF), then plays ``script``.

    ``script`` items are bytes to send, a float to pause for (so that pieces
    arrive in separate reads), or a callable taking the connection.  Then it
    closes, or with ``hold`` waits for the probe to close first.  Everything
    the probe sent, up to its EOF, is in ``received``.
    """

    def __init__(self, ready=http_request_complete, script=(), hold: bool = False):
        self.ready, self.script, self.hold = ready, list(script), hold
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.received = b""
        self.connections = 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.sock.settimeout(SERVER_TIMEOUT)
        try:
            conn, _ = self.sock.accept()
        except OSError:
            self.done.set()
            return
        self.connections += 1
        with conn:
            conn.settimeout(SERVER_TIMEOUT)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                eof = self._read(conn, self.ready)
                if not eof:
                    for item in self.script:
                        if isinstance(item, bytes):
                            conn.sendall(item)
                        elif isinstance(item, float):
                            time.sleep(item)
                        else:
                            item(conn)
                    if self.hold:
                        self._read(conn, never)
            except OSError:
                pass
        self.done.set()

    def _read(self, conn: socket.socket, ready) -> bool:
        """Read into ``received`` until ``ready`` says so; True at EOF."""
        while not ready(self.received):
            chunk = conn.recv(65536)
            if not chunk:
                return True
            self.received += chunk
        return False

    def address(self, **settings) -> Address:
        return Address("127.0.0.1", self.port, "127.0.0.1").with_settings(settings)

    def wait_done(self) -> None:
        assert self.done.wait(SERVER_TIMEOUT), "the test server never finished"

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def responder():
    made: list[Responder] = []

    def make(*args, **kwargs) -> Responder:
        server = Responder(*args, **kwargs)
        made.append(server)
        return server

    yield make
    for server in made:
        server.close()


def http_answer(status: str, body: bytes = b"", headers: bytes = b"") -> bytes:
    return (b"HTTP/1.1 %s\r\nContent-Length: %d\r\n%sConnection: close\r\n\r\n%s"
            % (status.encode(), len(body), headers, body))


def not_accepted(listener: socket.socket) -> bool:
    """Nobody connected to ``listener`` (a connection, even closed, would wait to be accepted)."""
    listener.setblocking(False)
    try:
        conn, _ = listener.accept()
    except BlockingIOError:
        return True
    conn.close()
    return False


@pytest.fixture
def silent_listener():
    """A listening socket that never accepts: it shows whether anything connected to it."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    yield sock
    sock.close()


# -- http --------------------------------------------------------------------------


def test_http_check_requests_the_check_path_with_a_host_header(responder):
    server = responder(script=[http_answer("200 OK", b"fine\n")])
    address = server.address(check="http", check_path="/ready?probe=1")
    assert probe(address, 5) == ((), "ok (status 200)")
    server.wait_done()
    request = server.received.decode()
    assert request.startswith("GET /ready?probe=1 HTTP/1.1\r\n")
    assert "\r\nHost: 127.0.0.1:%d\r\n" % server.port in request
    assert request.endswith("\r\n\r\n")


@pytest.mark.parametrize(
    "status, ranges, verdict",
    [
        ("204 No Content", "200,204", ((), "ok (status 204)")),
        ("200 OK", "200,204", ((), "ok (status 200)")),
        ("205 Reset Content", "200,204", (None, "status 205")),
        ("301 Moved Permanently", "200-399", ((), "ok (status 301)")),
        ("404 Not Found", "200-399", (None, "status 404")),
        ("500 Internal Server Error", "200-399", (None, "status 500")),
        ("503 Service Unavailable", "200-299,503", ((), "ok (status 503)")),
    ],
)
def test_http_check_is_healthy_exactly_when_the_status_is_in_the_check_status_ranges(
        responder, status, ranges, verdict):
    server = responder(script=[http_answer(status)])
    assert probe(server.address(check="http", check_status=ranges), 5) == verdict


def test_http_check_accepts_any_2xx_or_3xx_status_by_default(responder):
    server = responder(script=[http_answer("302 Found", headers=b"Location: /login\r\n")])
    assert probe(server.address(check="http"), 5) == ((), "ok (status 302)")


def test_http_check_expect_finds_the_text_in_the_body(responder):
    server = responder(script=[http_answer("200 OK", b'{"status": "ready", "db": "up"}')])
    assert probe(server.address(check="http", check_expect='"db": "up"'), 5) == \
        ((), "ok (status 200)")


def test_http_check_expect_finds_text_split_over_several_pieces_of_the_body(responder):
    head = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n"
    server = responder(script=[head, 0.05, b"all systems op", 0.05, b"erational\n"])
    assert probe(server.address(check="http", check_expect="operational"), 5) == \
        ((), "ok (status 200)")


def test_http_check_expect_missing_from_the_body_fails_and_says_so(responder):
    server = responder(script=[http_answer("200 OK", b"status: degraded\n")])
    assert probe(server.address(check="http", check_expect="status: ok"), 5) == \
        (None, "expected 'status: ok' not in the body (status 200)")


def test_http_check_expect_text_that_is_only_in_the_headers_does_not_count(responder):
    server = responder(script=[http_answer("200 OK", b"nope\n", headers=b"X-Ready: yes\r\n")])
    assert probe(server.address(check="http", check_expect="X-Ready: yes"), 5) == \
        (None, "expected 'X-Ready: yes' not in the body (status 200)")


def test_http_check_expect_is_not_judged_when_the_status_is_wrong(responder):
    server = responder(script=[http_answer("500 Oops", b"ready\n")])
    assert probe(server.address(check="http", check_expect="ready"), 5) == (None, "status 500")


@pytest.mark.parametrize("answer", [b"hello there\r\n\r\n", b"HTTP/1.1 2x0 OK\r\n\r\n",
                                    b"SSH-2.0-OpenSSH_9.6\r\n"])
def test_http_check_garbled_status_line_fails(responder, answer):
    server = responder(script=[answer])
    assert probe(server.address(check="http"), 5) == (None, "malformed status line")


def test_http_check_without_an_answer_fails_at_the_timeout(responder):
    server = responder(hold=True)
    started = time.monotonic()
    assert probe(server.address(check="http"), 1.0) == \
        (None, "timeout (no complete answer within 1s)")
    assert 0.9 <= time.monotonic() - started < 3.0


def test_http_check_of_a_closed_port_fails_as_refused():
    address = Address("127.0.0.1", refused_port(), "127.0.0.1").with_settings({"check": "http"})
    assert probe(address, 5) == (None, "connection refused")


# -- tcp ---------------------------------------------------------------------------


def test_tcp_check_without_send_is_healthy_on_connect_and_sends_nothing(responder):
    server = responder(ready=never)
    assert probe(server.address(check="tcp"), 5) == ((), "ok (connected)")
    server.wait_done()
    assert server.connections == 1 and server.received == b""


def test_tcp_check_of_a_closed_port_fails_as_refused():
    address = Address("127.0.0.1", refused_port(), "127.0.0.1").with_settings({"check": "tcp"})
    assert probe(address, 5) == (None, "connection refused")


REDIS_LIKE = dict(check="tcp", check_send="PING\\r\\n", check_expect="+PONG")


def test_tcp_check_send_and_expect_against_a_redis_like_server(responder):
    server = responder(ready=line_complete, script=[b"+PONG\r\n"], hold=True)
    assert probe(server.address(**REDIS_LIKE), 5) == ((), "ok")
    server.wait_done()
    assert server.received == b"PING\r\n"


def test_tcp_check_wrong_answer_fails_and_says_what_was_expected(responder):
    server = responder(ready=line_complete, script=[b"-NOAUTH Authentication required.\r\n"])
    assert probe(server.address(**REDIS_LIKE), 5) == \
        (None, "expected '+PONG' not in the answer (34 bytes)")


def test_tcp_check_answer_split_over_several_reads_is_found(responder):
    server = responder(ready=line_complete, script=[b"+P", 0.05, b"ON", 0.05, b"G\r\n"], hold=True)
    assert probe(server.address(**REDIS_LIKE), 5) == ((), "ok")


def test_tcp_check_server_closing_without_the_text_fails(responder):
    server = responder(ready=line_complete, script=[])
    assert probe(server.address(**REDIS_LIKE), 5) == \
        (None, "expected '+PONG' not in the answer (0 bytes)")


def test_tcp_check_server_that_never_answers_fails_at_the_timeout(responder):
    server = responder(ready=line_complete, hold=True)
    started = time.monotonic()
    assert probe(server.address(**REDIS_LIKE), 1.0) == \
        (None, "timeout (no complete answer within 1s)")
    assert 0.9 <= time.monotonic() - started < 3.0
    server.wait_done()
    assert server.received == b"PING\r\n"


def test_tcp_check_expect_without_send_waits_for_the_servers_banner(responder):
    server = responder(ready=lambda data: True, script=[b"SSH-2.0-OpenSSH_9.6\r\n"], hold=True)
    assert probe(server.address(check="tcp", check_expect="SSH-2.0-"), 5) == ((), "ok")
    server.wait_done()
    assert server.received == b""


def test_tcp_check_expect_without_send_fails_on_another_banner(responder):
    server = responder(ready=lambda data: True, script=[b"220 mail.example ESMTP\r\n"])
    assert probe(server.address(check="tcp", check_expect="SSH-2.0-"), 5) == \
        (None, "expected 'SSH-2.0-' not in the answer (24 bytes)")


def test_tcp_check_send_takes_hex_escapes(responder):
    server = responder(ready=lambda data: len(data) >= 3, script=[b"\x00\xffok"], hold=True)
    assert probe(server.address(check="tcp", check_send="\\x01\\x02\\x03",
                                check_expect="\\xffok"), 5) == ((), "ok")
    server.wait_done()
    assert server.received == b"\x01\x02\x03"


# -- answers without end ---------------------------------------------------------------


class RecordingProbe(checks.Probe):
    """A Probe that remembers itself, so a test can look at what it kept."""

    made: list = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        RecordingProbe.made.append(self)


@pytest.fixture
def recorded_probes(monkeypatch):
    RecordingProbe.made = []
    monkeypatch.setattr(checks, "Probe", RecordingProbe)
    return RecordingProbe.made


def test_tcp_check_endless_answer_without_the_text_fails_at_the_read_limit(responder, recorded_probes):
    server = responder(ready=line_complete, script=[endless])
    result, reason = probe(server.address(**REDIS_LIKE), 5)
    assert result is None
    assert reason in ("expected '+PONG' not in the answer (%d bytes)" % n
                      for n in (MAX_CHECK_ANSWER, MAX_CHECK_ANSWER + 1)), reason
    [one] = recorded_probes
    assert len(one.answer) <= MAX_CHECK_ANSWER + 1


def test_http_check_endless_body_without_the_text_fails_at_the_read_limit(responder, recorded_probes):
    head = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n"
    server = responder(script=[head, endless])
    started = time.monotonic()
    assert probe(server.address(check="http", check_expect="ready"), 5) == \
        (None, "expected 'ready' not in the body (status 200)")
    # Judged at the limit, not at the timeout.
    assert time.monotonic() - started < 4
    [one] = recorded_probes
    assert len(one.answer) <= MAX_CHECK_ANSWER + 1


# -- --check-port ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["http", "tcp", "load"])
def test_check_port_is_probed_instead_of_the_traffic_port(responder, silent_listener, kind):
    answers = {"http": http_answer("200 OK"), "load": http_answer("200 OK", b"0\n3\n")}
    ready = never if kind == "tcp" else http_request_complete
    checked = responder(ready=ready, script=[answers.get(kind, b"")])
    traffic_port = silent_listener.getsockname()[1]
    address = Address("127.0.0.1", traffic_port, "127.0.0.1").with_settings(
        {"check": kind, "check_port": checked.port})
    result, reason = probe(address, 5)
    assert result is not None, reason
    checked.wait_done()
    assert checked.connections == 1
    assert not_accepted(silent_listener), "the probe went to the traffic port"
    if kind != "tcp":
        # The Host header still names the service, on its traffic port.
        assert b"\r\nHost: 127.0.0.1:%d\r\n" % traffic_port in checked.received


# -- backends that take the PROXY protocol -------------------------------------------------


@pytest.mark.parametrize("version, header", [("v1", PROXY_V1_UNKNOWN), ("v2", PROXY_V2_LOCAL)])
@pytest.mark.parametrize("kind", ["http", "load"])
def test_probe_of_a_send_proxy_backend_starts_with_an_address_less_header(
        responder, version, header, kind):
    body = b"0\n0\n" if kind == "load" else b""
    server = responder(script=[http_answer("200 OK", body)])
    result, reason = probe(server.address(check=kind, send_proxy=version), 5)
    assert result is not None, reason
    server.wait_done()
    assert server.received.startswith(header + b"GET /healthcheck HTTP/1.1\r\n"), server.received
    assert server.received.count(b"PROXY") + server.received.count(b"QUIT") == 1


@pytest.mark.parametrize("version, header", [("v1", PROXY_V1_UNKNOWN), ("v2", PROXY_V2_LOCAL)])
def test_tcp_send_probe_of_a_send_proxy_backend_sends_the_header_then_its_bytes(
        responder, version, header):
    server = responder(ready=lambda data: data.endswith(b"PING\r\n"), script=[b"+PONG\r\n"], hold=True)
    assert probe(server.address(send_proxy=version, **REDIS_LIKE), 5) == ((), "ok")
    server.wait_done()
    assert server.received == header + b"PING\r\n"


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_probe_to_another_check_port_carries_no_proxy_header(responder, silent_listener, version):
    checked = responder(script=[http_answer("200 OK")])
    address = Address("127.0.0.1", silent_listener.getsockname()[1], "127.0.0.1").with_settings(
        {"check": "http", "check_port": checked.port, "send_proxy": version})
    assert probe(address, 5) == ((), "ok (status 200)")
    checked.wait_done()
    assert checked.received.startswith(b"GET /healthcheck HTTP/1.1\r\n"), checked.received


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_connect_only_tcp_probe_of_a_send_proxy_backend_sends_nothing_at_all(responder, version):
    server = responder(ready=never)
    assert probe(server.address(check="tcp", send_proxy=version), 5) == ((), "ok (connected)")
    server.wait_done()
    assert server.connections == 1 and server.received == b""


# -- none, and several kinds at once ---------------------------------------------------------


def test_check_none_is_healthy_without_opening_a_connection(silent_listener):
    listening = Address("127.0.0.1", silent_listener.getsockname()[1], "127.0.0.1")
    refused = Address("127.0.0.1", refused_port(), "127.0.0.1")
    results = probe_many([a.with_settings({"check": "none"}) for a in (listening, refused)], 5)
    assert results == {listening.name: ((), "no health check", None),
                       refused.name: ((), "no health check", None)}
    assert not_accepted(silent_listener), "a --check none backend was connected to"


def test_probe_many_judges_each_backend_by_its_own_check(responder, silent_listener):
    web = responder(script=[http_answer("503 Service Unavailable")])
    cache = responder(ready=line_complete, script=[b"+PONG\r\n"], hold=True)
    plain = responder(ready=never)
    reporting = responder(script=[http_answer("200 OK", b"1\n7\n")])
    unchecked = Address("127.0.0.1", silent_listener.getsockname()[1], "127.0.0.1")
    addresses = [web.address(check="http"), cache.address(**REDIS_LIKE),
                 plain.address(check="tcp"), reporting.address(check="load"),
                 unchecked.with_settings({"check": "none"})]
    results = {name: (result, reason) for name, (result, reason, _) in probe_many(addresses, 5).items()}
    assert results == {
        addresses[0].name: (None, "status 503"),
        addresses[1].name: ((), "ok"),
        addresses[2].name: ((), "ok (connected)"),
        addresses[3].name: ((1, 7), "ok"),
        addresses[4].name: ((), "no health check"),
    }
    assert not_accepted(silent_listener)
    for server in (web, cache, plain, reporting):
        wait_until(server.done.is_set, 5, message="the probe of port %d to end" % server.port)
