"""The probe kinds: what a probe sends and how it judges the answer, as one non-blocking state machine.

A ``Probe`` connects to a backend's check port, sends its request, reads until
the answer can be judged and stops at its own deadline.  The kinds differ only
in the request (``request``) and the verdict (``judge``):

- ``load``: ``GET <path>`` and the classic answer, 200 with ``<errors>\\n<entries>``
  (SPEC §2, parsed by the compiled hot path); the verdict carries the figures.
- ``http``: ``GET <path>``; healthy when the status is in ``--check-status`` and,
  with ``--check-expect``, the text appears in the body.
- ``tcp``: a connect; with ``--check-send`` those bytes go out, and with
  ``--check-expect`` the text must appear in what the backend answers.
- ``none``: never probed (``HealthChecker`` keeps such backends up).

Toward a backend that takes the PROXY protocol on the probed port, the request
starts with a header carrying no address (v1 ``PROXY UNKNOWN``, v2 ``LOCAL``):
such servers (nginx ``listen ... proxy_protocol``) refuse anything else, and the
probe has no client whose address it could carry.

This module does no locking and knows no pool: ``fastlb.health`` runs the probes.
"""

from __future__ import annotations

import errno
import os
import selectors
import socket
import time
from typing import Any, Iterable, Optional

from fastlb import bridge
from fastlb.settings import Address, Check

# http and tcp checks read at most this much: enough for a status page or a
# Redis INFO section, bounded so a backend cannot make a probe buffer without end.
MAX_CHECK_ANSWER = 16384

# A verdict: ``(errors, entries)`` from a load check, HEALTHY from the others,
# None for a failed probe.
Result = Optional[tuple[int, ...]]
HEALTHY: Result = ()


def probe_port(address: Address) -> int:
    return address.check.port or address.port


def request(address: Address) -> bytes:
    """Everything a probe of ``address`` sends, in order."""
    check = address.check
    if check.kind in ("load", "http"):
        host = "[%s]" % address.host if ":" in address.host else address.host
        payload = ("GET %s HTTP/1.1\r\nHost: %s:%d\r\nConnection: close\r\n\r\n"
                   % (check.path, host, address.port)).encode("ascii", "replace")
    else:
        payload = check.send
        if not payload:
            # A connect-only check has nothing to put a header in front of.
            return b""
    if address.send_proxy and probe_port(address) == address.port:
        payload = bridge.build_proxy_header(address.send_proxy, None, None) + payload
    return payload


def reads_answer(address: Address) -> bool:
    check = address.check
    return check.kind in ("load", "http") or bool(check.expect)


def judge(address: Address, answer: bytes, at_eof: bool) -> Optional[tuple[Result, str]]:
    """The verdict on what the backend answered so far: ``(result, reason)``, or None to read on."""
    check = address.check
    if check.kind == "load":
        try:
            figures = bridge.parse_health_answer(answer, at_eof)
        except ValueError as exc:
            return None, str(exc)
        return None if figures is None else (figures, "ok")
    if check.kind == "http":
        return _judge_http(check, answer, at_eof)
    # tcp with --check-expect
    if check.expect in answer:
        return HEALTHY, "ok"
    if at_eof or len(answer) >= MAX_CHECK_ANSWER:
        return None, "expected %r not in the answer (%d bytes)" % (_shown(check.expect), len(answer))
    return None


def _judge_http(check: Check, answer: bytes, at_eof: bool) -> Optional[tuple[Result, str]]:
    status = bridge.parse_status_line(answer)
    if status < 0:
        return None, "malformed status line"
    if status == 0:
        return (None, "truncated answer") if at_eof else None
    if not check.accepts(status):
        return None, "status %d" % status
    if not check.expect:
        return HEALTHY, "ok (status %d)" % status
    head_end = answer.find(b"\r\n\r\n")
    body = answer[head_end + 4:] if head_end >= 0 else b""
    if head_end >= 0 and check.expect in body:
        return HEALTHY, "ok (status %d)" % status
    # The body is searched as it arrives, chunked framing and all; the probe
    # sent "Connection: close", so its end is the end of the connection.
    if at_eof or len(answer) >= MAX_CHECK_ANSWER:
        return None, "expected %r not in the body (status %d)" % (_shown(check.expect), status)
    return None


def _shown(text: bytes) -> str:
    return text.decode("utf-8", "backslashreplace")


def errno_reason(code: int) -> str:
    if code == errno.ECONNREFUSED:
        return "connection refused"
    return os.strerror(code)


class Probe:
    """One probe of one backend as a non-blocking state machine: connect, send, read, judge.

    ``done`` is set once ``result`` (see ``judge``) and ``reason`` are known; the
    whole probe is bounded by ``deadline``.  The owner registers ``sock`` for
    ``events`` and calls ``advance`` when it is ready, ``expire`` at the deadline
    and ``close`` once it has unregistered the socket.
    """

    def __init__(self, address: Address, timeout: float, backend: Any = None, rounds: Any = None):
        # ``backend`` and ``rounds`` (the rounds waiting for this probe) are the owner's business.
        self.address, self.timeout, self.backend, self.rounds = address, timeout, backend, rounds
        self.started = time.monotonic()
        self.deadline = self.started + timeout
        self.connected = False
        self.done = False
        self.result: Result = None
        self.reason = ""
        self.latency = 0.0               # seconds from start to outcome, once done
        self.answer = b""
        self.payload = request(address)
        self.sent = 0
        self.limit = bridge.MAX_HEALTH_ANSWER if address.check.kind == "load" else MAX_CHECK_ANSWER
        self.sock = socket.socket(address.family, socket.SOCK_STREAM)
        self.sock.setblocking(False)
        target = (address.ip or address.host, probe_port(address))
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
            self._on_connected()
        elif code not in (errno.EINPROGRESS, errno.EALREADY):
            self._finish(None, errno_reason(code))

    @property
    def events(self) -> int:
        if not self.connected or self.sent < len(self.payload):
            return selectors.EVENT_WRITE
        return selectors.EVENT_READ

    def advance(self) -> None:
        """Make progress after the selector reported the socket ready."""
        try:
            if not self.connected:
                code = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if code:
                    self._finish(None, errno_reason(code))
                else:
                    self._on_connected()
                return
            if self.sent < len(self.payload):
                self._send()
                return
            chunk = self.sock.recv(self.limit + 1 - len(self.answer))
        except BlockingIOError:
            return
        except OSError as exc:
            self._finish(None, exc.strerror or str(exc))
            return
        self.answer += chunk
        verdict = judge(self.address, self.answer, not chunk)
        if verdict is not None:
            self._finish(*verdict)
        elif not chunk:
            self._finish(None, "truncated answer")

    def _on_connected(self) -> None:
        self.connected = True
        self._send()

    def _send(self) -> None:
        try:
            # Usually a few hundred bytes into an empty socket buffer: one send.
            self.sent += self.sock.send(self.payload[self.sent:])
        except BlockingIOError:
            return
        except OSError as exc:
            self._finish(None, exc.strerror or str(exc))
            return
        if self.sent == len(self.payload) and not reads_answer(self.address):
            self._finish(HEALTHY, "ok (connected)")

    def expire(self) -> None:
        """The deadline passed before the answer could be judged."""
        if self.connected:
            self._finish(None, "timeout (no complete answer within %gs)" % self.timeout)
        else:
            self._finish(None, "timeout (no connection within %gs)" % self.timeout)

    def _finish(self, result: Result, reason: str) -> None:
        # The socket stays open until the owner has unregistered it (``close``).
        self.result, self.reason, self.done = result, reason, True
        self.latency = time.monotonic() - self.started

    def close(self) -> None:
        self.sock.close()


def probe_many(addresses: Iterable[Address],
               timeout: float) -> dict[str, tuple[Result, str, Optional[float]]]:
    """Probe several backends at once, outside any round: name -> (result, reason, latency).

    Used where no health thread loop is running yet or should be involved: a
    one-off check, and a reload probing its new backends before the swap.
    Backends with ``--check none`` are healthy without a probe.
    """
    results: dict[str, tuple[Result, str, Optional[float]]] = {}
    probes = []
    for address in addresses:
        if address.check.kind == "none":
            results[address.name] = (HEALTHY, "no health check", None)
        else:
            probes.append(Probe(address, timeout))
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
    for one in probes:
        one.close()
        results[one.address.name] = (one.result, one.reason, one.latency)
    return results


def probe(address: Address, timeout: float) -> tuple[Result, str]:
    """Probe one backend now: ``(result, "ok...")`` when healthy, else ``(None, reason)``."""
    result, reason, _ = probe_many([address], timeout)[address.name]
    return result, reason
