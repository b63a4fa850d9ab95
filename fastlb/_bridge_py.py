"""Pure-Python twin of the hot path: the byte relay, the HTTP parsers and the PROXY protocol codec.

This module is the readable specification of ``fastlb._bridge`` (compiled from
``src/bridge.pyx``): both expose the same names and make the same decisions, and
the test suite runs every relay and parser test on both.  Nothing but
``fastlb.bridge`` imports either twin.
"""

from __future__ import annotations

import math
import select
import socket
import time
from typing import Optional, Union

from fastlb._twin_common import RelayResult

__all__ = [
    "IMPLEMENTATION",
    "BUFFER_SIZE",
    "MAX_HEALTH_ANSWER",
    "MAX_PROXY_HEADER",
    "RelayResult",
    "parse_status_line",
    "parse_health_answer",
    "parse_proxy_header",
    "build_proxy_header",
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

_TCHAR = frozenset(
    b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
)
_DIGITS = frozenset(b"0123456789")

# An (ip, port) endpoint, and a parsed PROXY header: (length, source, destination).
Endpoint = tuple[str, int]
ProxyHeader = tuple[int, Optional[Endpoint], Optional[Endpoint]]
# A builder endpoint checked and packed: (family, packed address, port).
_Packed = tuple[int, bytes, int]


def parse_status_line(data: bytes) -> int:
    """Return the status code at the start of ``data``, 0 if more bytes are needed, -1 if malformed.

    A status line starts ``HTTP/1.<digit> <three digits>`` followed by a space,
    CR or LF; the code must be at least 100.  Only the first 13 bytes are
    examined: the reason phrase is the health parser's business.  Like the
    compiled twin, it takes bytes-like objects only.
    """
    if isinstance(data, str):
        raise TypeError("a bytes-like object is required, not 'str'")
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


def parse_health_answer(data: bytes, at_eof: bool) -> Optional[tuple[int, int]]:
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



# -- PROXY protocol (HAProxy's doc/proxy-protocol.txt, v1 text and v2 binary) --

# The longest header accepted: HAProxy's default buffer size.  A v1 line is at
# most 107 bytes; a v2 header is 16 bytes plus its length field, so a sender
# could announce up to 64 KiB of TLVs that nobody here reads.
MAX_PROXY_HEADER = 16384

PROXY_V1_PREFIX = b"PROXY "
# The v1 maximum, CRLF included: "PROXY UNKNOWN" plus two 39-character IPv6
# addresses, two 5-digit ports and their spaces.
PROXY_V1_MAX_LINE = 107
# Chosen so that no text protocol can start with it (a NUL, then "QUIT").
PROXY_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
# Signature, version/command, family/transport, 2-byte big-endian length.
PROXY_V2_FIXED_LEN = 16

_V2_LOCAL, _V2_PROXY = 0, 1
_V2_UNSPEC, _V2_INET, _V2_INET6, _V2_UNIX = 0, 1, 2, 3
_V2_STREAM, _V2_DGRAM = 1, 2
# The address block each family needs at least (addresses then ports);
# anything after it is TLVs.
_V2_ADDRESS_LEN = {_V2_UNSPEC: 0, _V2_INET: 12, _V2_INET6: 36, _V2_UNIX: 216}
_V2_FAMILIES = {_V2_INET: socket.AF_INET, _V2_INET6: socket.AF_INET6}
_V1_FAMILIES = {b"TCP4": socket.AF_INET, b"TCP6": socket.AF_INET6}

# Every decision reads at most the first 107 bytes (a v1 line, or a v2 fixed
# header and its 36-byte INET6 block); of the rest only the length matters.
_DECISIVE_BYTES = PROXY_V1_MAX_LINE


def parse_proxy_header(data: Union[bytes, bytearray, memoryview]) -> Optional[ProxyHeader]:
    """Parse the PROXY header at the start of ``data``: ``(length, source, destination)``, or None.

    None means ``data`` is a valid beginning of a header but not all of it yet.
    ``length`` is the header's size: whatever follows is the client's own
    bytes.  ``source`` and ``destination`` are ``(ip, port)`` with the address
    in ``socket.inet_ntop`` form, or both None when the sender says to use the
    connection's real endpoints (v1 UNKNOWN; v2 LOCAL; v2 PROXY for anything
    but TCP over IPv4 or IPv6).  Raises ``ValueError`` as soon as ``data``
    cannot start a valid header, in this order of checks:

    - the first bytes are neither "PROXY " nor the v2 signature
                                              "not a PROXY protocol header"
    - v1: no CRLF in the first 107 bytes      "v1 header too long"
    - v1: a complete line that is not ``TCP4|TCP6 src dst sport dport`` or
      ``UNKNOWN[ anything]``, or a CR not followed by LF
                                              "malformed v1 header"
    - v2 (13th byte): version is not 2        "v2 bad version"
    - v2 (13th byte): command not LOCAL/PROXY "v2 bad command"
    - v2 PROXY (14th byte): family above UNIX or transport above DGRAM
                                              "v2 bad address family"
    - v2 (16th byte): 16 + length field > MAX_PROXY_HEADER
                                              "v2 header too long"
    - v2 PROXY: length too short for the family's addresses
                                              "v2 address block too short"

    A v1 line is judged once its CRLF has arrived (or 107 bytes without one),
    a v2 header byte by byte.  ``data`` is any bytes-like object.
    """
    view = memoryview(data).cast("B")  # a str is a TypeError, as in the compiled twin
    n = len(view)
    head = view[:_DECISIVE_BYTES].tobytes()
    signature = PROXY_V1_PREFIX if head[:1] == b"P" else PROXY_V2_SIGNATURE
    # Decide at the first byte that differs, so that a client speaking
    # anything else is turned away without waiting for more.
    known = min(n, len(signature))
    if head[:known] != signature[:known]:
        raise ValueError("not a PROXY protocol header")
    if n < len(signature):
        return None
    if signature is PROXY_V1_PREFIX:
        return _parse_proxy_v1(head, n)
    return _parse_proxy_v2(head, n)


def _parse_proxy_v1(head: bytes, n: int) -> Optional[ProxyHeader]:
    # The line ends at its first CR, which must be followed by LF and leave
    # the line within 107 bytes: the CR is at index 105 at the latest.
    cr = head.find(b"\r", len(PROXY_V1_PREFIX), PROXY_V1_MAX_LINE - 1)
    if cr < 0:
        if n >= PROXY_V1_MAX_LINE:
            raise ValueError("v1 header too long")
        return None
    if cr + 1 == n:
        return None
    if head[cr + 1] != 0x0A:
        raise ValueError("malformed v1 header")
    length = cr + 2
    # Fields are separated by exactly one space: a doubled or trailing space
    # makes an empty field, which no address or port parses as.
    fields = head[len(PROXY_V1_PREFIX):cr].split(b" ")
    if fields[0] == b"UNKNOWN":
        return length, None, None  # whatever follows UNKNOWN is ignored
    family = _V1_FAMILIES.get(fields[0])
    if family is None or len(fields) != 5:
        raise ValueError("malformed v1 header")
    _, src, dst, sport, dport = fields
    return length, _v1_endpoint(family, src, sport), _v1_endpoint(family, dst, dport)


def _v1_endpoint(family: int, address: bytes, port: bytes) -> Endpoint:
    """``(canonical ip, port)`` from a v1 line's text fields."""
    try:
        # inet_pton of the line's family, as the compiled twin calls it: an
        # IPv6 address after TCP4 is malformed, and so are the lax forms
        # inet_aton would take ("1.2.3", "0x7f.1").
        packed = socket.inet_pton(family, address.decode("ascii"))
    except (OSError, ValueError):  # ValueError: non-ASCII or a NUL byte
        raise ValueError("malformed v1 header") from None
    if not 1 <= len(port) <= 5 or any(c not in _DIGITS for c in port) or int(port) > 65535:
        raise ValueError("malformed v1 header")
    return socket.inet_ntop(family, packed), int(port)


def _parse_proxy_v2(head: bytes, n: int) -> Optional[ProxyHeader]:
    if n < 13:
        return None
    version, command = head[12] >> 4, head[12] & 0x0F
    if version != 2:
        raise ValueError("v2 bad version")
    if command not in (_V2_LOCAL, _V2_PROXY):
        raise ValueError("v2 bad command")
    if n < 14:
        return None
    # LOCAL (a health check from the proxy itself) ignores the family byte
    # and the address block entirely.
    family, transport = head[13] >> 4, head[13] & 0x0F
    if command == _V2_PROXY and (family > _V2_UNIX or transport > _V2_DGRAM):
        raise ValueError("v2 bad address family")
    if n < PROXY_V2_FIXED_LEN:
        return None
    length = PROXY_V2_FIXED_LEN + int.from_bytes(head[14:16], "big")
    if length > MAX_PROXY_HEADER:
        raise ValueError("v2 header too long")
    if command == _V2_PROXY and length - PROXY_V2_FIXED_LEN < _V2_ADDRESS_LEN[family]:
        raise ValueError("v2 address block too short")
    if n < length:
        return None
    if command == _V2_LOCAL or transport != _V2_STREAM or family not in _V2_FAMILIES:
        return length, None, None
    # Source address, destination address, source port, destination port;
    # TLVs after the block are skipped.
    size = 4 if family == _V2_INET else 16
    block = head[PROXY_V2_FIXED_LEN:PROXY_V2_FIXED_LEN + 2 * size + 4]
    af = _V2_FAMILIES[family]
    source = socket.inet_ntop(af, block[:size]), int.from_bytes(block[2 * size:2 * size + 2], "big")
    destination = (socket.inet_ntop(af, block[size:2 * size]),
                   int.from_bytes(block[2 * size + 2:2 * size + 4], "big"))
    return length, source, destination


def _packed_endpoint(address: object) -> _Packed:
    """``(family, packed address, port)`` of a builder argument, or the ValueError/TypeError it deserves."""
    if not isinstance(address, tuple) or len(address) != 2:
        raise TypeError("an endpoint is an (ip, port) tuple")
    ip, port = address
    if not isinstance(ip, str) or not isinstance(port, int):
        raise TypeError("an endpoint is an (ip, port) tuple")
    if not 0 <= port <= 65535:
        raise ValueError("port %r is outside 0-65535" % port)
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            return family, socket.inet_pton(family, ip), port
        except (OSError, ValueError):  # ValueError: a NUL or an unencodable character
            pass
    raise ValueError("invalid IP address %r" % ip)


def build_proxy_header(version: int, source: Optional[Endpoint],
                       destination: Optional[Endpoint]) -> bytes:
    """The PROXY protocol header (``version`` 1 or 2) that announces ``source`` -> ``destination``.

    Each endpoint is ``(ip, port)``.  When either is None the header says to
    use the connection's own endpoints (v1 UNKNOWN, v2 LOCAL).  When one
    address is IPv4 and the other IPv6, the IPv4 one is sent as an
    IPv4-mapped IPv6 address.  Raises ``ValueError`` for another version, an
    address ``inet_pton`` rejects or a port outside 0..65535, and
    ``TypeError`` for an endpoint that is not an ``(str, int)`` tuple.
    """
    if version not in (1, 2):
        raise ValueError("PROXY protocol version must be 1 or 2")
    src = None if source is None else _packed_endpoint(source)
    dst = None if destination is None else _packed_endpoint(destination)
    if src is None or dst is None:
        if version == 1:
            return b"PROXY UNKNOWN\r\n"
        return PROXY_V2_SIGNATURE + bytes([0x20, 0x00, 0x00, 0x00])
    if src[0] != dst[0]:
        src, dst = (_ipv4_mapped(e) for e in (src, dst))
    family = src[0]
    if version == 1:
        return b"PROXY %s %s %s %d %d\r\n" % (
            b"TCP4" if family == socket.AF_INET else b"TCP6",
            socket.inet_ntop(family, src[1]).encode(), socket.inet_ntop(family, dst[1]).encode(),
            src[2], dst[2])
    block = src[1] + dst[1] + src[2].to_bytes(2, "big") + dst[2].to_bytes(2, "big")
    family_byte = 0x11 if family == socket.AF_INET else 0x21  # INET or INET6, STREAM
    return PROXY_V2_SIGNATURE + bytes([0x21, family_byte]) + len(block).to_bytes(2, "big") + block


def _ipv4_mapped(endpoint: _Packed) -> _Packed:
    """The endpoint as IPv6: an IPv4 address becomes ::ffff:a.b.c.d."""
    family, packed, port = endpoint
    if family == socket.AF_INET6:
        return endpoint
    return socket.AF_INET6, b"\x00" * 10 + b"\xff\xff" + packed, port

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
          idle_timeout: float, splice: Optional[bool] = None) -> RelayResult:
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
