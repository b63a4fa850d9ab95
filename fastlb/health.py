"""Health checks: probe rounds run by one health-check thread, every probe in parallel.

Who runs where: the health-check thread (``HealthChecker.run``) owns a selector
and every probe socket.  It starts a round at start-up, whenever the accept
loop calls ``trigger`` (the R-th accepted connection) and every ``interval``
seconds.  A round starts one non-blocking ``Probe`` per backend; all of them
progress together in the thread's event loop, each result is applied to the
pool the moment it is complete, and each probe is cut at its own deadline, so
one hung backend delays nobody.  A backend whose previous probe is still
running is skipped (``BackendPool.begin_probe``).  No lock is held while
probing: the pool's lock is taken only to apply results.

One thread and no thread per probe: under load the SPEC's count-triggered
rounds come every few milliseconds, and creating threads for them cost more
than the probes themselves.
"""

from __future__ import annotations

import errno
import logging
import os
import selectors
import socket
import threading
import time
from typing import Optional

from fastlb import bridge
from fastlb.pool import Backend, BackendPool
from fastlb.settings import Address
from fastlb.waker import Waker

log = logging.getLogger("fastlb")

# How long the start-up round still waits for the other backends once one is up.
STARTUP_GRACE = 0.5


def health_request(address: Address) -> bytes:
    host = "[%s]" % address.host if ":" in address.host else address.host
    return (
        "GET /healthcheck HTTP/1.1\r\nHost: %s:%d\r\nConnection: close\r\n\r\n" % (host, address.port)
    ).encode("ascii", "replace")


class Probe:
    """One probe as a non-blocking state machine: connect, send the request, read, judge.

    ``done`` is set once ``result`` (``(errors, entries)`` or None) and ``reason``
    are known; the whole probe is bounded by ``deadline``.
    """

    def __init__(self, address: Address, timeout: float, backend: Optional[Backend] = None,
                 entry: Optional[list] = None):
        self.address, self.timeout, self.backend, self.entry = address, timeout, backend, entry
        self.started = time.monotonic()
        self.deadline = self.started + timeout
        self.connected = False
        self.done = False
        self.result: Optional[tuple[int, int]] = None
        self.reason = ""
        self.latency = 0.0               # seconds from start to outcome, once done
        self.answer = b""
        self.sock = socket.socket(address.family, socket.SOCK_STREAM)
        self.sock.setblocking(False)
        target = (address.ip or address.host, address.port)
        try:
            code = self.sock.connect_ex(target)
            if code == errno.EINPROGRESS:
                # Asking again tells at once whether the handshake is over (it
                # is, on loopback): then the request goes out now, without a
                # round through the selector for writability.
                code = self.sock.connect_ex(target)
        except OSError as exc:
            code = exc.errno or errno.EINVAL
        if code in (0, errno.EISCONN):
            self._send_request()
        elif code not in (errno.EINPROGRESS, errno.EALREADY):
            self._finish(None, _errno_reason(code))

    @property
    def events(self) -> int:
        return selectors.EVENT_READ if self.connected else selectors.EVENT_WRITE

    def advance(self) -> None:
        """Make progress after the selector reported the socket ready."""
        try:
            if not self.connected:
                code = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if code:
                    self._finish(None, _errno_reason(code))
                    return
                self._send_request()
                return
            chunk = self.sock.recv(bridge.MAX_HEALTH_ANSWER + 1 - len(self.answer))
        except BlockingIOError:
            return
        except OSError as exc:
            self._finish(None, exc.strerror or str(exc))
            return
        self.answer += chunk
        try:
            result = bridge.parse_health_answer(self.answer, not chunk)
        except ValueError as exc:
            self._finish(None, str(exc))
            return
        if result is not None:
            self._finish(result, "ok")

    def _send_request(self) -> None:
        self.connected = True
        try:
            # A few hundred bytes into an empty socket buffer: one send does it.
            self.sock.send(health_request(self.address))
        except OSError as exc:
            self._finish(None, exc.strerror or str(exc))

    def expire(self) -> None:
        """The deadline passed before the answer was complete."""
        if self.connected:
            self._finish(None, "timeout (no complete answer within %gs)" % self.timeout)
        else:
            self._finish(None, "timeout (no connection within %gs)" % self.timeout)

    def _finish(self, result: Optional[tuple[int, int]], reason: str) -> None:
        # The socket stays open until the owner has unregistered it (``close``).
        self.result, self.reason, self.done = result, reason, True
        self.latency = time.monotonic() - self.started

    def close(self) -> None:
        self.sock.close()


def _errno_reason(code: int) -> str:
    if code == errno.ECONNREFUSED:
        return "connection refused"
    return os.strerror(code)


def probe_many(addresses, timeout: float) -> dict:
    """Probe several backends at once, outside any round: name -> (result, reason, latency).

    Used where no health thread loop is running yet or should be involved: a
    one-off check, and a reload probing its new backends before the swap.
    """
    probes = [Probe(address, timeout) for address in addresses]
    with selectors.DefaultSelector() as selector:
        for one in probes:
            if not one.done:
                selector.register(one.sock, one.events, one)
        while any(not one.done for one in probes):
            deadline = min(one.deadline for one in probes if not one.done)
            for key, _ in selector.select(max(0.0, deadline - time.monotonic())):
                one = key.data
                one.advance()
                if one.done:
                    selector.unregister(one.sock)
                else:
                    selector.modify(one.sock, one.events, one)
            now = time.monotonic()
            for one in probes:
                if not one.done and one.deadline <= now:
                    one.expire()
                    selector.unregister(one.sock)
    results = {}
    for one in probes:
        one.close()
        results[one.address.name] = (one.result, one.reason, one.latency)
    return results


def probe(address: Address, timeout: float) -> tuple[Optional[tuple[int, int]], str]:
    """Probe one backend now: ``((errors, entries), "ok")`` when healthy, else ``(None, reason)``."""
    result, reason, _ = probe_many([address], timeout)[address.name]
    return result, reason


class HealthChecker:
    """Runs probe rounds over a pool (see the module comment)."""

    def __init__(self, pool: BackendPool, probe_timeout: float, interval: float):
        self.pool = pool
        self.probe_timeout = probe_timeout
        self.interval = interval
        self._selector = selectors.DefaultSelector()
        # Under load the accept loop triggers a round every few connections:
        # the waker writes one byte per wait, not one per trigger.
        self._waker = Waker()
        self._selector.register(self._waker, selectors.EVENT_READ, None)
        self._probes: set[Probe] = set()
        self._triggered = False
        self._stopped = False
        self._thread: Optional[threading.Thread] = None

    # -- any thread ------------------------------------------------------------------

    def trigger(self) -> None:
        """Ask for a round now (called by the accept loop on the R-th connection)."""
        self._triggered = True
        self._waker.wake()

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="fastlb-health", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopped = True
        self._waker.wake()

    # -- the health-check thread (or the caller of first_round, before it starts) -----

    def start_round(self) -> None:
        """Start probing every backend not already being probed.

        Once the last probe started here is applied the pool is told, so the
        connections waiting for fresh figures are routed (``BackendPool.round_applied``).
        """
        entry = [self.pool.begin_round(), 0]     # [pool's round entry, probes still running]
        for backend in self.pool.backends:
            if self.pool.begin_probe(backend):
                entry[1] += 1
                one = Probe(backend.address, self.probe_timeout, backend, entry)
                if one.done:
                    self._apply(one)
                else:
                    self._probes.add(one)
                    self._selector.register(one.sock, one.events, one)
        if entry[1] == 0:
            self.pool.finish_round(entry[0])

    def first_round(self) -> int:
        """Probe every backend; return once all have answered, or ``STARTUP_GRACE`` after one is up.

        So a hung backend delays the first traffic by the grace rather than by
        the probe timeout (SPEC §2: a hung backend never blocks traffic), while
        healthy backends that answer within the grace all take part in the
        first choices.  Probes still running go on in the health thread
        (``run``).  Returns how many are still running.
        """
        self.start_round()
        grace_end = float("inf")
        while self._probes and time.monotonic() < grace_end:
            self._step(grace_end)
            if grace_end == float("inf") and self.pool.any_up():
                grace_end = time.monotonic() + STARTUP_GRACE
        return len(self._probes)

    def run(self) -> None:
        next_timed = time.monotonic() + self.interval
        while not self._stopped:
            self._step(next_timed)
            if self._stopped:
                break
            started = False
            if self._triggered:
                self._triggered = False
                self.start_round()
                started = True
            if time.monotonic() >= next_timed:
                if not started:
                    self.start_round()
                next_timed = time.monotonic() + self.interval
        for one in list(self._probes):
            self._selector.unregister(one.sock)
            one.close()

    def _step(self, until: float = float("inf")) -> None:
        """Wait for socket events or the next deadline, and advance the probes."""
        deadline = min([until] + [one.deadline for one in self._probes])
        timeout = max(0.0, deadline - time.monotonic())
        for key, _ in self._selector.select(None if timeout == float("inf") else timeout):
            one = key.data
            if one is None:
                # run() reads the flags once this step returns.
                self._waker.drain()
                continue
            one.advance()
            if one.done:
                self._apply(one)
            else:
                self._selector.modify(one.sock, one.events, one)
        now = time.monotonic()
        for one in [p for p in self._probes if p.deadline <= now]:
            one.expire()
            self._apply(one)

    def _apply(self, one: Probe) -> None:
        if one in self._probes:
            self._probes.discard(one)
            self._selector.unregister(one.sock)
        one.close()
        self.pool.apply_probe(one.backend, one.result, one.reason, one.latency)
        entry = one.entry
        entry[1] -= 1
        if entry[1] == 0:
            self.pool.finish_round(entry[0])
