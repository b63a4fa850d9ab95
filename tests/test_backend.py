"""Behaviour of fastlb-backend, the file server behind fastlb's demo, tests and benchmarks.

The server runs as a real process (``python -m fastlb.backend 0 --dir DIR``) and
is spoken to over raw sockets and http.client, as fastlb and curl would.
Every network wait has a timeout; waits poll until a deadline.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import io
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, wait_until
from fastlb.backend import FileServer, HTTPError, read_request, resolve_path

TIMEOUT = 10.0
LISTENING = re.compile(r"fastlb-backend listening on 127\.0\.0\.1:(\d+) serving (.+)")
MIB = 1024 * 1024
KIB = 1024


class Backend:
    """A fastlb-backend process; stderr goes to a file so it can be read at any time."""

    def __init__(self, directory: Path, log_path: Path, *options: str, wrapper=()):
        self.log_path = log_path
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        with open(log_path, "wb") as log:
            self.popen = subprocess.Popen(
                [*wrapper, sys.executable, "-m", "fastlb.backend", "0", "--dir", str(directory),
                 *options],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log, cwd=str(ROOT), env=env)
        match = wait_until(self._listening, message="the start-up line")
        self.port = int(match.group(1))
        self.directory = match.group(2)

    def _listening(self):
        match = LISTENING.search(self.stderr())
        if match is None and self.popen.poll() is not None:
            raise AssertionError("backend exited with %s:\n%s" % (self.popen.returncode, self.stderr()))
        return match

    def stderr(self) -> str:
        return self.log_path.read_text(errors="replace")

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=TIMEOUT)

    def http(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=TIMEOUT)

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(TIMEOUT)


@pytest.fixture
def www(tmp_path) -> Path:
    directory = tmp_path / "www"
    directory.mkdir()
    (directory / "hello.txt").write_bytes(b"hello\n")
    return directory


@pytest.fixture
def start_backend(www, tmp_path):
    """Start backends serving ``www``; each is killed (by its PID) when the test ends."""
    started = []

    def start(*options: str, wrapper=()) -> Backend:
        backend = Backend(www, tmp_path / ("backend-%d.log" % len(started)), *options,
                          wrapper=wrapper)
        started.append(backend)
        return backend

    yield start
    for backend in started:
        backend.stop()


@pytest.fixture
def backend(start_backend) -> Backend:
    return start_backend()


def read_response(reader, head_only: bool = False) -> tuple:
    """Read one response from a socket's file: ``(status, headers, body)``."""
    status_line = reader.readline(65536)
    assert status_line.startswith(b"HTTP/1.1 "), status_line
    headers = {}
    while True:
        line = reader.readline(65536)
        assert line.endswith(b"\r\n"), line
        if line == b"\r\n":
            break
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    assert "content-length" in headers, "every response carries Content-Length"
    body = b"" if head_only else reader.read(int(headers["content-length"]))
    return int(status_line.split()[1]), headers, body


def exchange(backend: Backend, request: bytes, half_close: bool = False) -> tuple:
    """Send raw bytes on a fresh connection and read the one response."""
    with backend.connect() as sock:
        sock.sendall(request)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        with sock.makefile("rb") as reader:
            return read_response(reader)


def closed_by_peer(sock: socket.socket) -> bool:
    """True once the server has closed the connection; fails if it stays open past TIMEOUT."""
    sock.settimeout(TIMEOUT)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def get(backend: Backend, path: str) -> tuple:
    conn = backend.http()
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def healthcheck(backend: Backend) -> bytes:
    status, body = get(backend, "/healthcheck")
    assert status == 200
    return body


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- start-up, arguments, signals ------------------------------------------------------------


def test_startup_line_shows_the_real_port_and_directory(backend, www):
    assert 0 < backend.port < 65536
    assert backend.directory == os.path.realpath(www)
    assert get(backend, "/hello.txt") == (200, b"hello\n")


def test_requests_are_not_logged_by_default(backend):
    get(backend, "/hello.txt")
    get(backend, "/missing")
    assert backend.stderr().count("\n") == 1, backend.stderr()


def test_verbose_logs_each_request(start_backend):
    backend = start_backend("--verbose")
    get(backend, "/missing")
    wait_until(lambda: "/missing" in backend.stderr(), message="a request log line")


@pytest.mark.parametrize("argv", [
    [],
    ["http"],
    ["70000"],
    ["-1"],
    ["0", "--bogus"],
    ["0", "--timeout", "0"],
    ["0", "--dir", "/nonexistent/fastlb-test"],
], ids=["no-port", "not-a-number", "port-too-big", "negative-port", "unknown-option",
        "zero-timeout", "missing-dir"])
def test_bad_arguments_exit_2_with_usage(argv):
    result = subprocess.run([sys.executable, "-m", "fastlb.backend", *argv], cwd=str(ROOT),
                            capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 2
    assert "usage:" in result.stderr
    assert "Traceback" not in result.stderr


def test_port_in_use_exits_1_with_a_clear_message(www):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "fastlb.backend", str(port), "--dir", str(www)],
                                cwd=str(ROOT), capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 1
    assert "in use" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stop_signal_exits_0_without_traceback(backend, signum):
    idle = backend.connect()  # an open connection must not hold the exit up
    try:
        assert get(backend, "/hello.txt")[0] == 200
        backend.popen.send_signal(signum)
        assert backend.popen.wait(TIMEOUT) == 0
    finally:
        idle.close()
    assert "Traceback" not in backend.stderr()


# --- files -----------------------------------------------------------------------------------


def test_put_get_head_round_trip_of_a_5_mib_file(backend, www):
    first = os.urandom(5 * MIB)
    second = os.urandom(5 * MIB + 3)
    conn = backend.http()
    try:
        conn.request("PUT", "/big.bin", body=first)
        response = conn.getresponse()
        response.read()
        assert response.status == 201

        conn.request("GET", "/big.bin")
        response = conn.getresponse()
        assert response.status == 200
        assert response.getheader("Content-Length") == str(len(first))
        assert sha256(response.read()) == sha256(first)

        conn.request("HEAD", "/big.bin")
        response = conn.getresponse()
        assert response.status == 200
        assert response.getheader("Content-Length") == str(len(first))
        assert response.read() == b""

        conn.request("PUT", "/big.bin", body=second)
        response = conn.getresponse()
        response.read()
        assert response.status == 200  # replaced, not created

        # Same connection: proves HEAD sent no body bytes that would break framing.
        conn.request("GET", "/big.bin")
        response = conn.getresponse()
        assert sha256(response.read()) == sha256(second)
    finally:
        conn.close()
    assert sha256((www / "big.bin").read_bytes()) == sha256(second)
    assert sorted(p.name for p in www.iterdir()) == ["big.bin", "hello.txt"], "no temporary files left"


def test_empty_file_round_trip(backend):
    status, _, _ = exchange(backend, b"PUT /empty HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n")
    assert status == 201
    assert get(backend, "/empty") == (200, b"")


def test_readers_never_see_a_partial_put(backend, www):
    old = os.urandom(MIB)
    new = os.urandom(2 * MIB)
    (www / "file").write_bytes(old)
    with backend.connect() as writer:
        writer.sendall(b"PUT /file HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % len(new))
        writer.sendall(new[:MIB])
        status, body = get(backend, "/file")
        assert status == 200 and sha256(body) == sha256(old)
        writer.sendall(new[MIB:])
        with writer.makefile("rb") as reader:
            assert read_response(reader)[0] == 200
    assert sha256(get(backend, "/file")[1]) == sha256(new)


def test_new_file_is_absent_until_its_put_completes(backend):
    with backend.connect() as writer:
        writer.sendall(b"PUT /fresh HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\n01234")
        assert get(backend, "/fresh")[0] == 404
        writer.sendall(b"56789")
        with writer.makefile("rb") as reader:
            assert read_response(reader)[0] == 201
    assert get(backend, "/fresh") == (200, b"0123456789")


def test_missing_file_is_404(backend):
    assert get(backend, "/no-such-file")[0] == 404
    assert get(backend, "/hello.txt/below-a-file")[0] == 404


@pytest.mark.parametrize("target", [
    "/../secret", "/a/../../secret", "/%2e%2e/secret", "/..%2fsecret", "/./../secret",
])
def test_paths_leaving_the_directory_are_403(backend, www, target):
    (www.parent / "secret").write_bytes(b"do not serve")
    for method in (b"GET", b"HEAD"):
        request = b"%s %s HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n" % (method, target.encode())
        with backend.connect() as sock:
            sock.sendall(request)
            with sock.makefile("rb") as reader:
                status, _, _ = read_response(reader, head_only=method == b"HEAD")
        assert status == 403
    put = b"PUT %s HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\n\r\nevil" % target.encode()
    assert exchange(backend, put)[0] == 403
    assert (www.parent / "secret").read_bytes() == b"do not serve"


def test_symlink_out_of_the_directory_is_403(backend, www, tmp_path):
    (tmp_path / "outside").write_bytes(b"do not serve")
    (www / "link").symlink_to(tmp_path / "outside")
    assert get(backend, "/link")[0] == 403


def test_directories_are_403(backend, www):
    (www / "sub").mkdir()
    assert get(backend, "/")[0] == 403
    assert get(backend, "/sub")[0] == 403
    assert exchange(backend, b"PUT /sub HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\n\r\nx")[0] == 403


def test_unreadable_file_is_403(start_backend, www):
    wrapper: list = []
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        # Root reads any file; without these two capabilities it obeys file modes like anyone
        # else (setpriv comes with util-linux, part of every Debian system).
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root and setpriv is missing: cannot make a file unreadable")
        wrapper = [setpriv, "--inh-caps=-dac_override,-dac_read_search",
                   "--bounding-set=-dac_override,-dac_read_search"]
    backend = start_backend(wrapper=wrapper)
    secret = www / "secret"
    secret.write_bytes(b"x")
    secret.chmod(0)
    assert get(backend, "/secret")[0] == 403
    assert get(backend, "/hello.txt")[0] == 200


# --- protocol --------------------------------------------------------------------------------


@pytest.mark.parametrize("request_bytes, half_close", [
    (b"garbage\r\n\r\n", False),
    (b"GET /hello.txt HTTP/2.0\r\n\r\n", False),
    (b"GET /hello.txt SPDY/1.1\r\n\r\n", False),
    (b"GET /hello.txt\r\n\r\n", False),
    (b"GET  /hello.txt HTTP/1.1\r\n\r\n", False),
    (b"GET /hello.txt HTTP/1.1\r\nno colon\r\n\r\n", False),
    (b"GET /hello.txt HTTP/1.1\r\n folded: header\r\n\r\n", False),
    (b"PUT /x HTTP/1.1\r\nContent-Length: abc\r\n\r\n", False),
    (b"PUT /x HTTP/1.1\r\nContent-Length: -1\r\n\r\n", False),
    (b"PUT /x HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nxy", False),
    (b"PUT /x HTTP/1.1\r\n\r\n", False),
    (b"GET hello.txt HTTP/1.1\r\n\r\n", False),
    (b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + bytes(range(256)), True),
    (b"GET /hello.txt HTTP/1.1\r\nHost: t\r\n", True),
], ids=["garbage", "http2", "not-http", "no-version", "double-space", "no-colon", "folded",
        "length-not-a-number", "negative-length", "conflicting-lengths", "put-without-length",
        "relative-target", "tls-hello", "cut-short"])
def test_malformed_requests_are_400(backend, request_bytes, half_close):
    status, headers, body = exchange(backend, request_bytes, half_close)
    assert status == 400
    assert body == b"Bad Request\n"


def test_oversized_head_is_400_and_closed(backend):
    with backend.connect() as sock:
        sock.sendall(b"GET /hello.txt HTTP/1.1\r\nHost: t\r\nX-Big: %s\r\n\r\n" % (b"a" * 20000))
        with sock.makefile("rb") as reader:
            status, headers, _ = read_response(reader)
        assert status == 400
        assert headers.get("connection") == "close"
        assert closed_by_peer(sock)


@pytest.mark.parametrize("method", ["DELETE", "POST", "OPTIONS", "PATCH", "BREW"])
def test_other_methods_are_501_and_keep_the_connection_usable(backend, method):
    conn = backend.http()
    try:
        conn.request(method, "/hello.txt", body=b"some body")
        response = conn.getresponse()
        assert response.status == 501
        response.read()
        conn.request("GET", "/hello.txt")
        response = conn.getresponse()
        assert (response.status, response.read()) == (200, b"hello\n")
    finally:
        conn.close()


def test_chunked_body_is_501_and_closed(backend):
    with backend.connect() as sock:
        sock.sendall(b"PUT /x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
        with sock.makefile("rb") as reader:
            assert read_response(reader)[0] == 501
        assert closed_by_peer(sock)


def test_keep_alive_serves_three_requests_on_one_connection(backend, www):
    (www / "two").write_bytes(b"2" * 100000)  # above the small-file size: sent with sendfile
    with backend.connect() as sock, sock.makefile("rb") as reader:
        for path, expected in [("/hello.txt", b"hello\n"), ("/two", b"2" * 100000), ("/hello.txt", b"hello\n")]:
            sock.sendall(b"GET %s HTTP/1.1\r\nHost: t\r\n\r\n" % path.encode())
            status, headers, body = read_response(reader)
            assert (status, body) == (200, expected)
            assert "connection" not in headers


def test_pipelined_requests_are_answered_in_order(backend):
    with backend.connect() as sock, sock.makefile("rb") as reader:
        sock.sendall(b"GET /hello.txt HTTP/1.1\r\nHost: t\r\n\r\n"
                     b"GET /missing HTTP/1.1\r\nHost: t\r\n\r\n"
                     b"HEAD /hello.txt HTTP/1.1\r\nHost: t\r\n\r\n")
        assert read_response(reader)[::2] == (200, b"hello\n")
        assert read_response(reader)[0] == 404
        status, headers, _ = read_response(reader, head_only=True)
        assert (status, headers["content-length"]) == (200, "6")


@pytest.mark.parametrize("request_bytes", [
    b"GET /hello.txt HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    b"GET /hello.txt HTTP/1.1\r\nHost: t\r\nConnection: keep-alive, Close\r\n\r\n",
    b"GET /hello.txt HTTP/1.0\r\n\r\n",
], ids=["connection-close", "close-among-tokens", "http-1.0"])
def test_connection_is_closed_when_asked_or_http_1_0(backend, request_bytes):
    with backend.connect() as sock:
        sock.sendall(request_bytes)
        with sock.makefile("rb") as reader:
            status, headers, body = read_response(reader)
        assert (status, body, headers.get("connection")) == (200, b"hello\n", "close")
        assert closed_by_peer(sock)


def test_expect_100_continue_is_answered_before_the_body(backend, www):
    body = b"sent after Continue"
    with backend.connect() as sock, sock.makefile("rb") as reader:
        sock.sendall(b"PUT /continued HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body))
        # The body is held back until Continue arrives: a server waiting for it would time out here.
        assert reader.readline() == b"HTTP/1.1 100 Continue\r\n"
        assert reader.readline() == b"\r\n"
        sock.sendall(body)
        assert read_response(reader)[0] == 201
    assert (www / "continued").read_bytes() == body


def test_refused_put_with_expect_gets_no_continue(backend, www):
    with backend.connect() as sock, sock.makefile("rb") as reader:
        sock.sendall(b"PUT /../escape HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\n"
                     b"Content-Length: 5\r\n\r\n")
        status, headers, _ = read_response(reader)
        assert (status, headers.get("connection")) == (403, "close")
    assert not (www.parent / "escape").exists()


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_upload_and_download(backend, tmp_path):
    source = tmp_path / "upload.bin"
    source.write_bytes(os.urandom(3 * MIB))  # large enough that curl sends Expect: 100-continue
    url = "http://127.0.0.1:%d/upload.bin" % backend.port
    put = subprocess.run(["curl", "-sS", "--max-time", "20", "-T", str(source), "-o", os.devnull,
                          "-w", "%{http_code}", url], capture_output=True, text=True, timeout=30)
    assert put.stdout == "201", put.stderr
    fetched = tmp_path / "download.bin"
    got = subprocess.run(["curl", "-sS", "--max-time", "20", "-o", str(fetched), "-w", "%{http_code}", url],
                         capture_output=True, text=True, timeout=30)
    assert got.stdout == "200", got.stderr
    assert sha256(fetched.read_bytes()) == sha256(source.read_bytes())


# --- healthcheck -----------------------------------------------------------------------------


def test_healthcheck_counts_are_exact_after_each_request(backend):
    assert healthcheck(backend) == b"0\n0\n"
    steps = [
        (b"GET /hello.txt HTTP/1.1\r\nHost: t\r\n\r\n", 200),
        (b"GET /missing HTTP/1.1\r\nHost: t\r\n\r\n", 404),
        (b"PUT /new HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nnew", 201),
        (b"DELETE /hello.txt HTTP/1.1\r\nHost: t\r\n\r\n", 501),
        (b"garbage\r\n\r\n", 400),
        (b"GET /../secret HTTP/1.1\r\nHost: t\r\n\r\n", 403),
        (b"PUT /healthcheck HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n", 501),
        (b"HEAD /hello.txt HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n", 200),
    ]
    entries = errors = 0
    for request, expected in steps:
        with backend.connect() as sock, sock.makefile("rb") as reader:
            sock.sendall(request)
            status = read_response(reader, head_only=request.startswith(b"HEAD"))[0]
        assert status == expected
        entries += 1
        errors += status >= 400
        # Asked right after the answer arrived: the count already includes it.
        assert healthcheck(backend) == b"%d\n%d\n" % (errors, entries)
    assert (errors, entries) == (5, 8)


def test_healthcheck_answer_is_the_contract_format(backend):
    status, headers, body = exchange(backend, b"GET /healthcheck HTTP/1.1\r\nHost: t\r\n\r\n")
    assert status == 200
    assert headers["content-length"] == str(len(body))
    assert re.fullmatch(rb"\d+\n\d+\n", body)


# --- hostile clients -------------------------------------------------------------------------


def test_hostile_clients_do_not_stop_service_to_others(backend, www):
    for _ in range(20):
        backend.connect().close()  # instant disconnect
    with backend.connect() as sock:
        sock.sendall(os.urandom(256 * 1024))  # binary junk, then gone
    with backend.connect() as sock:
        sock.sendall(b"GET /hello.txt HTTP/1.1\r\nHost: t\r\n")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # reset on close
    with backend.connect() as sock:
        sock.sendall(b"PUT /partial HTTP/1.1\r\nHost: t\r\nContent-Length: 1000000\r\n\r\nonly a little")
    idle = backend.connect()
    slow = backend.connect()
    try:
        slow.sendall(b"GET /hello.txt HTTP/1.1\r\nHo")  # and then nothing more
        for _ in range(3):
            assert get(backend, "/hello.txt") == (200, b"hello\n")
    finally:
        idle.close()
        slow.close()
    assert backend.popen.poll() is None
    assert get(backend, "/partial")[0] == 404
    wait_until(lambda: not list(www.glob(".*.part")), message="the abandoned PUT's temporary file to go")
    assert "Traceback" not in backend.stderr()


def test_idle_connections_are_closed_after_the_timeout(start_backend):
    backend = start_backend("--timeout", "0.5")
    with backend.connect() as silent:
        assert closed_by_peer(silent)
    with backend.connect() as kept, kept.makefile("rb") as reader:
        kept.sendall(b"GET /hello.txt HTTP/1.1\r\nHost: t\r\n\r\n")
        assert read_response(reader)[0] == 200
        assert closed_by_peer(kept)
    assert "Traceback" not in backend.stderr()


# --- bounds: connections, memory, time --------------------------------------------------------


def proc_status(pid: int, field: str) -> int:
    """A number from /proc/PID/status: ``Threads``, or ``VmRSS`` in KiB."""
    with open("/proc/%d/status" % pid) as status:
        for line in status:
            name, _, value = line.partition(":")
            if name == field:
                return int(value.split()[0])
    raise AssertionError("no %s in /proc/%d/status" % (field, pid))


def accept_queue(port: int) -> int:
    """Connections waiting in the listen backlog of 127.0.0.1:PORT, not accepted yet.

    For a listening socket, /proc/net/tcp's rx_queue is the length of its accept queue.
    """
    local = "0100007F:%04X" % port
    with open("/proc/net/tcp") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            if fields[1] == local and fields[3] == "0A":  # 0A: LISTEN
                return int(fields[4].split(":")[1], 16)
    raise AssertionError("nothing listens on %s" % local)


def trickle(sock: socket.socket, data: bytes, interval: float) -> int:
    """Send ``data`` one byte per ``interval`` until the server closes; the bytes sent by then.

    Fails if the server answers or keeps the connection open until all of ``data`` is sent.
    Waiting for the close is the pacing: no sleep.
    """
    sock.settimeout(interval)
    for sent in range(len(data)):
        try:
            sock.sendall(data[sent:sent + 1])
            answer = sock.recv(1)
        except socket.timeout:
            continue
        except (BrokenPipeError, ConnectionResetError):
            return sent
        assert answer == b"", "the server let a trickling client finish its request"
        return sent + 1
    raise AssertionError("the server kept a trickling client for all %d bytes" % len(data))


def test_connections_beyond_the_cap_wait_in_the_backlog_without_threads(start_backend):
    backend = start_backend("--max-connections", "8")
    pid = backend.popen.pid
    assert get(backend, "/hello.txt")[0] == 200
    wait_until(lambda: accept_queue(backend.port) == 0, message="the backlog to drain")
    threads_before = proc_status(pid, "Threads")
    rss_before = proc_status(pid, "VmRSS")
    with contextlib.ExitStack() as stack:
        for number in range(40):
            sock = stack.enter_context(backend.connect())
            if number % 2:
                sock.sendall(b"GET /hello.txt HTTP/1.1\r\nHo")  # a head that never ends
        wait_until(lambda: accept_queue(backend.port) == 32,
                   message="32 of 40 connections left in the backlog by a cap of 8")
        threads = proc_status(pid, "Threads")
        rss = proc_status(pid, "VmRSS")
    assert threads - threads_before <= 8, (threads_before, threads)
    # A connection thread costs its stack's touched pages and a small read buffer.
    assert rss - rss_before < 8 * MIB // KIB, (rss_before, rss)


def test_a_large_content_length_costs_a_bounded_buffer_not_its_size(start_backend, www):
    backend = start_backend()
    pid = backend.popen.pid
    assert exchange(backend, b"PUT /warm HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\n\r\nw")[0] == 201
    rss_before = proc_status(pid, "VmRSS")
    count = 64
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(backend.connect()) for _ in range(count)]
        for number, sock in enumerate(socks):
            # Announces a terabyte, sends nothing yet: no body buffer is due.
            sock.sendall(b"PUT /upload-%d HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n"
                         % (number, 1 << 40))
        wait_until(lambda: len(list(www.glob(".upload-*.part"))) == count,
                   message="every upload to have its temporary file")
        for sock in socks:
            sock.sendall(b"x")
        wait_until(lambda: sorted(p.stat().st_size for p in www.glob(".upload-*.part")) == [1] * count,
                   message="one body byte written for every upload")
        rss = proc_status(pid, "VmRSS")
    # Before the bound every body, however short, cost a zero-filled 1 MiB
    # buffer: 64 MiB here.  Now a connection holds at most one copy chunk.
    assert rss - rss_before < 16 * MIB // KIB, (rss_before, rss)
    wait_until(lambda: not list(www.glob(".upload-*.part")), message="the abandoned uploads to be removed")


def test_a_trickling_head_is_cut_at_the_deadline(start_backend):
    backend = start_backend("--timeout", "1")
    head = b"GET /hello.txt HTTP/1.1\r\nHost: t\r\nX-Slow: " + b"a" * 40 + b"\r\n\r\n"
    with backend.connect() as sock:
        # One byte every 0.2 s beats a 1 s timeout per recv forever; the whole head is due in 1 s.
        sent = trickle(sock, head, interval=0.2)
    assert sent < len(head)
    assert get(backend, "/hello.txt") == (200, b"hello\n")
    assert "Traceback" not in backend.stderr()


def test_a_trickling_body_is_cut_when_it_falls_below_the_minimum_rate(start_backend, www):
    backend = start_backend("--timeout", "1")
    body = b"b" * 60
    with backend.connect() as sock:
        sock.sendall(b"PUT /slow HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % len(body))
        sent = trickle(sock, body, interval=0.2)
    assert sent < len(body)
    wait_until(lambda: not list(www.glob(".slow.*.part")), message="the cut upload to be removed")
    assert get(backend, "/slow")[0] == 404
    assert "Traceback" not in backend.stderr()


def test_a_client_beyond_the_cap_is_served_once_idle_ones_time_out(start_backend):
    backend = start_backend("--max-connections", "2", "--timeout", "4")
    with contextlib.ExitStack() as stack:
        idle = [stack.enter_context(backend.connect()) for _ in range(2)]
        with backend.connect() as client, client.makefile("rb") as reader:
            client.sendall(b"GET /hello.txt HTTP/1.1\r\nHost: t\r\n\r\n")
            wait_until(lambda: accept_queue(backend.port) == 1,
                       message="the client to wait in the backlog behind two idle connections")
            assert read_response(reader)[::2] == (200, b"hello\n")  # within TIMEOUT, after about 4 s
        for sock in idle:
            assert closed_by_peer(sock)
    assert "Traceback" not in backend.stderr()


@pytest.mark.parametrize("value", ["0", "-5", "many", "2.5"])
def test_bad_max_connections_is_a_one_line_error(value):
    result = subprocess.run([sys.executable, "-m", "fastlb.backend", "0", "--max-connections", value],
                            cwd=str(ROOT), capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 2
    assert "usage:" in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("fastlb-backend: error: argument --max-connections: "), result.stderr
    assert value in last
    assert "Traceback" not in result.stderr


# --- in-process API and parsing --------------------------------------------------------------


def test_file_server_api_serves_and_counts_in_process(www):
    with FileServer(str(www)) as server:
        assert server.port > 0
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=TIMEOUT)
        try:
            for path in ("/hello.txt", "/missing", "/healthcheck"):
                conn.request("GET", path)
                conn.getresponse().read()
        finally:
            conn.close()
        assert (server.entries, server.errors) == (2, 1)
        port = server.port
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT).close()


def test_read_request_parses_a_head():
    request = read_request(io.BytesIO(b"\r\nPUT /a?b HTTP/1.1\r\nHost: x\r\nContent-Length: 5, 5\r\n"
                                      b"Expect: 100-Continue\r\n\r\nhello"))
    assert (request.method, request.target, request.version) == ("PUT", "/a?b", "HTTP/1.1")
    assert (request.content_length, request.keep_alive, request.expect_continue) == (5, True, True)
    assert read_request(io.BytesIO(b"")) is None


def test_read_request_limits_the_head_size():
    with pytest.raises(HTTPError) as raised:
        read_request(io.BytesIO(b"GET / HTTP/1.1\r\nX: " + b"a" * 100 + b"\r\n\r\n"), limit=64)
    assert raised.value.status == 400


def test_resolve_path_stays_inside_the_root(tmp_path):
    root = os.path.realpath(tmp_path)
    assert resolve_path(root, "/a/./b%20c?q=1") == os.path.join(root, "a", "b c")
    for target, status in [("/../x", 403), ("/a/%2E%2E/%2e%2e/x", 403), ("x", 400), ("/a%00b", 400)]:
        with pytest.raises(HTTPError) as raised:
            resolve_path(root, target)
        assert raised.value.status == status, target
