"""The PROXY protocol header parser and builder (HAProxy's v1 text and v2 binary), on both twins.

Every example runs on the pure-Python twin (the specification) and on the
compiled one.  Hypothesis then feeds both twins the same random bytes, valid
headers from random endpoints and mutations of them, and random builder
arguments, and demands identical outcomes, error messages included; the
properties (round trip, split reads, an early decision is the final one) run on
both twins too.

The properties run a few hundred examples each, so this file takes seconds.
To fuzz for longer, raise every property's example count with an environment
variable (and lift pytest's per-test timeout), for instance::

    FASTLB_FUZZ_EXAMPLES=1000000 .venv/bin/python -m pytest -q --timeout=0 tests/test_proxy_header.py -k twins_agree
"""

from __future__ import annotations

import ipaddress
import os
import socket

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastlb.bridge import NO_EXTENSIONS, Twin

SIG = b"\r\n\r\n\x00\r\nQUIT\n"
MAX = 16384
NOT_PROXY = "not a PROXY protocol header"
V1_TOO_LONG = "v1 header too long"
V1_MALFORMED = "malformed v1 header"


def v2(ver_cmd: int, family: int, block: bytes = b"", length: int | None = None) -> bytes:
    """A v2 header: signature, version/command, family/transport, length (block's by default), block."""
    length = len(block) if length is None else length
    return SIG + bytes([ver_cmd, family]) + length.to_bytes(2, "big") + block


def inet(src: str, dst: str, sport: int, dport: int) -> bytes:
    """A v2 INET or INET6 address block: both addresses, then both ports, big-endian."""
    family = socket.AF_INET6 if ":" in src else socket.AF_INET
    return (socket.inet_pton(family, src) + socket.inet_pton(family, dst)
            + sport.to_bytes(2, "big") + dport.to_bytes(2, "big"))


def outcome(call, *args):
    """What a call did, comparable across twins: its value, or its error type and message."""
    try:
        return ("value", call(*args))
    except (ValueError, TypeError) as exc:
        return (type(exc).__name__, str(exc))


def raises(parse, data, reason: str) -> None:
    with pytest.raises(ValueError) as excinfo:
        parse(data)
    assert str(excinfo.value) == reason


# -- v1 -------------------------------------------------------------------------

V1_VALID = [
    (b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n",
     ("192.168.0.1", 56324), ("192.168.0.11", 443)),
    (b"PROXY TCP4 255.255.255.255 0.0.0.0 65535 0\r\n", ("255.255.255.255", 65535), ("0.0.0.0", 0)),
    (b"PROXY TCP4 10.0.0.1 10.0.0.2 00080 08080\r\n", ("10.0.0.1", 80), ("10.0.0.2", 8080)),
    (b"PROXY TCP6 2001:db8::1 2001:db8::2 1 2\r\n", ("2001:db8::1", 1), ("2001:db8::2", 2)),
    # Addresses come back in inet_ntop's canonical form.
    (b"PROXY TCP6 2001:DB8:0:0:0:0:0:1 2001:0db8::0:2 1 2\r\n", ("2001:db8::1", 1), ("2001:db8::2", 2)),
    (b"PROXY TCP6 ::1 :: 65535 0\r\n", ("::1", 65535), ("::", 0)),
    (b"PROXY TCP6 ::ffff:1.2.3.4 ::FFFF:0102:0304 5 6\r\n", ("::ffff:1.2.3.4", 5), ("::ffff:1.2.3.4", 6)),
    (b"PROXY UNKNOWN\r\n", None, None),
    (b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n", None, None),
    (b"PROXY UNKNOWN TCP4 not even an address\r\n", None, None),
    (b"PROXY UNKNOWN \x00\xff\n\t\r\n", None, None),
]


@pytest.mark.parametrize("header, source, destination", V1_VALID)
def test_v1_header_gives_its_endpoints(bridge_impl, header, source, destination):
    assert bridge_impl.parse_proxy_header(header) == (len(header), source, destination)


def test_v1_length_says_where_the_client_payload_starts(bridge_impl):
    header = b"PROXY TCP4 1.2.3.4 5.6.7.8 1000 80\r\n"
    payload = b"GET / HTTP/1.1\r\nHost: x\r\n\r\nPROXY TCP4 9.9.9.9 9.9.9.9 9 9\r\n"
    length, source, destination = bridge_impl.parse_proxy_header(header + payload)
    assert (header + payload)[length:] == payload
    assert (source, destination) == (("1.2.3.4", 1000), ("5.6.7.8", 80))


# The longest lines: 107 bytes with the CRLF, as HAProxy's worst case.
LONGEST_UNKNOWN = b"PROXY UNKNOWN " + b"x" * 91 + b"\r\n"
LONGEST_TCP6 = (b"PROXY TCP6 0000:0000:0000:0000:0000:ffff:255.255.255.255 "
                b"0:0000:0000:0000:0000:0000:0000:0001 00001 00002\r\n")


def test_v1_line_of_107_bytes_is_accepted(bridge_impl):
    assert len(LONGEST_UNKNOWN) == len(LONGEST_TCP6) == 107
    assert bridge_impl.parse_proxy_header(LONGEST_UNKNOWN) == (107, None, None)
    assert bridge_impl.parse_proxy_header(LONGEST_TCP6) == (
        107, ("::ffff:255.255.255.255", 1), ("::1", 2))


def test_v1_line_of_108_bytes_is_too_long(bridge_impl):
    too_long = b"PROXY UNKNOWN " + b"x" * 92 + b"\r\n"
    assert len(too_long) == 108
    raises(bridge_impl.parse_proxy_header, too_long, V1_TOO_LONG)
    # Decided at the 107th byte: the CRLF can no longer fit.
    raises(bridge_impl.parse_proxy_header, too_long[:107], V1_TOO_LONG)
    assert bridge_impl.parse_proxy_header(too_long[:106]) is None


def test_v1_line_without_crlf_waits_until_107_bytes(bridge_impl):
    line = b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n" + b"y" * 200  # LF alone does not end a line
    for n in range(len(line)):
        if n < 107:
            assert bridge_impl.parse_proxy_header(line[:n]) is None, n
        else:
            raises(bridge_impl.parse_proxy_header, line[:n], V1_TOO_LONG)


V1_MALFORMED_CASES = [
    ("unknown protocol", b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n"),
    ("lower-case protocol", b"PROXY tcp4 1.2.3.4 5.6.7.8 1 2\r\n"),
    ("UDP", b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n"),
    ("UNKNOWN glued to more", b"PROXY UNKNOWNX\r\n"),
    ("no protocol", b"PROXY \r\n"),
    ("protocol alone", b"PROXY TCP4\r\n"),
    ("two spaces after PROXY", b"PROXY  TCP4 1.2.3.4 5.6.7.8 1 2\r\n"),
    ("two spaces between fields", b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n"),
    ("trailing space", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n"),
    ("tab separator", b"PROXY TCP4 1.2.3.4\t5.6.7.8 1 2\r\n"),
    ("missing port", b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n"),
    ("extra field", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n"),
    ("IPv6 after TCP4", b"PROXY TCP4 ::1 ::1 1 2\r\n"),
    ("IPv4 after TCP6", b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n"),
    ("short IPv4 form", b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n"),
    ("hex IPv4 form", b"PROXY TCP4 0x7f.0.0.1 5.6.7.8 1 2\r\n"),
    ("octet above 255", b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n"),
    ("host name", b"PROXY TCP4 localhost 5.6.7.8 1 2\r\n"),
    ("scoped IPv6", b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n"),
    ("NUL after an address", b"PROXY TCP4 1.2.3.4\x00 5.6.7.8 1 2\r\n"),
    ("high byte in an address", b"PROXY TCP4 1.2.3.4\xff 5.6.7.8 1 2\r\n"),
    ("port above 65535", b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n"),
    ("port of 6 digits", b"PROXY TCP4 1.2.3.4 5.6.7.8 000001 2\r\n"),
    ("negative port", b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n"),
    ("port with a sign", b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n"),
    ("port with a letter", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 8O\r\n"),
    ("port with an underscore", b"PROXY TCP4 1.2.3.4 5.6.7.8 1_0 2\r\n"),
    ("non-ASCII digit in port", "PROXY TCP4 1.2.3.4 5.6.7.8 1 \u0662\r\n".encode()),
    ("CR not followed by LF", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\r\n"),
    ("CR inside a field", b"PROXY TCP4 1.2.3.4\rX"),
    ("CR in the UNKNOWN tail", b"PROXY UNKNOWN a\rb\r\n"),
]


@pytest.mark.parametrize("data", [pytest.param(d, id=i) for i, d in V1_MALFORMED_CASES])
def test_v1_malformed(bridge_impl, data):
    raises(bridge_impl.parse_proxy_header, data, V1_MALFORMED)


# -- v2 -------------------------------------------------------------------------

V2_VALID = [
    ("INET", v2(0x21, 0x11, inet("192.168.0.1", "10.0.0.1", 56324, 443)),
     ("192.168.0.1", 56324), ("10.0.0.1", 443)),
    ("INET6", v2(0x21, 0x21, inet("2001:db8::1", "::ffff:10.0.0.1", 1, 65535)),
     ("2001:db8::1", 1), ("::ffff:10.0.0.1", 65535)),
    ("LOCAL", v2(0x20, 0x00), None, None),
    ("LOCAL ignores family and addresses", v2(0x20, 0xFF, b"\xff" * 7), None, None),
    ("LOCAL with an INET block", v2(0x20, 0x11, inet("1.2.3.4", "5.6.7.8", 1, 2)), None, None),
    ("UNSPEC", v2(0x21, 0x00), None, None),
    ("UNSPEC with bytes", v2(0x21, 0x00, b"\x01\x02\x03"), None, None),
    ("UNIX", v2(0x21, 0x31, b"/tmp/a".ljust(108, b"\0") + b"/tmp/b".ljust(108, b"\0")), None, None),
    ("UNIX datagram", v2(0x21, 0x32, b"\0" * 216), None, None),
    ("INET datagram", v2(0x21, 0x12, inet("1.2.3.4", "5.6.7.8", 1, 2)), None, None),
    ("INET6 datagram", v2(0x21, 0x22, inet("::1", "::2", 1, 2)), None, None),
    ("INET, transport UNSPEC", v2(0x21, 0x10, inet("1.2.3.4", "5.6.7.8", 1, 2)), None, None),
    # TLVs are skipped, not validated: ALPN "h2", then bytes that are no TLV.
    ("INET with TLVs", v2(0x21, 0x11, inet("1.2.3.4", "5.6.7.8", 1, 2) + b"\x01\x00\x02h2" + b"\xee" * 9),
     ("1.2.3.4", 1), ("5.6.7.8", 2)),
    ("INET6 with TLVs", v2(0x21, 0x21, inet("::1", "::2", 3, 4) + b"\x04\x00\x01\x00"),
     ("::1", 3), ("::2", 4)),
]


@pytest.mark.parametrize("header, source, destination",
                         [pytest.param(h, s, d, id=i) for i, h, s, d in V2_VALID])
def test_v2_header_gives_its_endpoints(bridge_impl, header, source, destination):
    assert bridge_impl.parse_proxy_header(header) == (len(header), source, destination)


def test_v2_length_says_where_the_client_payload_starts(bridge_impl):
    header = v2(0x21, 0x11, inet("1.2.3.4", "5.6.7.8", 1, 2) + b"\x05\x00\x03abc")
    payload = b"\x16\x03\x01\x02\x00" + SIG + b"\x21\x11"
    assert bridge_impl.parse_proxy_header(header + payload) == (
        len(header), ("1.2.3.4", 1), ("5.6.7.8", 2))


INET_BLOCK = inet("1.2.3.4", "5.6.7.8", 1, 2)
V2_ERRORS = [
    # version (the high nibble of the 13th byte), decided at that byte
    ("version 1", v2(0x11, 0x11, INET_BLOCK), "v2 bad version"),
    ("version 3", v2(0x31, 0x11, INET_BLOCK), "v2 bad version"),
    ("version 0", v2(0x01, 0x11, INET_BLOCK), "v2 bad version"),
    ("version before command", v2(0x3F, 0x11, INET_BLOCK), "v2 bad version"),
    # command: LOCAL or PROXY only
    ("command 2", v2(0x22, 0x11, INET_BLOCK), "v2 bad command"),
    ("command 15", v2(0x2F, 0x00), "v2 bad command"),
    # family (high nibble of the 14th byte) above UNIX, transport above DGRAM
    ("family 4", v2(0x21, 0x41, INET_BLOCK), "v2 bad address family"),
    ("family 15", v2(0x21, 0xF1, INET_BLOCK), "v2 bad address family"),
    ("transport 3", v2(0x21, 0x13, INET_BLOCK), "v2 bad address family"),
    ("unspec family, transport 15", v2(0x21, 0x0F), "v2 bad address family"),
    # the whole header within MAX_PROXY_HEADER
    ("length field 65535", v2(0x21, 0x11, length=65535), "v2 header too long"),
    ("LOCAL too long", v2(0x20, 0x00, length=MAX - 15), "v2 header too long"),
    # addresses: 12 bytes for INET, 36 for INET6, 216 for UNIX
    ("INET block of 11", v2(0x21, 0x11, INET_BLOCK[:11]), "v2 address block too short"),
    ("INET block of 0", v2(0x21, 0x11), "v2 address block too short"),
    ("INET6 block of 35", v2(0x21, 0x21, b"\0" * 35), "v2 address block too short"),
    ("INET6 with an INET block", v2(0x21, 0x21, INET_BLOCK), "v2 address block too short"),
    ("UNIX block of 215", v2(0x21, 0x31, b"\0" * 215), "v2 address block too short"),
    ("datagram block too short", v2(0x21, 0x12, b"\0" * 4), "v2 address block too short"),
]


@pytest.mark.parametrize("data, reason", [pytest.param(d, r, id=i) for i, d, r in V2_ERRORS])
def test_v2_errors(bridge_impl, data, reason):
    raises(bridge_impl.parse_proxy_header, data, reason)


# The byte count at which each kind of v2 error is known.
DECIDED_AT = {"v2 bad version": 13, "v2 bad command": 13, "v2 bad address family": 14,
              "v2 header too long": 16, "v2 address block too short": 16}


@pytest.mark.parametrize("data, reason", [pytest.param(d, r, id=i) for i, d, r in V2_ERRORS])
def test_v2_errors_are_decided_as_soon_as_their_byte_arrives(bridge_impl, data, reason):
    at = DECIDED_AT[reason]
    assert bridge_impl.parse_proxy_header(data[:at - 1]) is None
    raises(bridge_impl.parse_proxy_header, data[:at], reason)


def test_v2_header_of_exactly_max_proxy_header_bytes_is_accepted(bridge_impl):
    assert bridge_impl.MAX_PROXY_HEADER == MAX
    tlvs = b"\xaa" * (MAX - 16 - len(INET_BLOCK))
    header = v2(0x21, 0x11, INET_BLOCK + tlvs)
    assert len(header) == MAX
    assert bridge_impl.parse_proxy_header(header + b"payload") == (MAX, ("1.2.3.4", 1), ("5.6.7.8", 2))
    assert bridge_impl.parse_proxy_header(header[:-1]) is None
    local = v2(0x20, 0x00, b"\0" * (MAX - 16))
    assert bridge_impl.parse_proxy_header(local) == (MAX, None, None)


def test_v2_header_one_byte_over_max_proxy_header_is_too_long(bridge_impl):
    header = v2(0x21, 0x11, INET_BLOCK + b"\xaa" * (MAX - 16 - len(INET_BLOCK) + 1))
    assert len(header) == MAX + 1
    raises(bridge_impl.parse_proxy_header, header, "v2 header too long")
    raises(bridge_impl.parse_proxy_header, header[:16], "v2 header too long")


# -- not a PROXY header at all ------------------------------------------------------

@pytest.mark.parametrize("data", [
    b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n",
    b"SSH-2.0-OpenSSH_9.6\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # TLS ClientHello
    b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n",
    b"PROXY\tTCP4 1.2.3.4 5.6.7.8 1 2\r\n",
    b"PROXX ",
    b"\r\n\r\n\x01\r\nQUIT\n\x21\x11\x00\x00",
    b"\r\nGET / HTTP/1.1\r\n",
    b"\x00",
])
def test_other_protocols_are_not_proxy_headers(bridge_impl, data):
    raises(bridge_impl.parse_proxy_header, data, NOT_PROXY)


@pytest.mark.parametrize("data", [b"G", b"PROXX", b"PROXY\t", b"\r\r", b"\r\n\r\n\x01",
                                  b"\r\n\r\n\x00\r\nQUIX"])
def test_other_protocols_are_rejected_at_the_first_differing_byte(bridge_impl, data):
    assert bridge_impl.parse_proxy_header(data[:-1]) is None
    raises(bridge_impl.parse_proxy_header, data, NOT_PROXY)


def test_an_http_request_is_rejected_at_its_first_byte(bridge_impl):
    raises(bridge_impl.parse_proxy_header, b"G", NOT_PROXY)


def test_every_first_byte_but_p_and_cr_is_rejected(bridge_impl):
    for c in range(256):
        if c in b"P\r":
            assert bridge_impl.parse_proxy_header(bytes([c])) is None
        else:
            raises(bridge_impl.parse_proxy_header, bytes([c]), NOT_PROXY)


@pytest.mark.parametrize("data", [b""] + [b"PROXY "[:n] for n in range(1, 7)] + [SIG[:n] for n in range(1, 13)])
def test_prefixes_of_the_signatures_need_more_bytes(bridge_impl, data):
    assert bridge_impl.parse_proxy_header(data) is None


# -- split across reads --------------------------------------------------------------

SPLIT_HEADERS = [h for h, _, _ in V1_VALID] + [LONGEST_UNKNOWN, LONGEST_TCP6] + [h for _, h, _, _ in V2_VALID]


@pytest.mark.parametrize("header", SPLIT_HEADERS)
def test_every_proper_prefix_of_a_header_needs_more_bytes(bridge_impl, header):
    for n in range(len(header)):
        assert bridge_impl.parse_proxy_header(header[:n]) is None, n
    whole = bridge_impl.parse_proxy_header(header)
    assert whole is not None and whole[0] == len(header)
    assert bridge_impl.parse_proxy_header(header + b"more") == whole


def test_parser_accepts_bytearray_and_memoryview(bridge_impl):
    header = b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\nrest"
    expected = (32, ("1.2.3.4", 1), ("5.6.7.8", 2))
    assert bridge_impl.parse_proxy_header(bytearray(header)) == expected
    assert bridge_impl.parse_proxy_header(memoryview(header)) == expected
    assert bridge_impl.parse_proxy_header(memoryview(b"xx" + header)[2:]) == expected


def test_parser_refuses_str(bridge_impl):
    with pytest.raises(TypeError):
        bridge_impl.parse_proxy_header("PROXY UNKNOWN\r\n")


# -- builder ---------------------------------------------------------------------------

BUILT = [
    (1, ("192.168.0.1", 56324), ("10.0.0.1", 443), b"PROXY TCP4 192.168.0.1 10.0.0.1 56324 443\r\n"),
    (1, ("2001:DB8:0:0::1", 1), ("::1", 0), b"PROXY TCP6 2001:db8::1 ::1 1 0\r\n"),
    (1, ("1.2.3.4", 5), ("::1", 65535), b"PROXY TCP6 ::ffff:1.2.3.4 ::1 5 65535\r\n"),
    (1, ("::1", 5), ("1.2.3.4", 6), b"PROXY TCP6 ::1 ::ffff:1.2.3.4 5 6\r\n"),
    (1, None, ("1.2.3.4", 6), b"PROXY UNKNOWN\r\n"),
    (1, ("1.2.3.4", 5), None, b"PROXY UNKNOWN\r\n"),
    (1, None, None, b"PROXY UNKNOWN\r\n"),
    (2, ("192.168.0.1", 56324), ("10.0.0.1", 443),
     SIG + b"\x21\x11\x00\x0c" + b"\xc0\xa8\x00\x01" + b"\x0a\x00\x00\x01" + b"\xdc\x04" + b"\x01\xbb"),
    (2, ("2001:db8::1", 1), ("::1", 65535),
     SIG + b"\x21\x21\x00\x24" + b"\x20\x01\x0d\xb8" + b"\x00" * 11 + b"\x01"
     + b"\x00" * 15 + b"\x01" + b"\x00\x01" + b"\xff\xff"),
    (2, ("10.0.0.1", 80), ("::2", 443),
     SIG + b"\x21\x21\x00\x24" + b"\x00" * 10 + b"\xff\xff\x0a\x00\x00\x01"
     + b"\x00" * 15 + b"\x02" + b"\x00\x50" + b"\x01\xbb"),
    (2, None, ("1.2.3.4", 6), SIG + b"\x20\x00\x00\x00"),
    (2, None, None, SIG + b"\x20\x00\x00\x00"),
]


@pytest.mark.parametrize("version, source, destination, expected", BUILT)
def test_builder_writes_the_spec_bytes(bridge_impl, version, source, destination, expected):
    header = bridge_impl.build_proxy_header(version, source, destination)
    assert type(header) is bytes
    assert header == expected


@pytest.mark.parametrize("version, source, destination, error, reason", [
    (0, ("1.2.3.4", 1), ("5.6.7.8", 2), ValueError, "PROXY protocol version must be 1 or 2"),
    (3, None, None, ValueError, "PROXY protocol version must be 1 or 2"),
    ("1", None, None, ValueError, "PROXY protocol version must be 1 or 2"),
    (1, ("1.2.3.256", 1), ("5.6.7.8", 2), ValueError, "invalid IP address '1.2.3.256'"),
    (2, ("1.2.3.4", 1), ("example.com", 2), ValueError, "invalid IP address 'example.com'"),
    (1, ("", 1), ("5.6.7.8", 2), ValueError, "invalid IP address ''"),
    (1, (" 1.2.3.4", 1), ("5.6.7.8", 2), ValueError, "invalid IP address ' 1.2.3.4'"),
    (1, ("1.2.3.4\x00", 1), ("5.6.7.8", 2), ValueError, "invalid IP address '1.2.3.4\\x00'"),
    (1, ("fe80::1%eth0", 1), ("::1", 2), ValueError, "invalid IP address 'fe80::1%eth0'"),
    (1, ("\u0661.2.3.4", 1), ("5.6.7.8", 2), ValueError, "invalid IP address '\u0661.2.3.4'"),
    (1, ("1.2.3.4", -1), ("5.6.7.8", 2), ValueError, "port -1 is outside 0-65535"),
    (2, ("1.2.3.4", 1), ("5.6.7.8", 65536), ValueError, "port 65536 is outside 0-65535"),
    # An endpoint is checked even when the other one is None.
    (1, ("not an address", 1), None, ValueError, "invalid IP address 'not an address'"),
    (2, None, ("1.2.3.4", 70000), ValueError, "port 70000 is outside 0-65535"),
    (1, ["1.2.3.4", 1], ("5.6.7.8", 2), TypeError, "an endpoint is an (ip, port) tuple"),
    (1, ("1.2.3.4",), ("5.6.7.8", 2), TypeError, "an endpoint is an (ip, port) tuple"),
    (1, ("1.2.3.4", "80"), ("5.6.7.8", 2), TypeError, "an endpoint is an (ip, port) tuple"),
    (1, (b"1.2.3.4", 80), ("5.6.7.8", 2), TypeError, "an endpoint is an (ip, port) tuple"),
])
def test_builder_errors(bridge_impl, version, source, destination, error, reason):
    with pytest.raises(error) as excinfo:
        bridge_impl.build_proxy_header(version, source, destination)
    assert str(excinfo.value) == reason


# -- properties: both twins agree, round trips, early decisions -------------------------

PY = Twin("python").bridge

# FASTLB_FUZZ_EXAMPLES raises every property's example count (see the docstring).
FUZZ_EXAMPLES = int(os.environ.get("FASTLB_FUZZ_EXAMPLES", "0") or 0)


def examples(default: int) -> settings:
    return settings(max_examples=max(default, FUZZ_EXAMPLES), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def _compiled_twin():
    if NO_EXTENSIONS:
        pytest.skip("FASTLB_NO_EXTENSIONS is set: the compiled twin is not under test")
    return Twin("cython").bridge


def _ntop(family: int, packed: bytes) -> str:
    return socket.inet_ntop(family, packed)


ipv4s = st.binary(min_size=4, max_size=4).map(lambda b: _ntop(socket.AF_INET, b))
ipv6s = st.one_of(
    st.binary(min_size=16, max_size=16).map(lambda b: _ntop(socket.AF_INET6, b)),
    st.binary(min_size=4, max_size=4).map(lambda b: _ntop(socket.AF_INET6, b"\0" * 10 + b"\xff\xff" + b)),
    st.sampled_from(["::", "::1", "fe80::1", "2001:db8::", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"]),
)
ports = st.integers(0, 65535)
endpoint_pairs = st.one_of(
    st.tuples(st.tuples(ipv4s, ports), st.tuples(ipv4s, ports)),
    st.tuples(st.tuples(ipv6s, ports), st.tuples(ipv6s, ports)),
)


@st.composite
def v1_text_address(draw, ip: str) -> str:
    """The address in one of the text forms inet_pton accepts: canonical, exploded, upper-case."""
    form = draw(st.sampled_from(["canonical", "exploded", "upper"]))
    if form == "exploded":
        return ipaddress.ip_address(ip).exploded
    return ip.upper() if form == "upper" else ip


@st.composite
def v1_headers(draw) -> bytes:
    if draw(st.integers(0, 5)) == 0:
        return b"PROXY UNKNOWN" + draw(st.sampled_from([b"", b" ", b" ffff::1 ::2 1 2"])) + b"\r\n"
    (src, sport), (dst, dport) = draw(endpoint_pairs)
    proto = "TCP6" if ":" in src else "TCP4"
    width = draw(st.integers(1, 5))  # leading zeros
    return ("PROXY %s %s %s %0*d %0*d\r\n" % (
        proto, draw(v1_text_address(src)), draw(v1_text_address(dst)),
        max(width, len(str(sport))), sport, max(width, len(str(dport))), dport)).encode()


@st.composite
def v2_headers(draw) -> bytes:
    """Valid v2 headers: LOCAL or PROXY, every family and transport, TLV bytes after the block."""
    command = draw(st.sampled_from([0x21, 0x21, 0x21, 0x20]))
    family = draw(st.sampled_from([1, 1, 2, 2, 0, 3]))
    transport = draw(st.sampled_from([1, 1, 1, 0, 2]))
    if family in (1, 2):
        ips = ipv4s if family == 1 else ipv6s
        (src, sport), (dst, dport) = draw(st.tuples(st.tuples(ips, ports), st.tuples(ips, ports)))
        block = inet(src, dst, sport, dport)
    else:
        block = draw(st.binary(min_size=216 if family == 3 else 0, max_size=216))
    tlvs = draw(st.one_of(st.just(b""), st.binary(max_size=40)))
    return v2(command, family << 4 | transport, block + tlvs)


valid_headers = st.one_of(v1_headers(), v2_headers(), endpoint_pairs.flatmap(
    lambda pair: st.sampled_from([1, 2]).map(lambda v: PY.build_proxy_header(v, *pair))))

# Bytes the parser treats specially: line ends, separators, digits, hex
# letters, NUL, high bytes, version/command and family bytes.
INTERESTING = b"\x00\r\n :.0159afAFPTU\x20\x21\x11\x12\x13\x22\x31\x41\xff"


@st.composite
def mutated(draw, base):
    data = bytearray(draw(base))
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["flip", "truncate", "insert", "delete"]))
        at = draw(st.integers(0, len(data)))
        if kind == "flip" and at < len(data):
            data[at] = draw(st.one_of(st.integers(0, 255), st.sampled_from(INTERESTING)))
        elif kind == "truncate":
            del data[at:]
        elif kind == "insert":
            data[at:at] = draw(st.one_of(st.binary(min_size=1, max_size=8),
                                         st.lists(st.sampled_from(INTERESTING), min_size=1,
                                                  max_size=6).map(bytes)))
        elif kind == "delete":
            del data[at:at + draw(st.integers(1, 8))]
    return bytes(data)


# v2 headers whose length field is near the 16384-byte bound, complete or not.
near_the_limit = st.tuples(st.sampled_from([0x20, 0x21]), st.integers(MAX - 16 - 2, MAX - 16 + 2),
                           st.booleans()).map(
    lambda t: v2(t[0], 0x11, (INET_BLOCK + b"\xaa" * MAX)[:t[1] if t[2] else t[1] - 1], length=t[1]))



def _with_byte(header: bytes, at: int, value: int) -> bytes:
    return header[:at] + bytes([value]) + header[at + 1:]


# v2 headers with a random version/command, family/transport or length byte.
v2_fixed_mutated = st.builds(_with_byte, v2_headers(), st.integers(12, 15), st.integers(0, 255))

parser_inputs = st.one_of(
    st.binary(max_size=120),
    st.binary(max_size=110).map(lambda tail: b"PROXY " + tail),
    st.binary(max_size=60).map(lambda tail: SIG + tail),
    st.tuples(valid_headers, st.binary(max_size=20)).map(b"".join),
    mutated(valid_headers),
    mutated(valid_headers),
    mutated(valid_headers),
    v2_fixed_mutated,
    near_the_limit,
)


@examples(1000)
@given(data=parser_inputs)
def test_property_twins_agree_on_parsing(data):
    c = _compiled_twin()
    assert outcome(c.parse_proxy_header, data) == outcome(PY.parse_proxy_header, data)


builder_ips = st.one_of(ipv4s, ipv6s, ipv6s.map(str.upper), st.text(max_size=12),
                        st.sampled_from(["", "1.2.3", "1.2.3.4 ", "::1%lo", "1.2.3.4\x00", "::g",
                                         "0000:0000:0000:0000:0000:ffff:255.255.255.255"]))
builder_endpoints = st.one_of(
    st.none(),
    st.tuples(builder_ips, st.one_of(ports, st.integers(-3, 70000))),
    st.sampled_from([("1.2.3.4",), ["1.2.3.4", 1], ("1.2.3.4", "1"), (b"::1", 1), "1.2.3.4", 80]),
)


@examples(1000)
@given(version=st.sampled_from([1, 2, 1, 2, 0, 3]), source=builder_endpoints,
       destination=builder_endpoints)
def test_property_twins_agree_on_building(version, source, destination):
    c = _compiled_twin()
    assert (outcome(c.build_proxy_header, version, source, destination)
            == outcome(PY.build_proxy_header, version, source, destination))


def _canonical(endpoint, as_ipv6: bool):
    ip, port = endpoint
    if ":" in ip:
        return _ntop(socket.AF_INET6, socket.inet_pton(socket.AF_INET6, ip)), port
    packed = socket.inet_pton(socket.AF_INET, ip)
    if as_ipv6:
        return _ntop(socket.AF_INET6, b"\0" * 10 + b"\xff\xff" + packed), port
    return _ntop(socket.AF_INET, packed), port


round_trip_endpoints = st.one_of(st.none(), st.tuples(st.one_of(ipv4s, ipv6s, ipv6s.map(str.upper)), ports))


@examples(500)
@given(version=st.sampled_from([1, 2]), source=round_trip_endpoints, destination=round_trip_endpoints)
def test_property_build_then_parse_gives_back_the_canonical_endpoints(bridge_impl, version, source,
                                                                      destination):
    header = bridge_impl.build_proxy_header(version, source, destination)
    if source is None or destination is None:
        expected = (None, None)
    else:
        mixed = (":" in source[0]) != (":" in destination[0])
        expected = (_canonical(source, mixed), _canonical(destination, mixed))
    assert bridge_impl.parse_proxy_header(header) == (len(header),) + expected
    assert bridge_impl.parse_proxy_header(header + b"\r\n\r\n\x00payload") == (len(header),) + expected


@examples(300)
@given(header=valid_headers)
def test_property_every_proper_prefix_of_a_valid_header_needs_more_bytes(bridge_impl, header):
    whole = bridge_impl.parse_proxy_header(header)
    assert whole is not None and whole[0] == len(header)
    for n in range(len(header)):
        assert bridge_impl.parse_proxy_header(header[:n]) is None, n


@examples(300)
@given(data=parser_inputs)
def test_property_an_early_decision_is_the_final_one(bridge_impl, data):
    """Once a prefix gives a result or an error, every longer input gives the same."""
    final = outcome(bridge_impl.parse_proxy_header, data)
    # Every decision falls within the first 107 bytes, or at the end of a
    # long v2 header.
    for n in sorted(set(range(min(len(data), 120))) | set(range(max(0, len(data) - 3), len(data)))):
        early = outcome(bridge_impl.parse_proxy_header, data[:n])
        if early != ("value", None):
            assert early == final, n
