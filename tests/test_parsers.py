"""The HTTP status-line and health-answer parsers, on both twins.

Every case runs on the pure-Python twin (the specification) and on the compiled
one; a differential hypothesis test then feeds both the same random and mutated
inputs and demands identical answers, error messages included.

The differential tests run 1,000 examples each, so this file takes seconds. To
fuzz for longer, raise their example count with an environment variable (and
lift pytest's per-test timeout), for instance::

    FASTLB_FUZZ_EXAMPLES=1000000 .venv/bin/python -m pytest -q --timeout=0 tests/test_parsers.py -k twins_agree
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastlb.bridge import NO_EXTENSIONS, Twin

MAX_COUNT = 2**63 - 1


def answer(body: bytes = b"3\n17", *headers: bytes, status: bytes = b"HTTP/1.1 200 OK",
           eol: bytes = b"\r\n", content_length: bool = True) -> bytes:
    """A health answer: status line, headers (Content-Length by default), blank line, body."""
    lines = [status] + list(headers)
    if content_length:
        lines.append(b"Content-Length: %d" % len(body))
    return eol.join(lines) + eol + eol + body


def outcome(parse, *args):
    """What a parser call did, comparable across twins: its value, or its error and message."""
    try:
        return ("value", parse(*args))
    except ValueError as exc:
        return ("ValueError", str(exc))


# -- status line ----------------------------------------------------------------

def test_status_line_of_a_str_is_a_type_error_on_both_twins(bridge_impl):
    with pytest.raises(TypeError):
        bridge_impl.parse_status_line("HTTP/1.1 200 OK\r\n")


@pytest.mark.parametrize("data, expected", [
    (b"HTTP/1.1 200 OK\r\n", 200),
    (b"HTTP/1.0 404 Not Found\r\n", 404),
    (b"HTTP/1.1 503 ", 503),
    (b"HTTP/1.1 200\r\n", 200),
    (b"HTTP/1.1 204\n", 204),
    (b"HTTP/1.9 100 Continue", 100),
    (b"HTTP/1.1 999 whatever", 999),
])
def test_status_line_gives_the_code(bridge_impl, data, expected):
    assert bridge_impl.parse_status_line(data) == expected


@pytest.mark.parametrize("data", [
    b"", b"H", b"HTTP", b"HTTP/1.", b"HTTP/1.1", b"HTTP/1.1 ", b"HTTP/1.1 2", b"HTTP/1.1 20",
    b"HTTP/1.1 200",
])
def test_status_line_prefix_needs_more_bytes(bridge_impl, data):
    assert bridge_impl.parse_status_line(data) == 0


@pytest.mark.parametrize("data", [
    b"X", b"http/1.1 200 OK", b"HTTP/2 200 OK\r\n", b"HTTP/1.x 200 OK", b"HTTP/1.1  200 OK",
    b"HTTP/1.1 2x0 OK", b"HTTP/1.1 200OK", b"HTTP/1.1 2000", b"HTTP/1.1 099 Low",
    b"HTTP/1.1 000 ", b"HTTP/1.1 200\t", b"GET / HTTP/1.1\r\n", b"SSH-2.0-OpenSSH_9.6\r\n",
    b"\x00\xff\xfe",
])
def test_status_line_malformed_is_minus_one(bridge_impl, data):
    assert bridge_impl.parse_status_line(data) == -1


def test_status_line_reads_only_the_first_13_bytes(bridge_impl):
    assert bridge_impl.parse_status_line(b"HTTP/1.1 200 \x00\x01garbage") == 200


def test_status_line_accepts_bytearray_and_memoryview(bridge_impl):
    assert bridge_impl.parse_status_line(bytearray(b"HTTP/1.1 302 Found")) == 302
    assert bridge_impl.parse_status_line(memoryview(b"HTTP/1.1 302 Found")) == 302


# -- health answer: healthy ---------------------------------------------------

@pytest.mark.parametrize("data, expected", [
    (answer(b"3\n17"), (3, 17)),
    (answer(b"3\n17\n"), (3, 17)),
    (answer(b"0\n0"), (0, 0)),
    (answer(b"3\n17", eol=b"\n"), (3, 17)),
    (answer(b"3\n17\n", b"Server: x", b"Connection: close", eol=b"\n"), (3, 17)),
    (answer(b"%d\n%d" % (MAX_COUNT, MAX_COUNT)), (MAX_COUNT, MAX_COUNT)),
    (answer(b"007\n08"), (7, 8)),
    (answer(b"1\n2", b"content-LENGTH: 3"), (1, 2)),      # same length twice is fine
    (answer(b"1\n2", b"X-Empty:"), (1, 2)),
    (answer(b"1\n2", status=b"HTTP/1.0 200"), (1, 2)),
    (answer(b"1\n2", status=b"HTTP/1.1 200 All\tgood"), (1, 2)),
    (b"HTTP/1.1 200 OK\r\nContent-Length:\t3 \t\r\n\r\n4\n5", (4, 5)),
])
def test_health_answer_healthy(bridge_impl, data, expected):
    assert bridge_impl.parse_health_answer(data, True) == expected
    assert bridge_impl.parse_health_answer(data, False) == expected


def test_health_answer_honours_content_length_and_ignores_extra_bytes(bridge_impl):
    data = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n1\n2\nthis is not part of it"
    assert bridge_impl.parse_health_answer(data, False) == (1, 2)
    assert bridge_impl.parse_health_answer(data, True) == (1, 2)


def test_health_answer_without_content_length_reads_to_eof(bridge_impl):
    data = answer(b"5\n6\n", content_length=False)
    assert bridge_impl.parse_health_answer(data, False) is None
    assert bridge_impl.parse_health_answer(data, True) == (5, 6)


@pytest.mark.parametrize("data", [
    b"", b"HTTP/1.1 20", b"HTTP/1.1 200 OK", b"HTTP/1.1 200 OK\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n1\n",
])
def test_health_answer_incomplete_needs_more_then_is_truncated_at_eof(bridge_impl, data):
    assert bridge_impl.parse_health_answer(data, False) is None
    with pytest.raises(ValueError, match="^truncated answer$"):
        bridge_impl.parse_health_answer(data, True)


def test_health_answer_accepts_bytearray(bridge_impl):
    assert bridge_impl.parse_health_answer(bytearray(answer(b"1\n2")), True) == (1, 2)


# -- health answer: malformed -------------------------------------------------

TOO_LONG = answer(b"1\n2", b"X-Padding: " + b"a" * 4096)

MALFORMED = [
    # any other status, decided as soon as the code is known
    ("other status", answer(status=b"HTTP/1.1 404 Not Found"), "status 404"),
    ("other status 500", answer(status=b"HTTP/1.0 500 Oops"), "status 500"),
    ("status known early", b"HTTP/1.1 503 ", "status 503"),
    ("status before bad header", b"HTTP/1.1 302 Found\r\nno colon\r\n\r\n", "status 302"),
    # missing or garbled status line
    ("not http", b"SSH-2.0-OpenSSH\r\n\r\n1\n2", "malformed status line"),
    ("garbled code", answer(status=b"HTTP/1.1 2OO OK"), "malformed status line"),
    ("http/2", answer(status=b"HTTP/2 200 OK"), "malformed status line"),
    ("control char in reason", answer(status=b"HTTP/1.1 200 O\x01K"), "malformed status line"),
    ("DEL in reason", answer(status=b"HTTP/1.1 200 O\x7fK"), "malformed status line"),
    ("body first", b"1\n2\n", "malformed status line"),
    # headers
    ("header without colon", answer(b"1\n2", b"NoColonHere"), "malformed header"),
    ("header without name", answer(b"1\n2", b": value"), "malformed header"),
    ("space in header name", answer(b"1\n2", b"Bad Name: x"), "malformed header"),
    ("space before colon", answer(b"1\n2", b"Content-Length : 3", content_length=False),
     "malformed header"),
    ("content-length not digits", answer(b"1\n2", b"Content-Length: abc", content_length=False),
     "malformed content-length"),
    ("content-length empty", answer(b"1\n2", b"Content-Length: ", content_length=False),
     "malformed content-length"),
    ("content-length negative", answer(b"1\n2", b"Content-Length: -3", content_length=False),
     "malformed content-length"),
    ("content-length 11 digits", answer(b"1\n2", b"Content-Length: 00000000003", content_length=False),
     "malformed content-length"),
    ("duplicate differing content-length", answer(b"1\n2", b"Content-Length: 4"),
     "malformed content-length"),
    ("transfer-encoding", answer(b"1\n2", b"Transfer-Encoding: chunked", content_length=False),
     "unsupported transfer-encoding"),
    ("transfer-encoding identity", answer(b"1\n2", b"transfer-encoding: identity"),
     "unsupported transfer-encoding"),
    # body: exactly two non-negative integers, one optional final newline
    ("one integer", answer(b"5"), "malformed body"),
    ("one integer and newline", answer(b"5\n"), "malformed body"),
    ("three integers", answer(b"1\n2\n3"), "malformed body"),
    ("two trailing newlines", answer(b"1\n2\n\n"), "malformed body"),
    ("CRLF in body", answer(b"1\r\n2"), "malformed body"),
    ("negative", answer(b"-1\n2"), "malformed body"),
    ("plus sign", answer(b"+1\n2"), "malformed body"),
    ("leading space", answer(b" 1\n2"), "malformed body"),
    ("trailing space", answer(b"1 \n2"), "malformed body"),
    ("space before second", answer(b"1\n 2"), "malformed body"),
    ("empty body", answer(b""), "malformed body"),
    ("empty first", answer(b"\n2"), "malformed body"),
    ("letters", answer(b"one\ntwo"), "malformed body"),
    ("decimal point", answer(b"1.0\n2"), "malformed body"),
    # 63 bits
    ("errors 2**63", answer(b"%d\n1" % 2**63), "number too large"),
    ("entries 2**63", answer(b"1\n%d" % 2**63), "number too large"),
    ("20 digits", answer(b"1\n%020d" % 1), "number too large"),
    ("huge", answer(b"1\n" + b"9" * 40), "number too large"),
    ("errors checked before entries", answer(b"%d\nx" % 2**64), "number too large"),
    # size
    ("too long", TOO_LONG, "answer too long"),
    ("too long beats a garbled status", b"garbage" * 600, "answer too long"),
    ("content-length beyond the limit", b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n1\n2",
     "answer too long"),
    # EOF too early
    ("truncated body", b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n1\n2", "truncated answer"),
    ("truncated head", b"HTTP/1.1 200 OK\r\nContent-Len", "truncated answer"),
]


@pytest.mark.parametrize("data, reason", [pytest.param(d, r, id=i) for i, d, r in MALFORMED])
def test_health_answer_malformed_at_eof(bridge_impl, data, reason):
    with pytest.raises(ValueError) as excinfo:
        bridge_impl.parse_health_answer(data, True)
    assert str(excinfo.value) == reason


@pytest.mark.parametrize("data, reason", [
    pytest.param(d, r, id=i) for i, d, r in MALFORMED if r != "truncated answer"
])
def test_health_answer_malformed_fails_before_eof_too(bridge_impl, data, reason):
    with pytest.raises(ValueError) as excinfo:
        bridge_impl.parse_health_answer(data, False)
    assert str(excinfo.value) == reason


def test_health_answer_bad_body_without_content_length_waits_for_eof(bridge_impl):
    data = answer(b"1\n2\n3", content_length=False)
    assert bridge_impl.parse_health_answer(data, False) is None
    with pytest.raises(ValueError, match="^malformed body$"):
        bridge_impl.parse_health_answer(data, True)


def test_health_answer_limit_is_exact(bridge_impl):
    padding = bridge_impl.MAX_HEALTH_ANSWER - len(answer(b"1\n2", b"X-Padding: "))
    exact = answer(b"1\n2", b"X-Padding: " + b"a" * padding)
    assert len(exact) == bridge_impl.MAX_HEALTH_ANSWER
    assert bridge_impl.parse_health_answer(exact, True) == (1, 2)
    with pytest.raises(ValueError, match="^answer too long$"):
        bridge_impl.parse_health_answer(exact + b"\n", True)


# -- differential: both twins give the same answer ----------------------------

def _compiled_twin():
    if NO_EXTENSIONS:
        pytest.skip("FASTLB_NO_EXTENSIONS is set: the compiled twin is not under test")
    return Twin("cython").bridge


PY = Twin("python").bridge

# Bytes the parsers treat specially: line ends, separators, digits, control
# characters, DEL, high bytes, letters that case-fold.
INTERESTING = [bytes([c]) for c in b"\x00\x01\t\n\r \x7f\x80\xff:09aAzZ-+.[{@`"]
interesting_bytes = st.lists(st.sampled_from(INTERESTING), min_size=1, max_size=6).map(b"".join)

bodies = st.one_of(
    st.tuples(st.integers(0, 2**64), st.integers(0, 2**64)).map(lambda t: b"%d\n%d" % t),
    st.binary(max_size=30),
    st.sampled_from([b"1\n2", b"1\n2\n", b"1\n2\n\n", b"0\n0", b"%d\n1" % MAX_COUNT,
                     b"%d\n1" % (MAX_COUNT + 1)]),
)
header_lines = st.lists(st.sampled_from([
    b"Server: fastlb-test", b"Connection: close", b"Content-Length: 4", b"Content-Length: 3",
    b"content-length:  12 ", b"Transfer-Encoding: chunked", b"X-A:", b"Bad Header", b": x",
    b"Content-Length: 9999999999", b"X-Pad: " + b"p" * 2000,
]), max_size=4)
valid_answers = st.builds(
    lambda body, headers, status, eol, cl: answer(body, *headers, status=status, eol=eol,
                                                  content_length=cl),
    bodies,
    header_lines,
    st.one_of(
        st.sampled_from([b"HTTP/1.1 200 OK"] * 4 + [b"HTTP/1.0 200", b"HTTP/1.1 404 Not Found"]),
        st.lists(st.sampled_from(INTERESTING), max_size=4).map(
            lambda reason: b"HTTP/1.1 200 " + b"".join(reason)),
    ),
    st.sampled_from([b"\r\n", b"\n"]),
    st.booleans(),
)


@st.composite
def mutated(draw, base):
    data = bytearray(draw(base))
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["flip", "truncate", "insert", "delete"]))
        at = draw(st.integers(0, len(data)))
        if kind == "flip" and at < len(data):
            data[at] = draw(st.one_of(st.integers(0, 255), st.sampled_from(INTERESTING).map(ord)))
        elif kind == "truncate":
            del data[at:]
        elif kind == "insert":
            data[at:at] = draw(st.one_of(st.binary(min_size=1, max_size=8), interesting_bytes))
        elif kind == "delete":
            del data[at:at + draw(st.integers(1, 8))]
    return bytes(data)


# Answers padded to within a few bytes of the 4096-byte limit, on either side.
near_the_limit = st.tuples(mutated(valid_answers), st.integers(-3, 3)).map(
    lambda t: t[0] + b"9" * max(0, 4096 - len(t[0]) + t[1]))
health_inputs = st.one_of(
    st.binary(max_size=200),
    st.binary(max_size=60).map(lambda tail: b"HTTP/1.1 200 OK\r\n" + tail),
    mutated(valid_answers),
    mutated(valid_answers),
    near_the_limit,
)
# FASTLB_FUZZ_EXAMPLES raises the differential tests' example count (see the docstring).
FUZZ_EXAMPLES = int(os.environ.get("FASTLB_FUZZ_EXAMPLES", "0") or 0)
DIFFERENTIAL = settings(max_examples=max(1000, FUZZ_EXAMPLES), deadline=None,
                        suppress_health_check=[HealthCheck.too_slow])


@DIFFERENTIAL
@given(data=health_inputs, at_eof=st.booleans())
def test_twins_agree_on_health_answers(data, at_eof):
    c = _compiled_twin()
    assert outcome(c.parse_health_answer, data, at_eof) == outcome(PY.parse_health_answer, data, at_eof)


@DIFFERENTIAL
@given(data=st.one_of(
    st.binary(max_size=20),
    mutated(st.sampled_from([b"HTTP/1.1 200 OK\r\n", b"HTTP/1.0 404\n", b"HTTP/1.1 099 x"])),
    st.builds(lambda tail: b"HTTP/1." + tail, st.binary(max_size=8)),
))
def test_twins_agree_on_status_lines(data):
    c = _compiled_twin()
    assert outcome(c.parse_status_line, data) == outcome(PY.parse_status_line, data)
