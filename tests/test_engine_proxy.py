"""The PROXY protocol in the relay engine, on both twins: --accept-proxy and --send-proxy.

With ``accept_proxy`` every client must open with a v1 or v2 header: the engine
takes the header off (the backend never sees it), hands its source address to
the router, and closes a client that sends anything else without contacting a
backend.  A route whose fifth element is 1 or 2 makes the engine send the
backend a header of that version, carrying the client's address, before the
client's first byte.  The engine is driven directly, as in test_engine.py,
with real sockets on 127.0.0.0/8 and backends that record what they got.
"""

from __future__ import annotations

import hashlib
import os
import socket
import struct
import threading
import time

import pytest

from conftest import recv_all, wait_until
from faults import refused_port
from fastlb.bridge import parse_proxy_header

CLIENT_HOST = "127.0.0.2"    # the test client looks like another host
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_LOCAL = V2_SIGNATURE + b"\x20\x00\x00\x00"


def v2_inet(source: tuple, destination: tuple) -> bytes:
    """A v2 PROXY/TCP over IPv4 header, built by hand."""
    block = (socket.inet_aton(source[0]) + socket.inet_aton(destination[0])
             + struct.pack("!HH", source[1], destination[1]))
    return V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", len(block)) + block


V1_TCP4 = b"PROXY TCP4 10.1.2.3 10.9.8.7 5555 443\r\n"
V1_TCP6 = b"PROXY TCP6 2001:db8::1 2001:db8::2 5555 443\r\n"
V2_INET = v2_inet(("10.1.2.3", 5555), ("10.9.8.7", 443))


class Router:
    """The engine's view of fastlb: backends in order, recording every call it gets."""

    def __init__(self, *ports: int, send_proxy: int = 0):
        self.ports = list(ports)
        self.send_proxy = send_proxy
        self.lock = threading.Lock()
        self.chosen: list[tuple] = []      # (tried, source) of each choose call
        self.failed: dict[int, str] = {}
        self.done: list[tuple] = []        # (token, bytes_up, bytes_down, status, end)

    def choose(self, tried, ticket, addr=None, source=None):
        with self.lock:
            self.chosen.append((list(tried), source))
        for port in self.ports:
            if port not in tried and port not in self.failed:
                return port, socket.AF_INET, "127.0.0.1", port, self.send_proxy
        return None

    def connect_failed(self, token, reason):
        with self.lock:
            self.failed[token] = reason

    def finished(self, token, addr, bytes_up, bytes_down, status, end, duration):
        with self.lock:
            self.done.append((token, bytes_up, bytes_down, status, end))

    def sources(self) -> list:
        with self.lock:
            return [source for _, source in self.chosen]

    def wait_finished(self, timeout: float = 10.0) -> tuple:
        wait_until(lambda: self.done, timeout, message="the connection to be reported")
        with self.lock:
            assert len(self.done) == 1, self.done
            return self.done[0]


class Harness:
    """A listener whose accepted clients go to an engine running in a thread."""

    def __init__(self, engine_cls, router: Router, **given):
        options = dict(server_timeout=5.0, idle_timeout=10.0, client_timeout=5.0,
                       connect_timeout=2.0, accept_proxy=False)
        options.update(given)
        self.router = router
        self.engine = engine_cls(router, **options)
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.stopped = threading.Event()
        self.threads = [threading.Thread(target=self.engine.run, daemon=True),
                        threading.Thread(target=self._accept, daemon=True)]
        for thread in self.threads:
            thread.start()

    def _accept(self) -> None:
        self.listener.settimeout(0.2)
        while not self.stopped.is_set():
            try:
                conn, addr = self.listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            self.engine.add(conn, addr)

    def connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=10,
                                        source_address=(CLIENT_HOST, 0))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def close(self) -> None:
        self.stopped.set()
        self.engine.stop()
        self.listener.close()
        for thread in self.threads:
            thread.join(10)
        assert not self.threads[0].is_alive(), "engine did not stop"


class Recorder:
    """A backend that keeps every byte of each connection until EOF, then answers and closes."""

    def __init__(self, answer: bytes = b"thanks\n"):
        self.answer = answer
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.lock = threading.Lock()
        self.received: list[bytes] = []    # one entry per connection that reached EOF
        self.accepted = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                self.accepted += 1
            threading.Thread(target=self._record, args=(conn,), daemon=True).start()

    def _record(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(30)
            chunks = []
            try:
                while True:
                    chunk = conn.recv(1 << 16)
                    if not chunk:
                        break
                    chunks.append(chunk)
                conn.sendall(self.answer)
            except OSError:
                pass
            with self.lock:
                self.received.append(b"".join(chunks))

    def only_connection(self, timeout: float = 10.0) -> bytes:
        """What the one connection this backend had carried."""
        wait_until(lambda: self.received, timeout, message="a finished backend connection")
        with self.lock:
            assert self.accepted == 1 and len(self.received) == 1, (self.accepted, self.received)
            return self.received[0]

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def recorder():
    made: list[Recorder] = []

    def make(*args, **kwargs) -> Recorder:
        server = Recorder(*args, **kwargs)
        made.append(server)
        return server

    yield make
    for server in made:
        server.close()


@pytest.fixture
def harness(engine_impl):
    made: list[Harness] = []

    def make(router: Router, **options) -> Harness:
        h = Harness(engine_impl.Engine, router, **options)
        made.append(h)
        return h

    yield make
    for h in made:
        h.close()


def exchange(h: Harness, data: bytes) -> bytes:
    """Send ``data``, end the client's output, and return everything the client got back."""
    with h.connect() as client:
        client.sendall(data)
        client.shutdown(socket.SHUT_WR)
        return recv_all(client, 10)


def closed_without_answer(sock: socket.socket, timeout: float = 10.0) -> bool:
    """The peer closed (FIN or reset) without sending a byte."""
    try:
        return recv_all(sock, timeout) == b""
    except ConnectionResetError:
        return True


PAYLOAD = b"GET /who HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"


# -- --accept-proxy ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "header, source",
    [
        (V1_TCP4, ("10.1.2.3", 5555)),
        (V1_TCP6, ("2001:db8::1", 5555)),
        (V2_INET, ("10.1.2.3", 5555)),
    ],
    ids=["v1-tcp4", "v1-tcp6", "v2-inet"],
)
def test_accepted_header_is_taken_off_and_its_source_goes_to_the_router(
        harness, recorder, header, source):
    backend = recorder()
    h = harness(Router(backend.port), accept_proxy=True)
    # Header and payload in one segment: the engine must split them exactly.
    assert exchange(h, header + PAYLOAD) == b"thanks\n"
    assert backend.only_connection() == PAYLOAD
    assert h.router.sources() == [source]
    assert h.router.wait_finished()[4] == "done"


def test_header_arriving_byte_by_byte_is_still_taken_whole(harness, recorder):
    backend = recorder()
    h = harness(Router(backend.port), accept_proxy=True)
    with h.connect() as client:
        for i in range(len(V1_TCP4)):
            client.sendall(V1_TCP4[i:i + 1])
            time.sleep(0.01)
        # Nobody is chosen while the header is incomplete.
        assert h.router.sources() == []
        client.sendall(PAYLOAD)
        client.shutdown(socket.SHUT_WR)
        assert recv_all(client, 10) == b"thanks\n"
    assert backend.only_connection() == PAYLOAD
    assert h.router.sources() == [("10.1.2.3", 5555)]


def test_v2_header_arriving_in_pieces_is_still_taken_whole(harness, recorder):
    backend = recorder()
    h = harness(Router(backend.port), accept_proxy=True)
    with h.connect() as client:
        for start in range(0, len(V2_INET), 5):
            client.sendall(V2_INET[start:start + 5])
            time.sleep(0.01)
        client.sendall(PAYLOAD)
        client.shutdown(socket.SHUT_WR)
        assert recv_all(client, 10) == b"thanks\n"
    assert backend.only_connection() == PAYLOAD
    assert h.router.sources() == [("10.1.2.3", 5555)]


def v2_with_tlvs(size: int) -> bytes:
    """A v2 INET header followed by TLVs (authority, then no-op padding): ``size`` bytes in all."""
    block = (socket.inet_aton("10.1.2.3") + socket.inet_aton("10.9.8.7") + struct.pack("!HH", 5555, 443)
             + b"\x02" + struct.pack("!H", 11) + b"example.com")
    padding = size - 16 - len(block) - 3
    block += b"\x04" + struct.pack("!H", padding) + b"\x00" * padding
    return V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", len(block)) + block


@pytest.mark.parametrize("size", [200, 3000, 16384], ids=["small", "3000", "largest"])
def test_v2_header_with_tlvs_is_taken_off_whole_however_long(harness, recorder, size):
    # HAProxy sends TLVs (authority, unique id, TLS details) after the addresses.
    backend = recorder()
    h = harness(Router(backend.port), accept_proxy=True)
    header = v2_with_tlvs(size)
    assert len(header) == size
    with h.connect() as client:
        client.sendall(header[:size // 2])
        time.sleep(0.05)
        client.sendall(header[size // 2:] + PAYLOAD)
        client.shutdown(socket.SHUT_WR)
        assert recv_all(client, 10) == b"thanks\n"
    assert backend.only_connection() == PAYLOAD
    assert h.router.sources() == [("10.1.2.3", 5555)]


def test_v2_header_longer_than_the_limit_is_a_bad_header(harness, recorder):
    backend = recorder()
    h = harness(Router(backend.port), accept_proxy=True)
    header = v2_with_tlvs(16385)
    with h.connect() as client:
        client.sendall(header[:16])
        assert closed_without_answer(client)
    assert h.router.wait_finished() == (None, 0, 0, 0, "bad_proxy_header")
    assert backend.accepted == 0


@pytest.mark.parametrize("header", [b"PROXY UNKNOWN\r\n", b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n",
                                    V2_LOCAL], ids=["v1-unknown", "v1-unknown-with-addresses",
                                                    "v2-local"])
def test_address_less_header_gives_no_source_and_the_payload_is_relayed(harness, recorder, header):
    backend = recorder()
    h = harness(Router(backend.port), accept_proxy=True)
    assert exchange(h, header + PAYLOAD) == b"thanks\n"
    assert backend.only_connection() == PAYLOAD
    assert h.router.sources() == [None]


@pytest.mark.parametrize("garbage", [PAYLOAD, b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\nhello",
                                     b"\r\n\r\n\x00\r\nQUIT\n\x31\x11\x00\x0c" + b"\x00" * 12,
                                     b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"],
                         ids=["http", "bad-v1", "bad-v2-version", "tls"])
def test_client_without_a_valid_header_is_closed_without_contacting_a_backend(
        harness, recorder, garbage):
    backend = recorder()
    h = harness(Router(backend.port), accept_proxy=True)
    with h.connect() as client:
        client.sendall(garbage)
        assert closed_without_answer(client)
    assert h.router.wait_finished() == (None, 0, 0, 0, "bad_proxy_header")
    assert h.router.chosen == [] and backend.accepted == 0


def test_incomplete_header_then_silence_is_a_bad_header_at_the_client_timeout(harness, recorder):
    backend = recorder()
    h = harness(Router(backend.port), accept_proxy=True, client_timeout=0.5)
    with h.connect() as client:
        started = time.monotonic()
        client.sendall(b"PROXY TCP4 10.1.2.3 ")
        assert closed_without_answer(client)
        assert 0.4 <= time.monotonic() - started < 3.0
    assert h.router.wait_finished() == (None, 0, 0, 0, "bad_proxy_header")
    assert h.router.chosen == [] and backend.accepted == 0


def test_client_sending_nothing_is_a_client_timeout_not_a_bad_header(harness, recorder):
    backend = recorder()
    h = harness(Router(backend.port), accept_proxy=True, client_timeout=0.5)
    with h.connect() as client:
        assert closed_without_answer(client)
    assert h.router.wait_finished() == (None, 0, 0, 0, "client_timeout")
    assert h.router.chosen == [] and backend.accepted == 0


def test_complete_header_then_silence_is_a_client_timeout(harness, recorder):
    backend = recorder()
    h = harness(Router(backend.port), accept_proxy=True, client_timeout=0.5)
    with h.connect() as client:
        client.sendall(V1_TCP4)
        assert closed_without_answer(client)
    assert h.router.wait_finished() == (None, 0, 0, 0, "client_timeout")
    assert h.router.chosen == [] and backend.accepted == 0


@pytest.mark.parametrize("part", [b"PROXY TCP4 10.1.2.3", V2_INET[:20]], ids=["v1", "v2"])
def test_client_closing_inside_its_header_is_a_bad_header(harness, recorder, part):
    backend = recorder()
    h = harness(Router(backend.port), accept_proxy=True)
    with h.connect() as client:
        client.sendall(part)
        client.shutdown(socket.SHUT_WR)
        assert closed_without_answer(client)
    assert h.router.wait_finished() == (None, 0, 0, 0, "bad_proxy_header")
    assert h.router.chosen == [] and backend.accepted == 0


def test_client_closing_right_after_a_complete_header_is_not_a_bad_header(harness, recorder):
    backend = recorder()
    h = harness(Router(backend.port), accept_proxy=True)
    with h.connect() as client:
        client.sendall(V1_TCP4)
        client.shutdown(socket.SHUT_WR)
        assert closed_without_answer(client)
    assert h.router.wait_finished()[4] == "client_closed"
    assert backend.accepted == 0


@pytest.mark.parametrize("splice", [None, True, False], ids=["auto", "splice", "copy"])
def test_large_payload_after_the_header_arrives_intact(harness, recorder, splice):
    backend = recorder()
    h = harness(Router(backend.port), accept_proxy=True, splice=splice)
    payload = os.urandom(1 << 20)
    assert exchange(h, V2_INET + payload) == b"thanks\n"
    got = backend.only_connection(30)
    assert len(got) == len(payload)
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(payload).hexdigest()
    assert h.router.wait_finished()[1] == len(payload)


# -- --send-proxy --------------------------------------------------------------------------


def split_header(data: bytes) -> tuple:
    """``(version, source, destination, rest)`` of what a backend got, which must open with a header."""
    parsed = parse_proxy_header(data)
    assert parsed is not None, "no complete PROXY header in %r" % data[:120]
    length, source, destination = parsed
    version = 2 if data.startswith(V2_SIGNATURE) else 1
    return version, source, destination, data[length:]


@pytest.mark.parametrize("version", [1, 2])
def test_backend_gets_a_header_with_the_clients_address_then_its_bytes(harness, recorder, version):
    backend = recorder()
    h = harness(Router(backend.port, send_proxy=version))
    with h.connect() as client:
        client_port = client.getsockname()[1]
        client.sendall(PAYLOAD)
        client.shutdown(socket.SHUT_WR)
        assert recv_all(client, 10) == b"thanks\n"
    assert split_header(backend.only_connection()) == \
        (version, (CLIENT_HOST, client_port), ("127.0.0.1", h.port), PAYLOAD)
    assert h.router.wait_finished()[1] == len(PAYLOAD)


@pytest.mark.parametrize("splice", [None, True, False], ids=["auto", "splice", "copy"])
@pytest.mark.parametrize("version", [1, 2])
def test_large_upload_behind_a_sent_header_arrives_intact(harness, recorder, version, splice):
    backend = recorder()
    h = harness(Router(backend.port, send_proxy=version), splice=splice)
    payload = os.urandom(4 << 20)
    assert exchange(h, payload) == b"thanks\n"
    got_version, source, _, rest = split_header(backend.only_connection(30))
    assert got_version == version and source[0] == CLIENT_HOST
    assert hashlib.sha256(rest).hexdigest() == hashlib.sha256(payload).hexdigest()


@pytest.mark.parametrize("incoming, outgoing", [(V1_TCP4, 2), (V2_INET, 1), (V1_TCP6, 1)],
                         ids=["v1-in-v2-out", "v2-in-v1-out", "v1-tcp6-in-v1-out"])
def test_accepted_headers_addresses_are_passed_on_instead_of_the_connections(
        harness, recorder, incoming, outgoing):
    backend = recorder()
    h = harness(Router(backend.port, send_proxy=outgoing), accept_proxy=True)
    assert exchange(h, incoming + PAYLOAD) == b"thanks\n"
    _, expected_source, expected_destination = parse_proxy_header(incoming)
    assert split_header(backend.only_connection()) == \
        (outgoing, expected_source, expected_destination, PAYLOAD)


@pytest.mark.parametrize("incoming", [b"PROXY UNKNOWN\r\n", V2_LOCAL], ids=["v1-unknown", "v2-local"])
def test_address_less_accepted_header_passes_on_the_connections_own_addresses(
        harness, recorder, incoming):
    backend = recorder()
    h = harness(Router(backend.port, send_proxy=1), accept_proxy=True)
    with h.connect() as client:
        client_port = client.getsockname()[1]
        client.sendall(incoming + PAYLOAD)
        client.shutdown(socket.SHUT_WR)
        assert recv_all(client, 10) == b"thanks\n"
    assert split_header(backend.only_connection()) == \
        (1, (CLIENT_HOST, client_port), ("127.0.0.1", h.port), PAYLOAD)


@pytest.mark.parametrize("version", [1, 2])
def test_after_a_refused_connect_the_next_backend_gets_exactly_one_header(harness, recorder, version):
    dead, backend = refused_port(), recorder()
    h = harness(Router(dead, backend.port, send_proxy=version))
    with h.connect() as client:
        client_port = client.getsockname()[1]
        client.sendall(PAYLOAD)
        client.shutdown(socket.SHUT_WR)
        assert recv_all(client, 10) == b"thanks\n"
    assert h.router.failed == {dead: "connection refused"}
    assert split_header(backend.only_connection()) == \
        (version, (CLIENT_HOST, client_port), ("127.0.0.1", h.port), PAYLOAD)
    assert h.router.wait_finished()[0] == backend.port


def test_route_without_send_proxy_sends_the_clients_bytes_alone(harness, recorder):
    backend = recorder()
    h = harness(Router(backend.port, send_proxy=0))
    assert exchange(h, PAYLOAD) == b"thanks\n"
    assert backend.only_connection() == PAYLOAD
