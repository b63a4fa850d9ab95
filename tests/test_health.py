"""The health probe against real sockets (SPEC §2): what it sends and how it judges answers."""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from conftest import wait_until
from fastlb.health import probe, probe_many
from fastlb.settings import Address


class OneShotServer:
    """Accepts one connection, records the request head, answers with ``answer`` (or stays silent)."""

    def __init__(self, answer: bytes | None, close: bool = True, delay: float = 0.0):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.port = self.sock.getsockname()[1]
        self.answer, self.close, self.delay = answer, close, delay
        self.request = b""
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        self.sock.settimeout(10)
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(10)
            while b"\r\n\r\n" not in self.request:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                self.request += chunk
            if self.answer is not None:
                time.sleep(self.delay)
                try:
                    conn.sendall(self.answer)
                except OSError:
                    pass
            if not self.close:
                self.done.wait(10)
        self.done.set()

    def address(self) -> Address:
        return Address("127.0.0.1", self.port, "127.0.0.1")

    def shutdown(self):
        self.done.set()
        self.sock.close()


@pytest.fixture
def server_factory():
    servers = []

    def make(*args, **kwargs):
        server = OneShotServer(*args, **kwargs)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.shutdown()


def test_probe_sends_get_healthcheck_with_host_header(server_factory):
    server = server_factory(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n2\n9\n")
    assert probe(server.address(), 5) == ((2, 9), "ok")
    head = server.request.decode()
    assert head.startswith("GET /healthcheck HTTP/1.1\r\n")
    assert "\r\nHost: 127.0.0.1:%d\r\n" % server.port in head
    assert head.endswith("\r\n\r\n")


def test_answer_with_content_length_completes_without_waiting_for_eof(server_factory):
    server = server_factory(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n0\n1", close=False)
    started = time.monotonic()
    assert probe(server.address(), 5) == ((0, 1), "ok")
    assert time.monotonic() - started < 4


def test_answer_without_content_length_is_read_to_eof(server_factory):
    server = server_factory(b"HTTP/1.0 200 OK\r\n\r\n12\n34\n")
    assert probe(server.address(), 5) == ((12, 34), "ok")


@pytest.mark.parametrize(
    "answer, reason",
    [
        (b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n", "status 404"),
        (b"HTTP/1.1 500 Oops\r\n\r\n", "status 500"),
        (b"hello there\r\n", "malformed status line"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n1 2\n3", "malformed body"),
        (b"HTTP/1.1 200 OK\r\n\r\n1\n2\n3\n", "malformed body"),
        (b"HTTP/1.1 200 OK\r\n\r\n-1\n2", "malformed body"),
        (b"HTTP/1.1 200 OK\r\n\r\n9223372036854775808\n2", "number too large"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n1\n2", "truncated answer"),
        (b"HTTP/1.1 200 OK\r\nX: " + b"a" * 5000 + b"\r\n\r\n1\n2", "answer too long"),
        (b"", "truncated answer"),
    ],
)
def test_unhealthy_answers_mark_down_with_their_reason(server_factory, answer, reason):
    server = server_factory(answer)
    assert probe(server.address(), 5) == (None, reason)


def test_refused_connection_is_reported():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert probe(Address("127.0.0.1", port, "127.0.0.1"), 5) == (None, "connection refused")


def test_silent_backend_times_out_within_the_bound(server_factory):
    server = server_factory(None, close=False)
    started = time.monotonic()
    result, reason = probe(server.address(), 1.0)
    elapsed = time.monotonic() - started
    assert result is None and reason.startswith("timeout")
    assert 0.9 <= elapsed < 3.0


def test_slow_trickle_cannot_extend_the_bound(server_factory):
    # The bound is on the whole probe, not per read.
    server = server_factory(b"HTTP/1.1 200 OK\r\n", close=False, delay=0.0)
    started = time.monotonic()
    result, reason = probe(server.address(), 1.0)
    assert result is None and reason.startswith("timeout")
    assert time.monotonic() - started < 3.0


HEALTHY = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n3\n7\n"


def test_probes_run_in_parallel_a_silent_backend_delays_no_other(server_factory):
    silent = server_factory(None, close=False)
    healthy = [server_factory(HEALTHY) for _ in range(3)]
    started = time.monotonic()
    results = probe_many([silent.address()] + [server.address() for server in healthy], 2.0)
    elapsed = time.monotonic() - started
    for server in healthy:
        result, reason, latency = results[server.address().name]
        assert (result, reason) == ((3, 7), "ok") and latency < 1.0
    result, reason, latency = results[silent.address().name]
    assert (result, reason) == (None, "timeout (no complete answer within 2s)")
    # The round took the silent backend's bound, not the sum of the bounds.
    assert 1.9 <= latency and elapsed < 3.5


def test_probes_leave_no_descriptor_behind(server_factory):
    before = len(os.listdir("/proc/self/fd"))
    servers = [server_factory(HEALTHY) for _ in range(4)] + [server_factory(b"garbage\r\n")]
    results = probe_many([server.address() for server in servers], 5.0)
    assert sorted(reason for _, reason, _ in results.values()) == \
        ["malformed status line"] + ["ok"] * 4
    for server in servers:
        server.shutdown()
    wait_until(lambda: len(os.listdir("/proc/self/fd")) <= before, 5,
               message="every probe and test-server descriptor closed")


def test_a_round_is_not_over_while_a_probe_started_in_it_still_runs(faults):
    # SPEC §2 [compat]: the round triggered by one connection is over, with
    # probes started after the trigger, before the next client is routed.  A
    # refused probe ends inside its constructor; it must not end the round
    # while the probes after it have not even started.
    from faults import DELAY, refused_port
    from fastlb.health import HealthChecker
    from fastlb.pool import BackendPool

    slow = faults(probe=DELAY, delay=0.5)
    pool = BackendPool([Address("127.0.0.1", refused_port(), "127.0.0.1"),
                        Address("127.0.0.1", slow.port, "127.0.0.1")], requests_per_round=1)
    # A round waits for a probe up to round_wait (the engines' 0.25 s by
    # default, shorter than this slow probe; see the hung-probe test below).
    checker = HealthChecker(pool, probe_timeout=5.0, interval=60.0, round_wait=5.0)
    try:
        trigger, _ = pool.count_accept()
        assert trigger
        pool.trigger_closed(1)              # the triggering client has gone: the next one waits
        checker.start_round(load_only=True)
        assert not pool.round_applied(1)    # the slow backend's probe is still running
        deadline = time.monotonic() + 5
        while not pool.round_applied(1) and time.monotonic() < deadline:
            checker._step(deadline)
    finally:
        checker.close()
    assert pool.round_applied(1)
    assert [b.state for b in pool.backends] == ["down", "up"]


def test_a_round_that_finds_a_probe_running_waits_for_one_started_after_it(faults):
    # SPEC §2 [compat] with -R 1: the second trigger comes while the first
    # round's probe still runs.  Its round is over only once a probe started
    # after that probe has been applied, never on the older one's answer.
    from faults import DELAY
    from fastlb.health import HealthChecker
    from fastlb.pool import BackendPool

    slow = faults(probe=DELAY, delay=0.3)
    pool = BackendPool([Address("127.0.0.1", slow.port, "127.0.0.1")], requests_per_round=1)
    checker = HealthChecker(pool, probe_timeout=5.0, interval=60.0, round_wait=5.0)
    try:
        for ticket in (1, 2):
            assert pool.count_accept()[0]
            pool.trigger_closed(ticket)
            checker.start_round(load_only=True)
        deadline = time.monotonic() + 5
        while not pool.round_applied(1) and time.monotonic() < deadline:
            checker._step(deadline)
        # The first answer ends round 1 only; the follow-up probe (it may already
        # have reached the backend) is what round 2 waits for.
        assert pool.round_applied(1) and not pool.round_applied(2)
        while not pool.round_applied(2) and time.monotonic() < deadline:
            checker._step(deadline)
    finally:
        checker.close()
    assert pool.round_applied(2)
    assert len(slow.probe_times()) == 2


def test_a_hung_probe_holds_its_round_no_longer_than_traffic_waits_for_it(faults):
    # SPEC §2: one hung backend never blocks traffic.  Connections parked for
    # a round are routed anyway after the engines' ROUTE_WAIT; a round held
    # by a probe that hangs until --probe-timeout would park every later
    # connection for that long, one after another (in the chaos run of
    # docs/reliability.md, throughput fell 25-fold while a probe hung).  So a
    # probe holds its round for ROUTE_WAIT at most; its verdict is applied
    # when it comes, and later rounds do not wait for it at all.
    from faults import SILENT
    from fastlb.health import HealthChecker
    from fastlb.pool import BackendPool

    hung, healthy = faults(probe=SILENT), faults()
    pool = BackendPool([Address("127.0.0.1", hung.port, "127.0.0.1"),
                        Address("127.0.0.1", healthy.port, "127.0.0.1")], requests_per_round=1)
    checker = HealthChecker(pool, probe_timeout=5.0, interval=60.0)
    try:
        deadline = time.monotonic() + 4.0       # before the hung probe's own deadline
        for ticket in (1, 2):
            assert pool.count_accept()[0]
            pool.trigger_closed(ticket)         # the triggering client has gone: the next one waits
            checker.start_round(load_only=True)
            while not pool.round_applied(ticket) and time.monotonic() < deadline:
                checker._step(deadline)
            assert pool.round_applied(ticket), ticket
        # Both rounds ended on the healthy backend's answers, without a verdict on
        # the hung one and without probing it twice at once.
        assert [b.state for b in pool.backends] == ["unknown", "up"]
        assert len(hung.probe_times()) == 1 and len(healthy.probe_times()) == 2
        # The hung probe still ends at its own deadline, and marks its backend down.
        while pool.backends[0].state != "down" and time.monotonic() < deadline + 3.0:
            checker._step(deadline + 3.0)
        assert pool.backends[0].state == "down"
    finally:
        checker.close()
