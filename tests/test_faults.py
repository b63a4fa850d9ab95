"""End to end with misbehaving backends (``tests/faults.py``) beside real ones.

Dead, silent, 404-answering, garbage-answering and hung-probe backends are
skipped with their reason logged; a backend that accepts a relayed connection
and never answers costs its client a 500, not a hang; SIGTERM drains.
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import socket
import time

import pytest

from conftest import free_port, port_accepts, recv_all, wait_until
from faults import DELAY, GARBAGE, OK, SILENT, STATUS_404, refused_port
from test_e2e import RESPONSE_500, make_dir, wait_up, who
from test_operations import stats as admin_stats


def down_line(port: int, reason: str) -> str:
    return r"backend 127\.0\.0\.1:%d is down \(was \w+\): [^\n]*%s" % (port, reason)


def test_dead_silent_404_and_garbage_backends_are_skipped_with_reasons(procs, faults, tmp_path):
    dead = refused_port()
    silent = faults(probe=SILENT, request=SILENT)
    not_found = faults(probe=STATUS_404, request=STATUS_404)
    garbage = faults(probe=GARBAGE, request=GARBAGE)
    good = procs.backend(make_dir(tmp_path, "good", {"who": b"G"}))
    # The bad ones come first: the tie-break would pick them if they were up.
    lb = procs.fastlb("--probe-timeout", 1, "--interval", 0.3,
                      dead, silent.port, not_found.port, garbage.port, good.port)
    wait_up(lb, good)

    assert [who(lb.port) for _ in range(10)] == [b"G"] * 10
    lb.wait_for_log(down_line(dead, "refused"))
    lb.wait_for_log(down_line(silent.port, "timeout"))
    lb.wait_for_log(down_line(not_found.port, "status 404"))
    lb.wait_for_log(down_line(garbage.port, "malformed"))
    # They keep being probed, and none of them ever saw a client request.
    wait_until(lambda: min(s.probes for s in (silent, not_found, garbage)) >= 2, 5,
               message="bad backends to be probed again")
    assert [s.requests for s in (silent, not_found, garbage)] == [0, 0, 0]


def test_backend_hung_at_start_up_does_not_hold_back_the_first_traffic(procs, faults, tmp_path):
    hung = faults(probe=SILENT)       # accepts its probe and never answers
    good = procs.backend(make_dir(tmp_path, "good", {"who": b"G"}))
    started = time.monotonic()
    lb = procs.fastlb(hung.port, good.port, wait=False)
    wait_until(lambda: port_accepts(lb.port), 10, message="fastlb to listen")
    # Waits in the backlog until the start-up round lets traffic through.
    assert who(lb.port) == b"G"
    # The 5 s probe timeout is not what the first client waited for.
    assert time.monotonic() - started < 4.0
    lb.wait_for_log(r"first health round done: 1 of 2 backend\(s\) up; 1 still being probed")
    # The hung probe goes on in the health thread and is cut at its deadline.
    lb.wait_for_log(down_line(hung.port, "timeout"), timeout=10)
    assert who(lb.port) == b"G"


def test_hung_probe_is_cut_at_5s_while_other_backends_keep_serving(procs, faults, tmp_path):
    never = faults(body=b"N")                # will accept its probe and never answer
    late = faults(body=b"L", delay=6.0)      # will answer its probe after 6 s
    good = procs.backend(make_dir(tmp_path, "good", {"who": b"G"}))
    # Default --probe-timeout: the 5 s bound of the SPEC is what is under test.
    lb = procs.fastlb("--interval", 0.3, never.port, late.port, good.port)
    wait_up(lb, never, late, good)

    never.probe_mode, late.probe_mode = SILENT, DELAY
    seen_down: dict = {}
    slowest = [0.0]

    def serve_one_and_look() -> bool:
        started = time.monotonic()
        assert who(lb.port) in (b"N", b"L", b"G")
        slowest[0] = max(slowest[0], time.monotonic() - started)
        out = lb.output()
        for server in (never, late):
            if server not in seen_down and re.search(down_line(server.port, "timeout"), out):
                seen_down[server] = time.monotonic()
        return len(seen_down) == 2

    wait_until(serve_one_and_look, 9, interval=0.05, message="both hung backends to be marked down")
    # Clients were served all along, never held up long by a hung probe.
    assert slowest[0] < 1.0
    for server, mode in ((never, SILENT), (late, DELAY)):
        hung = server.probe_times(mode)[0]
        assert 4.5 <= seen_down[server] - hung <= 6.5, seen_down[server] - hung
        # No second probe while the first one hung.
        assert not [t for t in server.probe_times() if hung < t < hung + 4.5]
    assert [who(lb.port) for _ in range(5)] == [b"G"] * 5


def test_backend_silent_on_relayed_connection_gets_client_500_but_stays_up(procs, faults, tmp_path):
    # SPEC §4: a server timeout ends that connection and is counted, but only
    # probes and failed connects change a backend's state.
    silent = faults(probe=OK, request=SILENT)
    good = procs.backend(make_dir(tmp_path, "good", {"who": b"G"}))
    admin = free_port()
    lb = procs.fastlb("--server-timeout", 1.5, "--interval", 600, "--admin", admin,
                      silent.port, good.port)
    wait_up(lb, silent, good)

    # Both at 0 entries: the silent one is first on the command line.
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", lb.port), timeout=10) as sock:
        sock.sendall(b"GET /who HTTP/1.1\r\nHost: test\r\n\r\n")
        assert recv_all(sock, 10) == RESPONSE_500
    assert 1.4 <= time.monotonic() - started < 4
    assert silent.requests == 1
    silent_stats = wait_until(lambda: [b for b in admin_stats(admin)["backends"]
                                       if b["backend"].endswith(":%d" % silent.port)
                                       and b["failures"] == 1], 5,
                              message="the server timeout to be counted")[0]
    assert silent_stats["state"] == "up"
    assert "is down" not in lb.output()


def test_client_that_stops_mid_request_cannot_take_a_backend_down(procs, tmp_path):
    # The attack: a partial request, then silence, every few seconds.  The
    # backend waits for the rest of the request; it did nothing wrong.
    good = procs.backend(make_dir(tmp_path, "good", {"who": b"G"}))
    lb = procs.fastlb("--server-timeout", 1.0, "--interval", 600, good.port)
    wait_up(lb, good)
    for _ in range(2):
        with socket.create_connection(("127.0.0.1", lb.port), timeout=10) as sock:
            sock.sendall(b"GET /who HTTP/1.1\r\n")
            assert recv_all(sock, 10) == RESPONSE_500
        assert who(lb.port) == b"G"
    assert "is down" not in lb.output()


def test_sigterm_lets_in_flight_request_finish_then_exits_0(procs, faults):
    slow = faults(request=DELAY, delay=1.5, body=b"slow answer\n")
    lb = procs.fastlb(slow.port)
    wait_up(lb, slow)

    with socket.create_connection(("127.0.0.1", lb.port), timeout=10) as sock:
        sock.sendall(b"GET /x HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        wait_until(lambda: slow.requests == 1, 5, message="the request to reach the backend")
        lb.signal(signal.SIGTERM)
        lb.wait_for_log(r"SIGTERM received")

        def refused() -> bool:
            try:
                socket.create_connection(("127.0.0.1", lb.port), timeout=1).close()
                return False
            except ConnectionRefusedError:
                return True

        wait_until(refused, 5, message="new connections to be refused")
        assert lb.popen.poll() is None  # still draining
        response = recv_all(sock, 10)
    assert response.startswith(b"HTTP/1.1 200 OK\r\n") and response.endswith(b"\r\n\r\nslow answer\n")
    assert lb.wait(10) == 0


def test_second_sigterm_exits_at_once(procs, faults):
    silent = faults(probe=OK, request=SILENT)
    lb = procs.fastlb(silent.port)  # default drain and server timeouts: 30 s and 10 s
    wait_up(lb, silent)

    with socket.create_connection(("127.0.0.1", lb.port), timeout=10) as sock:
        sock.sendall(b"GET /x HTTP/1.1\r\nHost: test\r\n\r\n")
        wait_until(lambda: silent.requests == 1, 5, message="the request to reach the backend")
        lb.signal(signal.SIGTERM)
        lb.wait_for_log(r"draining 1 connection")
        assert lb.popen.poll() is None
        started = time.monotonic()
        lb.signal(signal.SIGTERM)
        lb.wait(3)
        assert time.monotonic() - started < 2
        # The in-flight client is cut, not left hanging.
        assert recv_all(sock, 3) == b""


def _tgkill(pid: int, tid: int, signum: int) -> None:
    """Send a signal to one thread of another process (what kill(2) cannot aim)."""
    libc = ctypes.CDLL(None, use_errno=True)
    SYS_tgkill = {"x86_64": 234, "aarch64": 131}[os.uname().machine]
    if libc.syscall(SYS_tgkill, pid, tid, signum) != 0:
        raise OSError(ctypes.get_errno(), "tgkill")


@pytest.mark.skipif(os.uname().machine not in ("x86_64", "aarch64"), reason="tgkill number unknown")
def test_sigterm_delivered_to_a_worker_thread_still_stops_fastlb(procs, faults):
    """The kernel may hand a process signal to any thread; the main thread must still act on it."""
    backend = faults()
    lb = procs.fastlb("-N", 2, backend.port)
    wait_up(lb, backend)
    pid = lb.popen.pid
    others = [int(t) for t in os.listdir("/proc/%d/task" % pid) if int(t) != pid]
    assert others, "fastlb runs worker threads"
    _tgkill(pid, others[0], signal.SIGTERM)
    assert lb.wait(10) == 0


def test_silent_client_never_costs_a_backend_connection(procs, faults):
    backend = faults()
    lb = procs.fastlb("--client-timeout", 1, "--interval", 600, backend.port)
    wait_up(lb, backend)
    wait_until(lambda: backend.accepted == backend.probes, 5, message="start-up probes read")

    with socket.create_connection(("127.0.0.1", lb.port), timeout=5) as sock:
        assert recv_all(sock, 5) == b""
    # Every connection the backend ever saw was a health probe.
    assert backend.accepted == backend.probes
    assert who(lb.port) == b"fault\n"
    assert backend.requests == 1


def test_ordinary_servers_behind_the_classic_check_get_a_hint_to_use_another_check(procs, faults):
    # What a new user meets first: web servers that answer /healthcheck with a 404.
    plain = faults(probe=STATUS_404)
    lb = procs.fastlb(plain.port, wait=False)
    lb.wait_for_log(r"first health round done: 0 of 1")
    lb.wait_for_log(r"use --check http --check-path PATH, or --check tcp")


def test_health_checks_go_on_after_descriptors_ran_out(procs, faults):
    # Issue 11 item 2: an EMFILE while creating a probe socket used to kill the
    # health thread, and no backend was ever probed again.  Idle clients fill
    # a small descriptor limit; a probe round meets EMFILE; the clients leave;
    # probes must still notice a backend that dies afterwards.
    backend = faults()
    lb = procs.fastlb("--max-connections", 200, "--interval", 0.2, backend.port,
                      prefix=("prlimit", "--nofile=64:64"))
    idle = []
    try:
        for _ in range(80):
            idle.append(socket.create_connection(("127.0.0.1", lb.port), timeout=5))
        lb.wait_for_log(r"accept failed: Too many open files")
        lb.wait_for_log(r"internal error in starting a probe of 127\.0\.0\.1:%d" % backend.port)
    finally:
        for sock in idle:
            sock.close()
    backend.stop()
    lb.wait_for_log(down_line(backend.port, "connection refused"))
