"""The relay engine on its own: many connections per thread, back-pressure, half-close, timeouts.

Each test runs on both engine twins through the ``engine_impl`` fixture, with
real sockets on 127.0.0.1 and a small router over real listening backends.
"""

from __future__ import annotations

import hashlib
import os
import resource
import socket
import struct
import threading
import time

import pytest
from conftest import recv_all, wait_until
from faults import FaultServer

from fastlb.bridge import NO_EXTENSIONS, Twin


class Router:
    """The engine's view of fastlb: a fixed list of backends, recording every call."""

    def __init__(self, *ports: int):
        self.ports = list(ports)
        self.down: dict[int, str] = {}
        self.done: list[tuple] = []
        self.replays: list[tuple] = []
        self.lock = threading.Lock()

    def choose(self, tried, ticket, addr=None, source=None):
        if ticket == "wait":
            return False
        for port in self.ports:
            if port not in tried and port not in self.down:
                return port, socket.AF_INET, "127.0.0.1", port, 0
        return None

    def connect_failed(self, token, reason):
        with self.lock:
            self.down[token] = reason

    def replayed(self, token, reason):
        with self.lock:
            self.replays.append((token, reason))

    def finished(self, token, addr, bytes_up, bytes_down, status, end, duration):
        with self.lock:
            self.done.append((token, bytes_up, bytes_down, status, end))


class Harness:
    """A listener whose accepted clients are handed to an engine running in a thread."""

    def __init__(self, engine_cls, router, **given):
        options = dict(server_timeout=5.0, idle_timeout=10.0, client_timeout=5.0, connect_timeout=2.0)
        options.update(given)
        self.router = router
        self.engine = engine_cls(router, **options)
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(4096)
        self.port = self.listener.getsockname()[1]
        self.stopped = threading.Event()
        self.threads = [threading.Thread(target=self.engine.run, daemon=True),
                        threading.Thread(target=self._accept, daemon=True)]
        for thread in self.threads:
            thread.start()

    def _accept(self):
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
        return socket.create_connection(("127.0.0.1", self.port), timeout=10)

    def close(self):
        self.stopped.set()
        self.engine.stop()
        self.listener.close()
        for thread in self.threads:
            thread.join(10)
        assert not self.threads[0].is_alive(), "engine did not stop"


class Echo:
    """A backend that echoes every byte and honours half-close (answers EOF with EOF)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4096)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn):
        with conn:
            conn.settimeout(30)
            try:
                while True:
                    data = conn.recv(65536)
                    if not data:
                        conn.shutdown(socket.SHUT_WR)
                        return
                    conn.sendall(data)
            except OSError:
                pass

    def close(self):
        self.sock.close()


@pytest.fixture
def echo():
    server = Echo()
    yield server
    server.close()


@pytest.fixture
def harness(engine_impl):
    made = []

    def make(router, **options):
        h = Harness(engine_impl.Engine, router, **options)
        made.append(h)
        return h

    yield make
    for h in made:
        h.close()


def test_relays_bytes_both_ways_and_honours_half_close(harness, echo):
    h = harness(Router(echo.port))
    payload = bytes(range(256)) * 12289  # ~3 MiB
    with h.connect() as client:
        sender = threading.Thread(target=lambda: (client.sendall(payload), client.shutdown(socket.SHUT_WR)))
        sender.start()
        echoed = recv_all(client, 30)
        sender.join(30)
    assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()
    wait_until(lambda: h.router.done, 10, message="the relay to finish")
    token, up, down, status, end = h.router.done[0]
    assert (token, up, down, status, end) == (echo.port, len(payload), len(payload), 0, "done")


def test_one_engine_serves_many_connections_at_once(harness, echo):
    h = harness(Router(echo.port))
    clients = [h.connect() for _ in range(200)]
    try:
        for i, client in enumerate(clients):
            client.sendall(b"hello %d\n" % i)
        for i, client in enumerate(clients):
            expected = b"hello %d\n" % i
            got = b""
            while len(got) < len(expected):
                got += client.recv(100)
            assert got == expected
    finally:
        for client in clients:
            client.close()
    wait_until(lambda: len(h.router.done) == 200, 10, message="200 finished relays")
    wait_until(lambda: h.engine.active == 0, 10, message="engine to release every connection")


def test_idle_clients_do_not_delay_a_normal_request(harness, echo):
    h = harness(Router(echo.port))
    idle = [h.connect() for _ in range(500)]
    try:
        wait_until(lambda: h.engine.active == 500, 10, message="500 idle connections owned")
        with h.connect() as client:
            client.sendall(b"ping")
            assert client.recv(10) == b"ping"
    finally:
        for sock in idle:
            sock.close()


def test_silent_client_is_closed_after_client_timeout_without_a_backend(harness, echo):
    h = harness(Router(echo.port), client_timeout=0.5)
    with h.connect() as client:
        assert recv_all(client, 5) == b""
    wait_until(lambda: h.router.done, 5, message="the connection to be reported")
    assert h.router.done == [(None, 0, 0, 0, "client_timeout")]


def test_refused_backend_is_reported_and_the_next_one_serves(harness, echo):
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        dead = unused.getsockname()[1]
    h = harness(Router(dead, echo.port))
    with h.connect() as client:
        client.sendall(b"x")
        assert client.recv(1) == b"x"
    assert h.router.down == {dead: "connection refused"}


def test_no_usable_backend_gets_the_exact_500(harness):
    h = harness(Router())
    with h.connect() as client:
        client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = recv_all(client, 5)
    assert answer == b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n"
    wait_until(lambda: h.router.done, 5, message="the connection to be reported")
    assert h.router.done == [(None, 0, 0, 500, "no_backend")]


def test_silent_backend_gets_the_client_a_500_after_server_timeout(harness):
    silent = FaultServer(request="silent")
    try:
        h = harness(Router(silent.port), server_timeout=0.6)
        with h.connect() as client:
            client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            started = time.monotonic()
            answer = recv_all(client, 5)
        assert answer.startswith(b"HTTP/1.1 500 ")
        assert time.monotonic() - started >= 0.5
        wait_until(lambda: h.router.done, 5, message="the connection to be reported")
        token, up, down, status, end = h.router.done[0]
        assert (token, down, status, end) == (silent.port, 0, 500, "server_timeout")
    finally:
        silent.stop()


def test_first_response_status_is_reported(harness):
    ok = FaultServer(body=b"fine\n")
    try:
        h = harness(Router(ok.port))
        with h.connect() as client:
            client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert recv_all(client, 5).endswith(b"fine\n")
        wait_until(lambda: h.router.done, 5, message="the connection to be reported")
        assert h.router.done[0][3:] == (200, "done")
    finally:
        ok.stop()


def test_slow_reader_applies_back_pressure_instead_of_buffering(harness):
    # A backend that sends 64 MiB as fast as it can to a client that reads nothing:
    # the engine must stop reading the backend, so the backend's send blocks.
    sent = [0]
    blocked = threading.Event()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)

    def flood():
        conn, _ = listener.accept()
        conn.settimeout(2)
        chunk = b"x" * 65536
        try:
            while sent[0] < 64 << 20:
                sent[0] += conn.send(chunk)
        except socket.timeout:
            blocked.set()
        finally:
            conn.close()

    thread = threading.Thread(target=flood, daemon=True)
    thread.start()
    h = harness(Router(listener.getsockname()[1]))
    try:
        with h.connect() as client:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            client.sendall(b"go")
            assert blocked.wait(20), "the backend was never blocked: the engine buffered everything"
        # What the engine read from the backend: its own bounded buffer (or pipe)
        # plus what the kernel holds toward the client (one send buffer,
        # tcp_wmem's 4 MiB at most, and the client's 64 KiB).  What the backend
        # managed to send also counts the engine's receive buffer toward the
        # backend, which autotuning may grow to tcp_rmem's maximum (32 MiB on
        # some machines), so it says nothing about the engine.
        wait_until(lambda: h.router.done, 10, message="the relay to be reported")
        assert h.router.done[0][2] < 16 << 20
    finally:
        listener.close()
        thread.join(10)


def test_parked_connection_is_routed_when_woken_or_else_at_the_route_wait(echo, engine_impl):
    asked = []   # the ticket of every choose call

    class Parking(Router):
        ready = False

        def choose(self, tried, ticket, addr=None, source=None):
            asked.append(ticket)
            if ticket is not None and not self.ready:
                return False
            return super().choose(tried, ticket, addr, source)

    parking = Parking(echo.port)
    engine = engine_impl.Engine(parking, server_timeout=5.0, idle_timeout=10.0, client_timeout=5.0,
                                connect_timeout=2.0)
    runner = threading.Thread(target=engine.run, daemon=True)
    runner.start()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    try:
        for woken in (False, True):
            asked.clear()
            client = socket.create_connection(listener.getsockname(), timeout=10)
            conn, addr = listener.accept()
            engine.add(conn, addr, "ticket")
            client.sendall(b"x")
            wait_until(lambda: asked, 5, message="the connection to ask for a route")
            if woken:
                parking.ready = True
                engine.wake()
            assert client.recv(1) == b"x"
            client.close()
            # Woken: routed on the same ticket once the router is ready.  Not
            # woken: parked until ROUTE_WAIT, then routed without a ticket.
            assert asked[0] == "ticket" and asked[-1] == ("ticket" if woken else None)
    finally:
        engine.stop()
        runner.join(10)
        listener.close()


# -- the twins agree ------------------------------------------------------------

ENGINE_CONSTANTS = ("TICK", "ROUTE_WAIT", "LINGER_SECONDS", "LINGER_BYTES", "RESPONSE_500")


@pytest.mark.skipif(NO_EXTENSIONS, reason="FASTLB_NO_EXTENSIONS is set: no compiled twin")
def test_both_engine_twins_offer_the_same_api_and_constants():
    python, compiled = Twin("python").engine, Twin("cython").engine
    for name in ENGINE_CONSTANTS:
        assert getattr(compiled, name) == getattr(python, name), name
    assert compiled.READ_SIZE >= python.READ_SIZE
    assert compiled.BUFFER_LIMIT >= python.BUFFER_LIMIT
    for name in ("add", "wake", "stop", "set_timeouts", "run", "active", "pending", "added", "closed"):
        assert hasattr(compiled.Engine, name), name
    assert compiled.ACCEPT_BATCH == python.ACCEPT_BATCH
    assert callable(compiled.accept_batch) and callable(python.accept_batch)
    assert compiled.RESPONSE_500 == b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n"


# -- accept_batch: the accept loop's half --------------------------------------------

def _listener(family=socket.AF_INET, host="127.0.0.1"):
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.bind((host, 0))
    sock.listen(128)
    sock.setblocking(False)
    return sock


def _accept_all(engine_impl, listener, waker, count, limit=None):
    """Call accept_batch until ``count`` clients came (each call must return a non-empty batch)."""
    got = []
    while len(got) < count:
        batch = (engine_impl.accept_batch(listener, waker) if limit is None
                 else engine_impl.accept_batch(listener, waker, limit))
        assert batch, "accept_batch returned nothing though clients were waiting"
        if limit is not None:
            assert len(batch) <= limit
        got.extend(batch)
    return got


def _close_client(client):
    if isinstance(client, int):
        os.close(client)
    else:
        client.close()


@pytest.mark.parametrize("family,host", [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")])
def test_accept_batch_takes_waiting_clients_with_their_addresses(engine_impl, family, host):
    if family == socket.AF_INET6 and not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    try:
        listener = _listener(family, host)
    except OSError as exc:
        pytest.skip("cannot listen on [::1]: %s" % exc)
    waker, waker_w = socket.socketpair()
    clients = [socket.create_connection((host, listener.getsockname()[1]), timeout=5)
               for _ in range(10)]
    try:
        got = _accept_all(engine_impl, listener, waker, 10, limit=3)
        # The address is what socket.accept gives: the client's own address.
        assert sorted(addr for _, addr in got) == sorted(c.getsockname() for c in clients)
        for client, _ in got:
            # Both twins: a non-blocking, close-on-exec descriptor.
            import fcntl
            assert isinstance(client, int)
            assert fcntl.fcntl(client, fcntl.F_GETFL) & os.O_NONBLOCK
            assert fcntl.fcntl(client, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
            _close_client(client)
    finally:
        for sock in clients + [listener, waker, waker_w]:
            sock.close()


def test_accept_batch_returns_empty_once_the_waker_is_readable(engine_impl):
    listener = _listener()
    waker, waker_w = socket.socketpair()
    result: list = []
    thread = threading.Thread(target=lambda: result.append(engine_impl.accept_batch(listener, waker)),
                              daemon=True)
    try:
        thread.start()
        waker_w.send(b"x")
        thread.join(5)
        assert not thread.is_alive(), "accept_batch did not return when woken"
        assert result == [[]]
        # The byte is left for the caller, so a waiting client is not taken either.
        client = socket.create_connection(("127.0.0.1", listener.getsockname()[1]), timeout=5)
        assert engine_impl.accept_batch(listener, waker) == []
        client.close()
    finally:
        for sock in (listener, waker, waker_w):
            sock.close()


def test_accepted_descriptors_are_relayed_by_the_engine(engine_impl, echo):
    """What accept_batch returns is what Engine.add takes."""
    router = Router(echo.port)
    engine = engine_impl.Engine(router, 5.0, 10.0, 5.0, 2.0)
    runner = threading.Thread(target=engine.run, daemon=True)
    runner.start()
    listener = _listener()
    waker, waker_w = socket.socketpair()
    clients = [socket.create_connection(("127.0.0.1", listener.getsockname()[1]), timeout=5)
               for _ in range(5)]
    try:
        for client, addr in _accept_all(engine_impl, listener, waker, 5):
            engine.add(client, addr)
        for i, sock in enumerate(clients):
            sock.sendall(b"ping %d" % i)
            sock.shutdown(socket.SHUT_WR)
            assert recv_all(sock) == b"ping %d" % i
        wait_until(lambda: len(router.done) == 5, message="5 connections reported")
        assert sorted(d[4] for d in router.done) == ["done"] * 5
    finally:
        engine.stop()
        runner.join(10)
        for sock in clients + [listener, waker, waker_w]:
            sock.close()
    assert not runner.is_alive()


# -- at scale, and without leaks ---------------------------------------------------

def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def fd_room():
    """Raise the soft RLIMIT_NOFILE (to the hard limit at most) for the test; restore it after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)

    def ensure(needed):
        if soft >= needed:
            return
        if hard != resource.RLIM_INFINITY and hard < needed:
            pytest.skip("RLIMIT_NOFILE hard limit %d is below the %d descriptors needed" % (hard, needed))
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))

    yield ensure
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_2000_idle_connections_do_not_delay_normal_requests(harness, echo, fd_room):
    # Each idle connection costs two descriptors here (the client and the
    # engine's end); they wait for a first byte that never comes.
    fd_room(2 * 2000 + 512)
    h = harness(Router(echo.port), client_timeout=60.0)
    idle = []
    try:
        for _ in range(2000):
            idle.append(h.connect())
        wait_until(lambda: h.engine.active == 2000, 20, message="2000 idle connections owned")
        for i in range(5):
            with h.connect() as client:
                client.settimeout(5)
                client.sendall(b"ping %d" % i)
                assert client.recv(100) == b"ping %d" % i
                client.shutdown(socket.SHUT_WR)
                assert recv_all(client, 5) == b""
        wait_until(lambda: len(h.router.done) == 5, 10, message="the 5 requests reported")
        assert [end for *_, end in h.router.done] == ["done"] * 5
        assert h.engine.active == 2000
    finally:
        for sock in idle:
            sock.close()
    wait_until(lambda: h.engine.active == 0, 20, message="the idle connections closed")
    assert sum(end == "client_closed" for *_, end in h.router.done) == 2000


def _reset(sock: socket.socket) -> None:
    """Close with a RST instead of a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def test_no_descriptor_is_leaked_whatever_the_connections_did(engine_impl, echo):
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        dead = unused.getsockname()[1]
    before = _open_fds()
    h = Harness(engine_impl.Engine, Router(dead, echo.port), client_timeout=0.3, server_timeout=5.0)
    silent = []
    try:
        for i in range(60):
            kind = i % 5
            client = h.connect()
            if kind == 0:      # a normal exchange, closed after the answer
                client.sendall(b"hello")
                assert client.recv(5) == b"hello"
                client.close()
            elif kind == 1:    # gone before the first byte
                client.close()
            elif kind == 2:    # resets before the first byte
                _reset(client)
            elif kind == 3:    # sends, then resets without reading
                client.sendall(b"x" * 100000)
                _reset(client)
            else:              # never sends: client_timeout
                silent.append(client)
        for client in silent:
            assert recv_all(client, 5) == b""
            client.close()
        wait_until(lambda: len(h.router.done) == 60 and h.engine.active == 0, 10,
                   message="all 60 connections reported")
        assert h.engine.added == h.engine.closed == 60
    finally:
        h.close()
    # Every descriptor the engine owned (clients, backends, its wake-up and
    # poller) is closed once run() has returned; the echo threads close theirs
    # when they see EOF.
    wait_until(lambda: _open_fds() <= before, 10, message="descriptors back to %d" % before)


def test_client_that_sends_then_resets_is_reported_exactly_once(harness, echo):
    h = harness(Router(echo.port))
    for i in range(20):
        client = h.connect()
        client.sendall(b"request %d" % i)
        if i % 2:
            assert client.recv(100).startswith(b"request")
        _reset(client)
    wait_until(lambda: len(h.router.done) == 20 and h.engine.active == 0, 10,
               message="20 reset connections reported")
    h.close()  # run() has returned: no report can come after this
    assert len(h.router.done) == 20
    assert {end for *_, end in h.router.done} <= {"client_error", "done", "client_closed"}


# -- routing details -------------------------------------------------------------

class Blackhole:
    """A backend whose accept queue is full, so a connect never completes (SYNs are dropped)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(0)
        self.port = self.sock.getsockname()[1]
        self.fillers = []
        for _ in range(3):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", self.port))
            self.fillers.append(filler)

    def close(self):
        for sock in self.fillers + [self.sock]:
            sock.close()


def test_connect_timeout_is_reported_and_the_next_backend_serves(harness, echo):
    hole = Blackhole()
    try:
        h = harness(Router(hole.port, echo.port), connect_timeout=0.5)
        with h.connect() as client:
            client.settimeout(5)
            client.sendall(b"x")
            assert client.recv(1) == b"x"
        assert h.router.down == {hole.port: "connect timeout (0.5s)"}
    finally:
        hole.close()


def test_ipv6_backend_is_reached_by_address(harness):
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        listener = socket.socket(socket.AF_INET6)
        listener.bind(("::1", 0))
    except OSError:
        pytest.skip("::1 is not available")
    listener.listen(4)
    port = listener.getsockname()[1]

    class V6(Router):
        def choose(self, tried, ticket, addr=None, source=None):
            return None if tried else (port, socket.AF_INET6, "::1", port, 0)

    def answer():
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(5)
            conn.recv(100)
            conn.sendall(b"HTTP/1.1 204 No Content\r\n\r\n")
    server = threading.Thread(target=answer, daemon=True)
    server.start()
    try:
        h = harness(V6())
        with h.connect() as client:
            client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert client.recv(100).startswith(b"HTTP/1.1 204")
        wait_until(lambda: h.router.done, 5, message="the connection to be reported")
        assert h.router.done[0][0] == port and h.router.done[0][3] == 204
    finally:
        listener.close()
        server.join(5)


# -- bulk: splice or copy, the same bytes ------------------------------------------

class Download:
    """A backend that answers every connection with a status line and ``size`` bytes, then closes."""

    def __init__(self, size: int):
        self.body = os.urandom(1 << 16) * (size >> 16)
        self.head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(self.body)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(30)
                try:
                    conn.recv(100)
                    conn.sendall(self.head + self.body)
                except OSError:
                    pass

    def close(self):
        self.sock.close()


@pytest.mark.parametrize("splice", [None, True, False], ids=["auto", "splice", "copy"])
def test_bulk_download_is_relayed_intact_however_bytes_move(harness, splice):
    backend = Download(8 << 20)
    try:
        h = harness(Router(backend.port), splice=splice)
        with h.connect() as client:
            client.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
            client.shutdown(socket.SHUT_WR)
            got = recv_all(client, 30)
        assert got == backend.head + backend.body
        wait_until(lambda: h.router.done, 10, message="the download to be reported")
        token, up, down, status, end = h.router.done[0]
        assert (down, status, end) == (len(got), 200, "done")
    finally:
        backend.close()


@pytest.mark.parametrize("splice", [None, True, False], ids=["auto", "splice", "copy"])
def test_bulk_upload_and_echo_honour_half_close_however_bytes_move(harness, echo, splice):
    h = harness(Router(echo.port), splice=splice)
    payload = os.urandom(1 << 20) * 3
    with h.connect() as client:
        sender = threading.Thread(target=lambda: (client.sendall(payload), client.shutdown(socket.SHUT_WR)))
        sender.start()
        echoed = recv_all(client, 30)
        sender.join(30)
    assert echoed == payload
    wait_until(lambda: h.router.done, 10, message="the relay to be reported")
    assert h.router.done[0][1:] == (len(payload), len(payload), 0, "done")


# -- lifecycle ---------------------------------------------------------------------

def test_stop_returns_from_run_only_once_every_connection_has_finished(engine_impl, echo):
    h = Harness(engine_impl.Engine, Router(echo.port))
    client = h.connect()
    try:
        client.sendall(b"one")
        assert client.recv(3) == b"one"
        h.engine.stop()
        h.threads[0].join(0.5)
        assert h.threads[0].is_alive(), "run() returned with a connection still relaying"
        client.sendall(b"two")          # still relayed while stopping
        assert client.recv(3) == b"two"
    finally:
        client.close()
    h.threads[0].join(10)
    assert not h.threads[0].is_alive(), "run() did not return after the last connection"
    assert h.engine.active == 0
    h.close()


def test_a_connection_added_after_run_returned_is_closed(engine_impl):
    engine = engine_impl.Engine(Router(), 1.0, 1.0, 1.0, 1.0)
    runner = threading.Thread(target=engine.run, daemon=True)
    runner.start()
    engine.stop()
    runner.join(10)
    assert not runner.is_alive()
    a, b = socket.socketpair()
    with b:
        engine.add(a, None)
        b.settimeout(5)
        assert b.recv(1) == b""         # the engine's end was closed
    assert engine.active == 0


def test_python_objects_handed_to_the_engine_are_released(engine_impl, echo):
    import sys

    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        dead = unused.getsockname()[1]
    refused, served = object(), object()   # backend tokens
    addr, ticket = ("peer", 1), object()
    reports = []

    class Counting:
        """Keeps no reference to what it is given."""

        def choose(self, tried, ticket_, addr_=None, source=None):
            if not tried:
                return refused, socket.AF_INET, "127.0.0.1", dead, 0
            return (served, socket.AF_INET, "127.0.0.1", echo.port, 0) if len(tried) == 1 else None

        def connect_failed(self, token, reason):
            assert token is refused and reason == "connection refused"

        def finished(self, token, addr_, bytes_up, bytes_down, status, end, duration):
            reports.append(end)

    before = [sys.getrefcount(o) for o in (refused, served, addr, ticket)]
    engine = engine_impl.Engine(Counting(), 5.0, 10.0, 5.0, 2.0)
    runner = threading.Thread(target=engine.run, daemon=True)
    runner.start()
    listener = socket.create_server(("127.0.0.1", 0))
    try:
        for _ in range(30):
            with socket.create_connection(listener.getsockname(), timeout=10) as client:
                conn, _ = listener.accept()
                engine.add(conn, addr, ticket)
                client.sendall(b"ping")
                assert client.recv(4) == b"ping"
        wait_until(lambda: len(reports) == 30, 10, message="30 reports")
    finally:
        engine.stop()
        runner.join(10)
        listener.close()
    assert not runner.is_alive()
    del conn
    assert [sys.getrefcount(o) for o in (refused, served, addr, ticket)] == before


def test_relay_idle_both_ways_is_closed_after_idle_timeout(harness, echo):
    h = harness(Router(echo.port), idle_timeout=0.6)
    with h.connect() as client:
        client.sendall(b"hello")
        assert client.recv(5) == b"hello"
        started = time.monotonic()
        # Nothing moves either way now: the engine closes both sides.
        assert recv_all(client, 10) == b""
        assert time.monotonic() - started >= 0.5
    wait_until(lambda: h.router.done, 5, message="the connection to be reported")
    token, up, down, status, end = h.router.done[0]
    assert (token, up, down, end) == (echo.port, 5, 5, "idle_timeout")


def test_traffic_in_one_direction_keeps_a_relay_alive_past_idle_timeout(harness, echo):
    h = harness(Router(echo.port), idle_timeout=0.6)
    with h.connect() as client:
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:   # a byte every 0.2 s for 2.5 idle timeouts
            client.sendall(b"x")
            assert client.recv(1) == b"x"
            time.sleep(0.2)
        client.shutdown(socket.SHUT_WR)
        assert recv_all(client, 5) == b""
    wait_until(lambda: h.router.done, 5, message="the connection to be reported")
    assert h.router.done[0][4] == "done"


class SendThenReset:
    """A backend that answers every connection with ``size`` bytes, waits until they are
    acknowledged (all in fastlb's hands), then resets the connection."""

    def __init__(self, size: int):
        self.size = size
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.acknowledged = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        import fcntl
        import termios

        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        conn.settimeout(10)
        conn.recv(65536)
        conn.sendall(b"x" * self.size)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            unacknowledged = struct.unpack("i", fcntl.ioctl(conn, termios.TIOCOUTQ, b"\0" * 4))[0]
            if unacknowledged == 0:
                self.acknowledged.set()
                break
            time.sleep(0.01)
        _reset(conn)
        conn.close()

    def close(self):
        self.sock.close()


def test_bytes_read_from_a_backend_that_then_resets_all_reach_the_client(harness):
    # Issue 11 item 3: fastlb held part of the answer in its buffers when the
    # reset came, and dropped it; the client saw a clean close and a short body.
    # More than the client's socket buffers and fastlb's socket toward it take,
    # less than fastlb reads before it stops reading (buffers, back-pressure).
    size = 3_000_000
    backend = SendThenReset(size)
    try:
        router = Router(backend.port)
        h = harness(router)
        with socket.socket() as client:
            # A small window: most of the answer waits in fastlb, not in the client's kernel.
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            client.settimeout(10)
            client.connect(("127.0.0.1", h.port))
            client.sendall(b"GET /big HTTP/1.1\r\nHost: test\r\n\r\n")
            assert backend.acknowledged.wait(10), "the backend's bytes never all reached fastlb"
            time.sleep(0.2)   # the reset reaches fastlb while the client has read nothing
            received = recv_all(client, 10)
        assert len(received) == size
        wait_until(lambda: router.done, 5, message="the connection to be reported")
        assert router.done[0][4] == "server_error" and router.done[0][2] == size
    finally:
        backend.close()


class ParallelDownload(Download):
    """A Download serving every connection in a thread of its own."""

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._send, args=(conn,), daemon=True).start()

    def _send(self, conn):
        with conn:
            conn.settimeout(30)
            try:
                conn.recv(100)
                conn.sendall(self.head + self.body)
            except OSError:
                pass


def test_splice_pipes_stay_within_the_budget_and_bulk_bytes_still_arrive(harness, engine_impl):
    # Issue 11 item 2: pipes are two descriptors each, outside --max-connections'
    # two per connection; beyond the budget a direction copies instead.
    backend = ParallelDownload(4 << 20)
    engine_impl.set_pipe_budget(1)
    try:
        h = harness(Router(backend.port), splice=True)
        results, peak = [], [0]

        def fetch():
            with h.connect() as client:
                client.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
                client.shutdown(socket.SHUT_WR)
                results.append(recv_all(client, 30) == backend.head + backend.body)

        fetchers = [threading.Thread(target=fetch) for _ in range(3)]
        for fetcher in fetchers:
            fetcher.start()
        while any(f.is_alive() for f in fetchers):
            peak[0] = max(peak[0], engine_impl.pipes_in_use())
            time.sleep(0.001)
        assert results == [True, True, True]
        assert peak[0] <= 1
        wait_until(lambda: engine_impl.pipes_in_use() == 0, 10, message="every pipe to be given back")
    finally:
        engine_impl.set_pipe_budget(1 << 30)
        backend.close()


def test_descriptor_budget_leaves_room_for_pipes_probes_and_the_admin_endpoint():
    from fastlb.admin import ADMIN_MAX_CONNECTIONS
    from fastlb.balancer import RESERVED_FDS, descriptor_budget

    connections, pipes = descriptor_budget(20000, backends=2, admin=True)
    assert 2 * connections + 2 * pipes + RESERVED_FDS + 2 * 2 + ADMIN_MAX_CONNECTIONS <= 20000
    assert pipes == connections // 4
    # An explicit --max-connections leaves pipes what is left, never more.
    connections, pipes = descriptor_budget(20000, backends=2, admin=False, max_connections=9400)
    assert connections == 9400 and 2 * 9400 + 2 * pipes + RESERVED_FDS + 4 <= 20000
    assert descriptor_budget(64, backends=1, admin=False, max_connections=200) == (200, 0)
