"""Pure-Python twin of the hot path: the byte relay and the HTTP parsers.

This module is the readable specification of ``fastlb._bridge`` (compiled from
``src/bridge.pyx``): both expose the same names and make the same decisions, and
the test suite runs every relay and parser test on both.  Nothing but
``fastlb.bridge`` imports either twin.
"""

from __future__ import annotations

import collections
import math
import select
import socket
import time

__all__ = [
    "IMPLEMENTATION",
    "BUFFER_SIZE",
    "MAX_HEALTH_ANSWER",
    "RelayResult",
    "parse_status_line",
    "parse_health_answer",
    "relay",
]

IMPLEMENTATION = "python"

# One recv per poll wake-up.  64 KiB is the default loopback socket buffer
# granularity: smaller chunks cost a Python round trip per few KiB on bulk
# transfers, larger ones only grow memory per worker.
BUFFER_SIZE = 65536

# The health answer is a status line, a few headers and two integers; anything
# longer than this is not a health answer, and reading it would let a hostile
# backend make us buffer without bound.
MAX_HEALTH_ANSWER = 4096

# "HTTP/1.x NNN" plus the character after the code: all that is needed to
# know the status of a response.
STATUS_PREFIX_LEN = 13

# Largest value the health answer may carry (63 bits, a signed 64-bit int).
MAX_COUNT = (1 << 63) - 1

RelayResult = collections.namedtuple(
    "RelayResult", "bytes_up bytes_down up_end down_end end status"
)
RelayResult.__doc__ = """How one relay ended.

bytes_up     bytes passed client -> backend
bytes_down   bytes passed backend -> client
up_end       how client -> backend ended: "eof", "error" or "open"
down_end     how backend -> client ended: "eof", "error" or "open"
end          why the relay returned: "done" (both directions reached EOF),
             "server_timeout" (no byte from the backend within server_timeout
             of the last byte sent to it, before any byte reached the client),
             "idle_timeout", "client_error" or "server_error"
status       status code of the first response passed to the client, 0 when
             the backend's first bytes were not an HTTP/1.x status line
"""

_TCHAR = frozenset(
    b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
)
_DIGITS = frozenset(b"0123456789")


def parse_status_line(data: bytes) -> int:
    """Return the status code at the start of ``data``, 0 if more bytes are needed, -1 if malformed.

    A status line starts ``HTTP/1.<digit> <three digits>`` followed by a space,
    CR or LF; the code must be at least 100.  Only the first 13 bytes are
    examined: the reason phrase is the health parser's business.
    """
    prefix = b"HTTP/1."
    n = len(data)
    for i in range(min(n, 7)):
        if data[i] != prefix[i]:
            return -1
    if n < 8:
        return 0
    if data[7] not in _DIGITS:
        return -1
    if n < 9:
        return 0
    if data[8] != 0x20:
        return -1
    for i in range(9, 12):
        if i >= n:
            return 0
        if data[i] not in _DIGITS:
            return -1
    if n < 13:
        return 0
    if data[12] not in (0x20, 0x0D, 0x0A):
        return -1
    code = int(data[9:12])
    return code if code >= 100 else -1


def _parse_count(field: bytes) -> int:
    if not field or any(c not in _DIGITS for c in field):
        raise ValueError("malformed body")
    # More than 19 digits cannot fit in 63 bits (leading zeros aside, which
    # would make the answer absurd anyway).
    if len(field) > 19 or int(field) > MAX_COUNT:
        raise ValueError("number too large")
    return int(field)


def parse_health_answer(data: bytes, at_eof: bool):
    """Parse a complete health answer: ``(errors, entries)``, or None if more bytes are needed.

    ``at_eof`` says the backend closed the connection, so ``data`` is all there
    will be.  Raises ``ValueError`` with a short reason (the one fastlb logs)
    when the answer is not a healthy one:

    - longer than MAX_HEALTH_ANSWER bytes                 "answer too long"
    - the first bytes are not a status line               "malformed status line"
    - any status but 200                                  "status NNN"
    - control characters in the reason phrase             "malformed status line"
    - a header line without a token name and a colon      "malformed header"
    - Content-Length not digits, or two different ones    "malformed content-length"
    - any Transfer-Encoding                               "unsupported transfer-encoding"
    - EOF inside the head, or before Content-Length bytes "truncated answer"
    - a body other than ``<digits>\\n<digits>`` with an optional final ``\\n``
                                                          "malformed body"
    - a number above 2**63-1                              "number too large"

    Lines may end in CRLF or LF.  With Content-Length the body is exactly that
    many bytes (extra bytes are ignored); without it the body runs to EOF.
    """
    if len(data) > MAX_HEALTH_ANSWER:
        raise ValueError("answer too long")
    status = parse_status_line(data)
    if status < 0:
        raise ValueError("malformed status line")
    if status == 0:
        if at_eof:
            raise ValueError("truncated answer")
        return None
    if status != 200:
        raise ValueError("status %d" % status)

    eol = data.find(b"\n")
    if eol < 0:
        if at_eof:
            raise ValueError("truncated answer")
        return None
    line_end = eol - 1 if eol > 0 and data[eol - 1] == 0x0D else eol
    for c in data[STATUS_PREFIX_LEN:line_end]:
        if c < 0x20 and c != 0x09 or c == 0x7F:
            raise ValueError("malformed status line")

    content_length = -1
    pos = eol + 1
    while True:
        eol = data.find(b"\n", pos)
        if eol < 0:
            if at_eof:
                raise ValueError("truncated answer")
            return None
        line_end = eol - 1 if eol > pos and data[eol - 1] == 0x0D else eol
        if line_end == pos:
            pos = eol + 1
            break
        colon = data.find(b":", pos, line_end)
        if colon <= pos or any(c not in _TCHAR for c in data[pos:colon]):
            raise ValueError("malformed header")
        name = data[pos:colon].lower()
        value = data[colon + 1 : line_end].strip(b" \t")
        if name == b"content-length":
            if not value or len(value) > 10 or any(c not in _DIGITS for c in value):
                raise ValueError("malformed content-length")
            length = int(value)
            if content_length >= 0 and length != content_length:
                raise ValueError("malformed content-length")
            content_length = length
        elif name == b"transfer-encoding":
            raise ValueError("unsupported transfer-encoding")
        pos = eol + 1

    body = data[pos:]
    if content_length >= 0:
        if pos + content_length > MAX_HEALTH_ANSWER:
            raise ValueError("answer too long")
        if len(body) < content_length:
            if at_eof:
                raise ValueError("truncated answer")
            return None
        body = body[:content_length]
    elif not at_eof:
        return None

    if body.endswith(b"\n"):
        body = body[:-1]
    errors, sep, entries = body.partition(b"\n")
    if not sep:
        raise ValueError("malformed body")
    return _parse_count(errors), _parse_count(entries)


def _send_all(sock: socket.socket, data: memoryview, deadline: float) -> bool:
    """Write all of ``data`` before ``deadline``; False when the deadline passed first."""
    sent = 0
    poller = None
    while sent < len(data):
        try:
            sent += sock.send(data[sent:], socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
            continue
        except BlockingIOError:
            pass
        if poller is None:
            poller = select.poll()
            poller.register(sock.fileno(), select.POLLOUT)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        # POLLERR/POLLHUP also wake us; the next send then raises the error.
        poller.poll(math.ceil(remaining * 1000))
    return True


def relay(client: socket.socket, server: socket.socket, server_timeout: float,
          idle_timeout: float, splice=None) -> RelayResult:
    """Relay bytes both ways between two connected sockets until both directions end.

    When one side reaches EOF, writing toward the other side is shut down and the
    opposite direction goes on (half-close).  Before the backend's first byte,
    the relay gives up ``server_timeout`` seconds after the last byte sent to the
    backend; afterwards, when nothing moved either way for ``idle_timeout``
    seconds.  A reset or error on either side ends the relay.  The sockets are
    neither closed nor changed otherwise; the caller owns them.  ``splice`` is
    accepted for API compatibility with the compiled twin; this twin always copies.
    """
    cfd, sfd = client.fileno(), server.fileno()
    poller = select.poll()
    poller.register(cfd, select.POLLIN)
    poller.register(sfd, select.POLLIN)
    buf = bytearray(BUFFER_SIZE)
    view = memoryview(buf)
    up_end = down_end = "open"
    bytes_up = bytes_down = 0
    head = b""
    status = -1  # -1: first response not seen yet
    end = "done"
    now = time.monotonic()
    last_up = last_any = now

    while up_end == "open" or down_end == "open":
        if bytes_down == 0 and down_end == "open":
            deadline, on_timeout = last_up + server_timeout, "server_timeout"
        else:
            deadline, on_timeout = last_any + idle_timeout, "idle_timeout"
        wait = deadline - now
        events = poller.poll(math.ceil(wait * 1000)) if wait > 0 else []
        now = time.monotonic()
        if not events:
            if now >= deadline:
                end = on_timeout
                break
            continue
        for fd, _ in events:
            upstream = fd == cfd
            src, dst = (client, server) if upstream else (server, client)
            try:
                n = src.recv_into(buf, BUFFER_SIZE, socket.MSG_DONTWAIT)
            except BlockingIOError:
                continue
            except OSError:
                n = -1
            if n <= 0:
                state = "eof" if n == 0 else "error"
                if upstream:
                    up_end = state
                else:
                    down_end = state
                if state == "error":
                    end = "client_error" if upstream else "server_error"
                    break
                poller.unregister(fd)
                try:
                    dst.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                continue
            if not upstream and status < 0:
                head += bytes(view[: min(n, STATUS_PREFIX_LEN - len(head))])
                code = parse_status_line(head)
                if code != 0 or len(head) >= STATUS_PREFIX_LEN:
                    status = max(code, 0)
            try:
                complete = _send_all(dst, view[:n], now + idle_timeout)
            except OSError:
                complete = None
            now = time.monotonic()
            if complete is None:
                # The destination is gone: both directions are over.
                if upstream:
                    up_end, end = "error", "server_error"
                else:
                    down_end, end = "error", "client_error"
                break
            if not complete:
                end = "idle_timeout"
                break
            if upstream:
                bytes_up += n
                last_up = now
            else:
                bytes_down += n
            last_any = now
        if end != "done":
            break
    return RelayResult(bytes_up, bytes_down, up_end, down_end, end, max(status, 0))
