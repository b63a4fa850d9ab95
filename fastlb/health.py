"""Health checks: one probe per backend, in parallel rounds run by the health-check thread.

Who runs where: the health-check thread (``HealthChecker.run``) starts a round
at start-up, whenever the accept loop calls ``trigger`` (the R-th accepted
connection) and every ``interval`` seconds.  A round starts one short-lived
thread per backend; each probes with its own socket and applies its result to
the pool as soon as it has it, so one hung backend delays nobody.  A backend
whose previous probe is still running is skipped (``BackendPool.begin_probe``).
No lock is held while probing: the pool's lock is taken only to apply results.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Optional

from fastlb import bridge
from fastlb.pool import Backend, BackendPool
from fastlb.settings import Address

log = logging.getLogger("fastlb")


def health_request(address: Address) -> bytes:
    host = "[%s]" % address.host if ":" in address.host else address.host
    return (
        "GET /healthcheck HTTP/1.1\r\nHost: %s:%d\r\nConnection: close\r\n\r\n" % (host, address.port)
    ).encode("ascii", "replace")


def probe(address: Address, timeout: float) -> tuple[Optional[tuple[int, int]], str]:
    """Probe one backend: ``((errors, entries), "ok")`` when healthy, else ``(None, reason)``.

    The whole probe (connect, send, read the answer) must finish within ``timeout``.
    """
    deadline = time.monotonic() + timeout
    sock = socket.socket(address.family, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        try:
            sock.connect((address.ip or address.host, address.port))
        except ConnectionRefusedError:
            return None, "connection refused"
        except socket.timeout:
            return None, "timeout (no connection within %gs)" % timeout
        sock.sendall(health_request(address))
        answer = b""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise socket.timeout
            sock.settimeout(remaining)
            chunk = sock.recv(bridge.MAX_HEALTH_ANSWER + 1 - len(answer))
            answer += chunk
            try:
                result = bridge.parse_health_answer(answer, not chunk)
            except ValueError as exc:
                return None, str(exc)
            if result is not None:
                return result, "ok"
    except socket.timeout:
        return None, "timeout (no complete answer within %gs)" % timeout
    except OSError as exc:
        return None, exc.strerror or str(exc)
    finally:
        sock.close()


class HealthChecker:
    """Runs probe rounds over a pool (see the module comment)."""

    def __init__(self, pool: BackendPool, probe_timeout: float, interval: float):
        self.pool = pool
        self.probe_timeout = probe_timeout
        self.interval = interval
        self._triggered = threading.Event()
        self._stopped = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.rounds = 0

    def probe_backend(self, backend: Backend) -> None:
        started = time.monotonic()
        result, reason = probe(backend.address, self.probe_timeout)
        self.pool.apply_probe(backend, result, reason, time.monotonic() - started)

    def start_round(self) -> list[threading.Thread]:
        """Start probing every backend not already being probed; return the probe threads.

        Once the last probe started here is applied the pool is told, so the
        connections waiting for fresh figures are routed (``BackendPool.round_applied``).
        """
        self.rounds += 1
        entry = self.pool.begin_round()
        claimed = [backend for backend in self.pool.backends if self.pool.begin_probe(backend)]
        left = [len(claimed)]
        left_lock = threading.Lock()

        def probe_and_count(backend: Backend) -> None:
            try:
                self.probe_backend(backend)
            finally:
                with left_lock:
                    left[0] -= 1
                    last = left[0] == 0
                if last:
                    self.pool.finish_round(entry)

        if not claimed:
            self.pool.finish_round(entry)
        threads = []
        for backend in claimed:
            thread = threading.Thread(
                target=probe_and_count, args=(backend,), daemon=True,
                name="fastlb-probe-%s" % backend.name,
            )
            thread.start()
            threads.append(thread)
        return threads

    def first_round(self) -> None:
        """Probe every backend and wait for all answers (each bounded by the probe timeout)."""
        for thread in self.start_round():
            thread.join()

    def trigger(self) -> None:
        """Ask for a round now (called by the accept loop on the R-th connection)."""
        self._triggered.set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="fastlb-health", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        self._triggered.set()

    def run(self) -> None:
        next_timed = time.monotonic() + self.interval
        while not self._stopped.is_set():
            triggered = self._triggered.wait(max(0.0, next_timed - time.monotonic()))
            if self._stopped.is_set():
                break
            if triggered:
                self._triggered.clear()
                self.start_round()
            if time.monotonic() >= next_timed:
                if not triggered:
                    self.start_round()
                next_timed = time.monotonic() + self.interval
