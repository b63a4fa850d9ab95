"""The byte relay, on both twins, over real TCP connections on 127.0.0.1.

Each test builds two connections the way fastlb has them: ``user`` talks to
``lb_client`` (the relay's client side) and ``lb_server`` (the relay's backend
side) talks to ``backend``.  The relay runs in a thread that must finish within
a deadline; the test plays user and backend.  Splice modes only change how the
compiled twin moves bytes, so the tests that move data run in each mode.
"""

from __future__ import annotations

import fcntl
import hashlib
import random
import subprocess
import sys
import signal
import socket
import threading
import time

import pytest

from conftest import recv_all

WAIT = 10.0  # seconds any single network wait may take before the test fails

# (twin, splice argument): the Python twin ignores splice, so it runs once.
TWIN_SPLICE = [
    pytest.param("python", None, id="python"),
    pytest.param("cython", None, id="cython-auto"),
    pytest.param("cython", True, id="cython-splice"),
    pytest.param("cython", False, id="cython-copy"),
]


# Tests that move data take ``splice`` through this marker (the twin fixture
# from conftest, chosen here together with the splice mode).
each_splice_mode = pytest.mark.parametrize(("twin", "splice"), TWIN_SPLICE, indirect=["twin"])


class Wiring:
    """user <-> lb_client ==relay== lb_server <-> backend, all on loopback."""

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(WAIT)
        address = self.listener.getsockname()
        self.user = socket.create_connection(address, timeout=WAIT)
        self.lb_client, _ = self.listener.accept()
        self.lb_server = socket.create_connection(address, timeout=WAIT)
        self.backend, _ = self.listener.accept()
        # The relay gets blocking sockets, as fastlb's workers hand it.
        self.lb_client.settimeout(None)
        self.lb_server.settimeout(None)
        self.backend.settimeout(WAIT)
        self.thread = None

    def start(self, bridge, server_timeout=WAIT, idle_timeout=WAIT, splice=None):
        self.thread = Background(bridge.relay, self.lb_client, self.lb_server,
                                 server_timeout, idle_timeout, splice=splice)
        return self.thread

    def close(self):
        # shutdown() wakes a relay still polling (close() alone would not).
        for sock in (self.user, self.backend, self.lb_client, self.lb_server):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self.thread is not None:
            self.thread.join(WAIT)
        for sock in (self.user, self.backend, self.lb_client, self.lb_server, self.listener):
            sock.close()


@pytest.fixture
def wiring():
    w = Wiring()
    yield w
    w.close()


class Background(threading.Thread):
    """Run a call in a thread; ``result()`` waits for it with a deadline and re-raises."""

    def __init__(self, func, *args, **kwargs):
        super().__init__(daemon=True)
        self._call = (func, args, kwargs)
        self.value = self.error = None
        self.start()

    def run(self):
        func, args, kwargs = self._call
        try:
            self.value = func(*args, **kwargs)
        except BaseException as exc:  # noqa: B902 - reported to the test thread
            self.error = exc

    def result(self, timeout=WAIT):
        self.join(timeout)
        assert not self.is_alive(), "still running after %gs" % timeout
        if self.error is not None:
            raise self.error
        return self.value


def recv_exactly(sock, n, timeout=WAIT):
    deadline = time.monotonic() + timeout
    chunks, got = [], 0
    while got < n:
        remaining = deadline - time.monotonic()
        assert remaining > 0, "got %d of %d bytes within %gs" % (got, n, timeout)
        sock.settimeout(remaining)
        chunk = sock.recv(min(n - got, 1 << 20))
        assert chunk, "EOF after %d of %d bytes" % (got, n)
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def send_and_shut(sock, data):
    sock.sendall(data)
    sock.shutdown(socket.SHUT_WR)


def sha256_of_stream(sock, timeout=WAIT):
    """Read to EOF, returning (byte count, sha256 hex digest)."""
    deadline = time.monotonic() + timeout
    digest, total = hashlib.sha256(), 0
    buf = bytearray(1 << 20)
    while True:
        remaining = deadline - time.monotonic()
        assert remaining > 0, "no EOF within %gs after %d bytes" % (timeout, total)
        sock.settimeout(remaining)
        n = sock.recv_into(buf)
        if not n:
            return total, digest.hexdigest()
        digest.update(memoryview(buf)[:n])
        total += n


def file_flags(sock):
    return fcntl.fcntl(sock.fileno(), fcntl.F_GETFL)


def reset(sock):
    """Close with an RST instead of a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()


# -- data ---------------------------------------------------------------------

@each_splice_mode
def test_bytes_flow_both_ways_intact(bridge_impl, splice, wiring):
    rng = random.Random(7)
    up = rng.randbytes(3 * 1024 * 1024 + 17)
    down = b"HTTP/1.1 200 OK\r\n\r\n" + rng.randbytes(5 * 1024 * 1024 + 3)
    relay = wiring.start(bridge_impl, splice=splice)
    senders = [Background(send_and_shut, wiring.user, up),
               Background(send_and_shut, wiring.backend, down)]
    backend_got = Background(sha256_of_stream, wiring.backend, 30)
    user_got = sha256_of_stream(wiring.user, 30)
    for sender in senders:
        sender.result(30)
    assert backend_got.result(30) == (len(up), hashlib.sha256(up).hexdigest())
    assert user_got == (len(down), hashlib.sha256(down).hexdigest())
    assert relay.result() == (len(up), len(down), "eof", "eof", "done", 200)


@each_splice_mode
def test_keep_alive_exchanges_all_flow_through_one_relay(bridge_impl, splice, wiring):
    relay = wiring.start(bridge_impl, splice=splice)
    sent_up = sent_down = 0
    for i, status in enumerate((200, 404, 200, 503, 200)):
        request = b"GET /%d HTTP/1.1\r\nHost: test\r\n\r\n" % i
        wiring.user.sendall(request)
        assert recv_exactly(wiring.backend, len(request)) == request
        body = b"x" * (i * 1000)
        response = b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n\r\n%s" % (status, len(body), body)
        wiring.backend.sendall(response)
        assert recv_exactly(wiring.user, len(response)) == response
        sent_up += len(request)
        sent_down += len(response)
    wiring.user.shutdown(socket.SHUT_WR)
    assert recv_all(wiring.backend) == b""
    wiring.backend.shutdown(socket.SHUT_WR)
    assert recv_all(wiring.user) == b""
    # The status is the first response's.
    assert relay.result() == (sent_up, sent_down, "eof", "eof", "done", 200)


# -- half-close ---------------------------------------------------------------

@each_splice_mode
def test_client_half_close_reaches_backend_and_answer_still_comes_back(bridge_impl, splice, wiring):
    relay = wiring.start(bridge_impl, splice=splice)
    request = b"PUT /upload HTTP/1.0\r\n\r\n" + b"p" * 200_000
    send_and_shut(wiring.user, request)
    # The backend sees the client's EOF: the relay shut down writing toward it.
    assert recv_all(wiring.backend) == request
    response = b"HTTP/1.0 201 Created\r\n\r\n" + b"r" * 300_000
    send_and_shut(wiring.backend, response)
    assert recv_all(wiring.user) == response
    assert relay.result() == (len(request), len(response), "eof", "eof", "done", 201)


@each_splice_mode
def test_backend_half_close_reaches_client_and_client_can_still_send(bridge_impl, splice, wiring):
    relay = wiring.start(bridge_impl, splice=splice)
    wiring.user.sendall(b"hello")
    assert recv_exactly(wiring.backend, 5) == b"hello"
    send_and_shut(wiring.backend, b"HTTP/1.1 200 OK\r\n\r\nbye")
    assert recv_all(wiring.user) == b"HTTP/1.1 200 OK\r\n\r\nbye"
    # The client's direction is still open after the backend's EOF.
    late = b"late words" * 20_000
    send_and_shut(wiring.user, late)
    assert recv_all(wiring.backend) == late
    assert relay.result() == (5 + len(late), 22, "eof", "eof", "done", 200)


# -- timeouts -----------------------------------------------------------------

@each_splice_mode
def test_silent_backend_hits_server_timeout(bridge_impl, splice, wiring):
    relay = wiring.start(bridge_impl, server_timeout=0.3, idle_timeout=60, splice=splice)
    wiring.user.sendall(b"GET / HTTP/1.1\r\n\r\n")
    assert recv_exactly(wiring.backend, 18) == b"GET / HTTP/1.1\r\n\r\n"
    # Within WAIT, so well before the 60 s idle timeout.
    assert relay.result() == (18, 0, "open", "open", "server_timeout", 0)


def test_server_timeout_counts_from_the_last_byte_sent_to_the_backend(bridge_impl, wiring):
    relay = wiring.start(bridge_impl, server_timeout=1.0, idle_timeout=60)
    # Five bytes 0.25 s apart: the relay outlives its 1 s server timeout only
    # because each byte sent to the backend restarts it.
    for _ in range(5):
        wiring.user.sendall(b".")
        assert recv_exactly(wiring.backend, 1) == b"."
        time.sleep(0.25)
    assert relay.result() == (5, 0, "open", "open", "server_timeout", 0)


@each_splice_mode
def test_idle_timeout_applies_after_the_first_byte(bridge_impl, splice, wiring):
    relay = wiring.start(bridge_impl, server_timeout=60, idle_timeout=0.3, splice=splice)
    wiring.user.sendall(b"GET / HTTP/1.1\r\n\r\n")
    wiring.backend.sendall(b"HTTP/1.1 200 OK\r\n")
    assert recv_exactly(wiring.user, 17) == b"HTTP/1.1 200 OK\r\n"
    assert relay.result() == (18, 17, "open", "open", "idle_timeout", 200)


def test_server_timeout_no_longer_applies_once_the_backend_answered(bridge_impl, wiring):
    relay = wiring.start(bridge_impl, server_timeout=0.2, idle_timeout=60)
    wiring.backend.sendall(b"HTTP/1.1 200 OK\r\n")
    assert recv_exactly(wiring.user, 17) == b"HTTP/1.1 200 OK\r\n"
    time.sleep(0.6)  # three server timeouts of silence
    send_and_shut(wiring.backend, b"\r\n")
    send_and_shut(wiring.user, b"")
    assert recv_all(wiring.user) == b"\r\n"
    assert relay.result() == (0, 19, "eof", "eof", "done", 200)


@each_splice_mode
def test_client_that_stops_reading_hits_idle_timeout(bridge_impl, splice, wiring):
    """A write that cannot complete is bounded by idle_timeout too."""
    wiring.user.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    relay = wiring.start(bridge_impl, server_timeout=60, idle_timeout=0.5, splice=splice)
    wiring.backend.settimeout(0.2)

    def flood():
        chunk = b"HTTP/1.1 200 OK\r\n\r\n" + b"z" * (1 << 20)
        try:
            while True:
                wiring.backend.sendall(chunk)
        except OSError:
            return

    flooder = Background(flood)
    result = relay.result()
    flooder.result()
    assert result.end == "idle_timeout"
    assert result.bytes_down > 0 and result.status == 200
    assert (result.up_end, result.down_end, result.bytes_up) == ("open", "open", 0)


# -- errors -------------------------------------------------------------------

@each_splice_mode
def test_client_reset_ends_relay_as_client_error(bridge_impl, splice, wiring):
    relay = wiring.start(bridge_impl, splice=splice)
    wiring.user.sendall(b"abc")
    assert recv_exactly(wiring.backend, 3) == b"abc"
    reset(wiring.user)
    assert relay.result() == (3, 0, "error", "open", "client_error", 0)


@each_splice_mode
def test_backend_reset_ends_relay_as_server_error(bridge_impl, splice, wiring):
    relay = wiring.start(bridge_impl, splice=splice)
    wiring.user.sendall(b"abc")
    assert recv_exactly(wiring.backend, 3) == b"abc"
    reset(wiring.backend)
    assert relay.result() == (3, 0, "open", "error", "server_error", 0)


@each_splice_mode
def test_backend_reset_after_answering_keeps_the_count(bridge_impl, splice, wiring):
    relay = wiring.start(bridge_impl, splice=splice)
    wiring.backend.sendall(b"HTTP/1.1 502 Bad\r\n")
    assert recv_exactly(wiring.user, 18) == b"HTTP/1.1 502 Bad\r\n"
    reset(wiring.backend)
    assert relay.result() == (0, 18, "open", "error", "server_error", 502)


# -- first-response status ----------------------------------------------------

@pytest.mark.parametrize("response, status", [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", 200),
    (b"HTTP/1.0 404 Not Found\r\n\r\n", 404),
    (b"HTTP/1.1 204\r\n\r\n", 204),
    (b"SSH-2.0-OpenSSH_9.6\r\n", 0),
    (b"HTTP/1.1 20", 0),  # too short to know, then EOF
    (b"", 0),
])
@each_splice_mode
def test_first_response_status_is_reported(bridge_impl, splice, wiring, response, status):
    relay = wiring.start(bridge_impl, splice=splice)
    send_and_shut(wiring.backend, response)
    assert recv_all(wiring.user) == response
    send_and_shut(wiring.user, b"")
    assert relay.result() == (0, len(response), "eof", "eof", "done", status)


@each_splice_mode
def test_status_line_split_across_reads_is_still_parsed(bridge_impl, splice, wiring):
    relay = wiring.start(bridge_impl, splice=splice)
    wiring.user.sendall(b"GET / HTTP/1.1\r\n\r\n")
    assert recv_exactly(wiring.backend, 18) == b"GET / HTTP/1.1\r\n\r\n"
    # The user has the first part before the backend sends the rest, so the
    # relay necessarily read them separately.
    for part in (b"HTTP/1", b".1 2", b"01 Created\r\n\r\n"):
        wiring.backend.sendall(part)
        assert recv_exactly(wiring.user, len(part)) == part
    send_and_shut(wiring.backend, b"")
    send_and_shut(wiring.user, b"")
    assert recv_all(wiring.user) == b""
    assert relay.result() == (18, 24, "eof", "eof", "done", 201)


# -- ownership ----------------------------------------------------------------

@each_splice_mode
def test_relay_leaves_the_sockets_open_and_as_they_were(bridge_impl, splice, wiring):
    flags = (file_flags(wiring.lb_client), file_flags(wiring.lb_server))
    relay = wiring.start(bridge_impl, server_timeout=0.3, idle_timeout=60, splice=splice)
    wiring.user.sendall(b"x" * 100_000)
    assert recv_exactly(wiring.backend, 100_000) == b"x" * 100_000
    assert relay.result() == (100_000, 0, "open", "open", "server_timeout", 0)
    # Still open, still blocking, still usable both ways.
    assert (file_flags(wiring.lb_client), file_flags(wiring.lb_server)) == flags
    assert wiring.lb_client.gettimeout() is None and wiring.lb_server.gettimeout() is None
    wiring.lb_client.sendall(b"to user")
    wiring.lb_server.sendall(b"to backend")
    assert recv_exactly(wiring.user, 7) == b"to user"
    assert recv_exactly(wiring.backend, 10) == b"to backend"


def test_relay_rejects_a_closed_socket(bridge_impl, wiring):
    wiring.lb_server.close()
    with pytest.raises(ValueError):
        bridge_impl.relay(wiring.lb_client, wiring.lb_server, 1, 1)


class Interrupted(Exception):
    pass


@each_splice_mode
def test_signal_handler_exception_interrupts_a_relay(bridge_impl, splice, wiring):
    """Ctrl-C works during a relay: the handler runs and its exception comes out of relay()."""
    flags = (file_flags(wiring.lb_client), file_flags(wiring.lb_server))
    done = threading.Event()

    def interrupt():
        # Keep signalling the main thread until relay() has returned, so the
        # signal cannot land before the relay is waiting in poll().
        deadline = time.monotonic() + WAIT
        while not done.wait(0.05) and time.monotonic() < deadline:
            signal.pthread_kill(threading.main_thread().ident, signal.SIGUSR1)

    def handler(signum, frame):
        if not done.is_set():  # raise once: later signals may land in the finally below
            done.set()
            raise Interrupted()

    previous = signal.signal(signal.SIGUSR1, handler)
    try:
        wiring.user.sendall(b"GET / HTTP/1.1\r\n\r\n")
        signaller = Background(interrupt)
        try:
            with pytest.raises(Interrupted):
                bridge_impl.relay(wiring.lb_client, wiring.lb_server, 2 * WAIT, 2 * WAIT, splice=splice)
        finally:
            done.set()
            signaller.result()
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert (file_flags(wiring.lb_client), file_flags(wiring.lb_server)) == flags
    assert recv_exactly(wiring.backend, 18) == b"GET / HTTP/1.1\r\n\r\n"


SIGPIPE_SCRIPT = r"""
import importlib, signal, socket, sys, threading
signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # as a program that restores the default would
bridge = importlib.import_module(sys.argv[1])
splice = {"None": None, "True": True, "False": False}[sys.argv[2]]
listener = socket.create_server(("127.0.0.1", 0))
user = socket.create_connection(listener.getsockname(), timeout=10)
lb_client, _ = listener.accept()
lb_server = socket.create_connection(listener.getsockname())
backend, _ = listener.accept()
backend.settimeout(10)
result = []
relay = threading.Thread(target=lambda: result.append(bridge.relay(lb_client, lb_server, 10, 10, splice)))
relay.start()
backend.sendall(b"HTTP/1.1 200 OK\r\n\r\n")
assert user.recv(100) == b"HTTP/1.1 200 OK\r\n\r\n"
user.close()  # gone: what the relay writes next meets a reset, then EPIPE

def flood():
    try:
        while True:
            backend.sendall(b"z" * 65536)
    except OSError:
        pass

threading.Thread(target=flood, daemon=True).start()
relay.join(10)
print(result[0].down_end, result[0].end)
"""


@each_splice_mode
def test_writing_to_a_vanished_client_raises_no_sigpipe(bridge_impl, splice):
    """Even where SIGPIPE kills (its default action), a relay only sees the error."""
    done = subprocess.run([sys.executable, "-c", SIGPIPE_SCRIPT, bridge_impl.__name__, str(splice)],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, (done.returncode, done.stderr)
    assert done.stdout.split() == ["error", "client_error"]
