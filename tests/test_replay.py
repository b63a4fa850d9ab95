"""--retry-on-empty (issue 11 item 11): a request whose backend closes or resets before its first
answer byte is replayed on the next backend when that is safe, on both engine twins."""

from __future__ import annotations

import hashlib
import socket
import threading

import pytest

from conftest import recv_all, wait_until
from fastlb.bridge import parse_proxy_header
from test_engine import Router, _reset, echo, harness  # noqa: F401  (fixtures)

GET = b"GET /x HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
POST = b"POST /x HTTP/1.1\r\nHost: test\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi"
ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n"


class Backend:
    """Reads one request head (and what came with it), then answers, closes, resets or answers one byte."""

    def __init__(self, mode: str, answer: bytes = ANSWER):
        self.mode, self.answer = mode, answer
        self.received: list[bytes] = []
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn):
        with conn:
            conn.settimeout(10)
            data = b""
            try:
                # The head's end, past a PROXY header (whose v2 signature holds CRLFCRLF).
                while b"\r\n\r\n" not in data.partition(b" HTTP/1.1\r\n")[2]:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
            except OSError:
                return
            self.received.append(data)
            if self.mode == "answer":
                conn.sendall(self.answer)
            elif self.mode == "one byte":
                conn.sendall(self.answer[:1])
            elif self.mode == "reset":
                _reset(conn)
            # "close": a plain close, no byte sent

    def close(self):
        self.sock.close()


@pytest.fixture
def backends():
    made = []

    def make(mode, **kwargs):
        backend = Backend(mode, **kwargs)
        made.append(backend)
        return backend

    yield make
    for backend in made:
        backend.close()


def exchange(h, data: bytes) -> bytes:
    with h.connect() as client:
        client.sendall(data)
        try:
            return recv_all(client, 10)
        except ConnectionResetError:
            return b"<reset>"


@pytest.mark.parametrize("mode, reason", [("close", "closed the connection without an answer"),
                                          ("reset", "reset the connection without an answer")])
def test_a_get_whose_backend_ends_without_answering_is_replayed_on_the_next(harness, backends, mode,
                                                                         reason):
    dying, good = backends(mode), backends("answer")
    router = Router(dying.port, good.port)
    h = harness(router)
    assert exchange(h, GET) == ANSWER
    assert dying.received == [GET] and good.received == [GET]
    assert router.replays == [(dying.port, reason)]
    assert not router.down          # the replay itself changes no backend's state
    wait_until(lambda: router.done, 5, message="the report")
    assert router.done[0][0] == good.port and router.done[0][4] == "done"


def test_a_post_is_not_replayed_unless_asked(harness, backends):
    dying, good = backends("close"), backends("answer")
    router = Router(dying.port, good.port)
    h = harness(router)
    assert exchange(h, POST) == b""            # the backend's close, passed on
    assert good.received == [] and router.replays == []

    router2 = Router(backends("close").port, good.port)
    h2 = harness(router2, retry_on_empty="always")
    assert exchange(h2, POST) == ANSWER
    assert good.received == [POST]


def test_a_reset_post_gets_the_500_and_is_not_replayed(harness, backends):
    dying, good = backends("reset"), backends("answer")
    router = Router(dying.port, good.port)
    h = harness(router)
    assert exchange(h, POST).startswith(b"HTTP/1.1 500 ")
    assert good.received == []


def test_never_replays_nothing(harness, backends):
    dying, good = backends("close"), backends("answer")
    h = harness(Router(dying.port, good.port), retry_on_empty="never")
    assert exchange(h, GET) == b""
    assert good.received == []


def test_no_replay_once_the_backend_sent_a_byte(harness, backends):
    partial, good = backends("one byte"), backends("answer")
    h = harness(Router(partial.port, good.port))
    assert exchange(h, GET) == ANSWER[:1]
    assert good.received == []


def test_no_replay_of_more_than_the_copy_limit(harness, backends, engine_impl):
    dying, good = backends("close"), backends("answer")
    h = harness(Router(dying.port, good.port))
    big = b"x" * (engine_impl.REPLAY_LIMIT + 1)
    head = b"PUT /big HTTP/1.1\r\nHost: test\r\nContent-Length: %d\r\n\r\n" % len(big)
    # The backend closes (or resets, with the body unread): the client gets
    # that end (an empty answer or the 500), never a replay.
    assert exchange(h, head + big) in (b"", b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n")
    assert good.received == []


def test_every_backend_is_tried_once_then_the_client_gets_the_500(harness, backends):
    first, second = backends("close"), backends("reset")
    router = Router(first.port, second.port)
    h = harness(router)
    assert exchange(h, GET).startswith(b"HTTP/1.1 500 ")
    assert first.received == [GET] and second.received == [GET]
    assert [port for port, _ in router.replays] == [first.port, second.port]


def test_a_replay_carries_the_next_backends_own_proxy_header_once(harness, backends):
    dying, good = backends("close"), backends("answer")

    class Proxying(Router):
        def choose(self, tried, ticket, addr=None, source=None):
            route = super().choose(tried, ticket, addr, source)
            return route and route[:4] + (2,)

    h = harness(Proxying(dying.port, good.port))
    assert exchange(h, GET) == ANSWER
    for backend in (dying, good):
        [data] = backend.received
        length, source, _ = parse_proxy_header(data)
        assert source[0] == "127.0.0.1" and data[length:] == GET


def test_a_large_get_head_is_replayed_intact(harness, backends):
    dying, good = backends("close"), backends("answer")
    h = harness(Router(dying.port, good.port))
    request = b"GET /x HTTP/1.1\r\nHost: test\r\nX-Pad: " + b"p" * 40000 + b"\r\n\r\n"
    assert exchange(h, request) == ANSWER
    assert hashlib.sha256(good.received[0]).digest() == hashlib.sha256(request).digest()
