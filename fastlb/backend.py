"""A small threaded HTTP/1.1 file server: the backend behind fastlb's demo, tests and benchmarks.

fastlb routes each client to the backend reporting the fewest requests on
``GET /healthcheck``.  This module is such a backend, standard library only, so
the demo, the tests and the benchmarks need nothing else installed::

    python -m fastlb.backend PORT [--dir DIR] [--host 127.0.0.1] [--timeout 30]
                             [--max-connections 1024] [--verbose]

It serves the files of one directory:

- ``GET`` and ``HEAD`` a file (large files go out with ``sendfile``);
- ``PUT`` a file: the body is written to a temporary file that is then renamed
  over the target, so a reader sees the old file or the new one, never half of
  it; ``201 Created`` for a new file, ``200 OK`` for a replaced one;
- ``GET /healthcheck`` answers ``<errors>\\n<entries>\\n``: ``entries`` counts the
  other requests answered, ``errors`` those answered with 4xx or 5xx.

Status codes follow the classic course server: 400 for a malformed request,
403 for a path leaving the directory, a directory or a permission error, 404,
501 for other methods, 500 for anything unexpected.  Connections are kept alive
(HTTP/1.1) unless the client says ``Connection: close`` or speaks HTTP/1.0.

A hostile or broken client costs a bounded share of the server:

- at most ``--max-connections`` (1024) connections are served at once; more
  wait in the listen backlog (1024 more; the kernel drops the rest, and
  clients retry) until a served one ends;
- a request head must arrive whole within ``--timeout`` of the connection's
  acceptance or of its previous answer, so an idle keep-alive connection and a
  head trickled byte by byte are both closed, without an answer;
- a request body, after a grace of ``--timeout``, must arrive at 500 bytes/s
  on average, and no wait for it may last longer than ``--timeout``;
- a connection holds at most a 16 KiB read buffer (one request head of the
  largest size accepted) and one 64 KiB body chunk, allocated only when body
  bytes arrive: an announced ``Content-Length`` costs nothing by itself.

Design: one accept thread takes a connection only when fewer than
``--max-connections`` are open, and starts a daemon thread per connection;
``_Connection`` speaks the protocol.  ``http.server`` is not used because its
answers disagree with the contract (414, 431 and 505 where 400 is required,
HTML error pages) and its error paths print tracebacks; overriding all of that
is more code than the request parsing below.  The counters and the set of open
connections are the only state shared between threads and are guarded by
``FileServer._lock``; a connection that ends signals ``FileServer._slot_freed``
to the accept thread.  Parsing (``read_request``, ``resolve_path``) is plain
functions, testable without sockets.

In-process use::

    with FileServer("www") as server:
        ...  # server.port, server.entries, server.errors
"""

from __future__ import annotations

import argparse
import errno
import io
import logging
import math
import os
import re
import secrets
import select
import signal
import socket
import stat
import sys
import threading
import time
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, BinaryIO, Optional
from urllib.parse import unquote_to_bytes

from fastlb.settings import argparse_type, at_least_one, port_or_zero, seconds

__all__ = ["FileServer", "HTTPError", "Request", "main", "read_request", "resolve_path"]

log = logging.getLogger("fastlb.backend")

HEALTHCHECK_PATH = "/healthcheck"
DEFAULT_TIMEOUT = 30.0
# Connections served at once, each by a thread of its own; beyond the cap new
# connections wait in the listen backlog, as with nginx's worker_connections
# and gunicorn's --worker-connections (default 1000).  A connection costs
# about 25 KiB of thread stack and bookkeeping, a read buffer and at most one
# body chunk, so 1024 of them stay near 100 MiB; and up to two descriptors
# (socket, file): under a soft open-file limit of 1024 accept() fails first,
# which pauses accepting (ACCEPT_RETRY_SECONDS) rather than the server.
DEFAULT_MAX_CONNECTIONS = 1024
# Request line plus headers.  Real clients send well under 1 KiB; 16 KiB is
# nginx's order of magnitude and bounds what a hostile client can make us hold.
MAX_HEAD_BYTES = 16 * 1024
# The most of a request body one connection holds at a time.  Each chunk is
# allocated by the read that fills it and freed once written, so a body that
# is announced but not sent costs nothing, and at --max-connections busy
# uploads the bodies in flight stay under 64 MiB.  A MiB still costs only 16
# recv/write pairs.
COPY_CHUNK = 64 * 1024
# The connection's read buffer: one request head of the largest size
# accepted; body chunks are read around it, straight from the socket.
READ_BUFFER = MAX_HEAD_BYTES
# Files up to this size go out in the same send() as the header: one system
# call and, with TCP_NODELAY, no extra small packet per response.
SMALL_FILE = 64 * 1024
# After a grace of --timeout, a request body must keep arriving at this
# average rate or the connection is cut: each byte received extends the body's
# deadline by 1/MIN_BODY_RATE s.  500 bytes/s is Apache mod_reqtimeout's
# default MinRate, slower than any real uplink, while a client trickling one
# byte a second is cut soon after --timeout instead of holding its thread for
# as many seconds as the Content-Length it announced.
MIN_BODY_RATE = 500
# How long an error answer waits for the client to stop sending before closing;
# closing with unread input makes the kernel send a reset that can destroy the
# answer before the client has read it.  Apache waits 2 s too.
LINGER_SECONDS = 2.0
# The default backlog of 5 drops connections under benchmark load.  It is
# also where connections beyond --max-connections wait; the kernel drops
# further attempts, which clients retry.
LISTEN_BACKLOG = 1024
# How long accepting pauses after accept() failed for want of descriptors or
# memory, instead of spinning on a listener that stays readable (nginx waits
# 500 ms too).  Connections ending meanwhile give the resources back.
ACCEPT_RETRY_SECONDS = 0.5

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VERSION = re.compile(r"HTTP/(\d)\.(\d)")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # control characters except tab
_DIGITS = re.compile(r"[0-9]{1,18}")  # 18 digits always fit in 63 bits


class HTTPError(Exception):
    """A request that is answered with an error status instead of being served."""

    def __init__(self, status: int, detail: str = ""):
        super().__init__(detail or HTTPStatus(status).phrase)
        self.status = status


class ClientGone(Exception):
    """The client connection failed or closed in the middle of a request.

    Not an OSError, so that a failing file-system call cannot pass for a
    client that went away: that one is a 500.
    """


@dataclass
class Request:
    """The head of one HTTP request, validated."""

    method: str
    target: str
    version: str                      # "HTTP/1.0" or "HTTP/1.1"
    headers: dict[str, str]           # lower-case name -> value; repeated fields joined by ", "
    content_length: Optional[int]     # None when the request has no Content-Length
    chunked: bool                     # a Transfer-Encoding we cannot frame
    keep_alive: bool
    expect_continue: bool


def read_request(rfile: BinaryIO, limit: int = MAX_HEAD_BYTES) -> Optional[Request]:
    """Read and parse one request head; None if the peer closed before sending one.

    Raises HTTPError(400) for a malformed or oversized head, or one cut short by EOF.
    """
    budget = limit
    lines: list[str] = []
    while True:
        raw = rfile.readline(budget + 1)
        if not raw:
            if not lines:
                return None
            raise HTTPError(400, "connection closed inside the request head")
        budget -= len(raw)
        if budget < 0:
            raise HTTPError(400, "request head larger than %d bytes" % limit)
        if not raw.endswith(b"\n"):
            raise HTTPError(400, "connection closed inside the request head")
        # Bare LF line ends are accepted, as RFC 9112 section 2.2 allows.
        line = raw[:-2] if raw.endswith(b"\r\n") else raw[:-1]
        if not line:
            if lines:
                break
            continue  # empty lines before the request line are tolerated (RFC 9112 section 2.2)
        lines.append(line.decode("latin-1"))
    method, target, version = parse_request_line(lines[0])
    return build_request(method, target, version, parse_headers(lines[1:]))


def parse_request_line(line: str) -> tuple[str, str, str]:
    """Split ``METHOD TARGET HTTP/1.x`` into its three parts."""
    parts = line.split(" ")
    if len(parts) != 3:
        raise HTTPError(400, "request line is not METHOD TARGET VERSION")
    method, target, version = parts
    if not _TOKEN.fullmatch(method):
        raise HTTPError(400, "bad method")
    if not target or _CONTROL.search(target):
        raise HTTPError(400, "bad request target")
    match = _VERSION.fullmatch(version)
    if not match or match.group(1) != "1":
        raise HTTPError(400, "not HTTP/1.x")
    # HTTP/1.2 and later minor versions are spoken to as HTTP/1.1 (RFC 9110 section 6.2).
    return method, target, "HTTP/1.0" if match.group(2) == "0" else "HTTP/1.1"


def parse_headers(lines: list[str]) -> dict[str, str]:
    """Parse ``Name: value`` lines into a dict keyed by lower-case name."""
    headers: dict[str, str] = {}
    for line in lines:
        name, colon, value = line.partition(":")
        # A token check also rejects "Name :" and obsolete line folding, both
        # of which RFC 9112 says to refuse because of request smuggling.
        if not colon or not _TOKEN.fullmatch(name):
            raise HTTPError(400, "malformed header line")
        value = value.strip(" \t")
        if _CONTROL.search(value):
            raise HTTPError(400, "control character in header value")
        key = name.lower()
        headers[key] = "%s, %s" % (headers[key], value) if key in headers else value
    return headers


def build_request(method: str, target: str, version: str, headers: dict[str, str]) -> Request:
    """Derive body framing and connection handling from a parsed head."""
    content_length = None
    if "content-length" in headers:
        # Repeated identical lengths are harmless; differing ones are an attack.
        values = {value.strip() for value in headers["content-length"].split(",")}
        if len(values) != 1 or not _DIGITS.fullmatch(next(iter(values))):
            raise HTTPError(400, "bad Content-Length")
        content_length = int(values.pop())
    connection = {token.strip().lower() for token in headers.get("connection", "").split(",")}
    http11 = version == "HTTP/1.1"
    return Request(
        method=method,
        target=target,
        version=version,
        headers=headers,
        content_length=content_length,
        chunked="transfer-encoding" in headers,
        keep_alive=http11 and "close" not in connection,
        expect_continue=http11 and headers.get("expect", "").lower() == "100-continue",
    )


def resolve_path(root: str, target: str) -> str:
    """Map a request target to a path inside ``root`` (a real path), refusing to leave it.

    Raises HTTPError(400) for a target that is not a path, HTTPError(403) for
    one that climbs out with ``..`` or through a symbolic link.
    """
    path = target.partition("?")[0]
    if not path.startswith("/"):
        raise HTTPError(400, "request target is not an absolute path")
    # Decode before splitting, so %2e%2e and %2f cannot smuggle a ".." past the check.
    name = os.fsdecode(unquote_to_bytes(path))
    if "\0" in name:
        raise HTTPError(400, "NUL in path")
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise HTTPError(403, "path leaves the served directory")
    full = os.path.join(root, *parts)
    if os.path.commonpath([root, os.path.realpath(full)]) != root:
        raise HTTPError(403, "path leads out of the served directory")
    return full


def open_regular_file(path: str) -> BinaryIO:
    """Open ``path`` for reading; HTTPError unless it is a readable regular file."""
    try:
        # O_NONBLOCK so that a FIFO in the directory cannot hang the thread in open().
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise _file_error(exc) from exc
    try:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            return open(fd, "rb")
    except OSError as exc:
        os.close(fd)
        raise _file_error(exc) from exc
    os.close(fd)
    raise HTTPError(403, "not a regular file")


def _file_error(exc: OSError) -> HTTPError:
    """The answer for a failed file-system call."""
    if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ENAMETOOLONG):
        return HTTPError(404)
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EISDIR, errno.EROFS, errno.ENXIO):
        return HTTPError(403)
    log.warning("file system error: %s", exc)
    return HTTPError(500, str(exc))


class _SocketReader(io.RawIOBase):
    """The reading side of a client socket, as a raw stream whose reads stop at a deadline.

    A recv waits at most ``timeout`` and never past ``deadline``: a per-recv
    timeout alone lets a client that sends one byte just in time hold the
    connection for ever.
    """

    def __init__(self, sock: socket.socket, timeout: float):
        super().__init__()
        self._sock = sock
        self.timeout = timeout
        self.deadline = math.inf  # time.monotonic() value

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        wait = min(self.timeout, self.deadline - time.monotonic())
        if wait <= 0:
            raise socket.timeout("deadline passed")
        self._sock.settimeout(wait)
        return self._sock.recv_into(buffer)


class _Connection:
    """One client connection: answers its requests in turn until either side is done."""

    def __init__(self, server: FileServer, sock: socket.socket, peer: tuple[Any, ...]):
        self.server = server
        self.sock = sock
        self.peer = "%s:%s" % peer[:2]
        self.reader = _SocketReader(sock, server.timeout)
        self.rfile = io.BufferedReader(self.reader, READ_BUFFER)
        self.body_left = 0           # bytes of the current request body not read yet
        self.continue_sent = False
        self.response_started = False
        self.linger = False          # closing with client input possibly unread

    def serve(self) -> None:
        try:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while self.serve_one():
                pass
            if self.linger:
                self.lingering_close()
        except (ClientGone, OSError) as exc:
            # Timeouts, resets, broken pipes: the client's business, not worth a log line.
            log.debug("connection from %s ended: %s", self.peer, exc)
        finally:
            self.rfile.close()

    def serve_one(self) -> bool:
        """Answer one request; True if the connection can carry another."""
        self.response_started = False
        # The whole head is due within the timeout of the connection's
        # acceptance or of its previous answer: an idle keep-alive connection
        # and a trickling head are cut alike (nginx client_header_timeout).
        self.reader.deadline = time.monotonic() + self.server.timeout
        try:
            request = read_request(self.rfile)
        except HTTPError as exc:
            # The framing is lost after a malformed head: answer, then close.
            self.linger = True
            self.respond(None, exc.status, keep_alive=False)
            return False
        if request is None:
            return False
        self.body_left = request.content_length or 0
        self.continue_sent = False
        try:
            return self.dispatch(request)
        except HTTPError as exc:
            return self.refuse(request, exc.status)
        except ClientGone:
            raise
        except Exception:
            log.exception("unexpected error answering %s %s", request.method, request.target)
            if self.response_started:
                return False
            return self.refuse(request, 500)

    def dispatch(self, request: Request) -> bool:
        if request.chunked:
            raise HTTPError(501, "Transfer-Encoding is not supported")
        if request.target.partition("?")[0] == HEALTHCHECK_PATH:
            return self.healthcheck(request)
        if request.method in ("GET", "HEAD"):
            return self.get(request)
        if request.method == "PUT":
            return self.put(request)
        raise HTTPError(501)

    def healthcheck(self, request: Request) -> bool:
        if request.method != "GET":
            raise HTTPError(501, "only GET on %s" % HEALTHCHECK_PATH)
        keep = self.finish_body(request)
        errors, entries = self.server.counts()
        body = b"%d\n%d\n" % (errors, entries)
        self.respond(request, 200, body, keep_alive=keep, counted=False)
        return keep

    def get(self, request: Request) -> bool:
        path = resolve_path(self.server.root, request.target)
        with open_regular_file(path) as file:
            try:
                size = os.fstat(file.fileno()).st_size
                data = file.read(size) if request.method == "GET" and size <= SMALL_FILE else None
            except OSError as exc:
                raise _file_error(exc) from exc
            keep = self.finish_body(request)
            kind = "application/octet-stream"
            if data is not None:
                self.respond(request, 200, data, keep_alive=keep, content_type=kind)
                return keep
            self.respond(request, 200, length=size, keep_alive=keep, content_type=kind)
            if request.method == "HEAD":
                return keep
            try:
                self.sock.settimeout(self.server.timeout)
                sent = self.sock.sendfile(file, 0, size)
            except OSError as exc:
                raise ClientGone(exc) from exc
            # A file truncated behind our back leaves the body short; only closing tells the client.
            return sent == size and keep

    def put(self, request: Request) -> bool:
        path = resolve_path(self.server.root, request.target)
        if request.content_length is None:
            raise HTTPError(400, "PUT needs a Content-Length")
        if os.path.isdir(path):
            raise HTTPError(403, "is a directory")
        directory, name = os.path.split(path)
        # Hidden and in the same directory, so the rename is atomic; O_EXCL and a
        # random suffix keep concurrent PUTs of one name apart; mode 0o666 lets
        # the umask decide the permissions, as for any new file.
        temp = os.path.join(directory, ".%s.%s.part" % (name, secrets.token_hex(8)))
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except OSError as exc:
            raise _file_error(exc) from exc
        renamed = False
        try:
            try:
                if request.expect_continue and self.body_left:
                    self.send(b"HTTP/1.1 100 Continue\r\n\r\n")
                    self.continue_sent = True
                self.receive_body(fd)
            finally:
                os.close(fd)
            # No fsync: readers must never see a partial file, which the rename
            # guarantees; surviving a power cut is not this server's job.
            created = not os.path.lexists(path)
            try:
                os.replace(temp, path)
            except OSError as exc:
                raise _file_error(exc) from exc
            renamed = True
        finally:
            if not renamed:
                try:
                    os.unlink(temp)
                except OSError:
                    pass
        status = 201 if created else 200
        self.respond(request, status, b"Created\n" if created else b"OK\n", keep_alive=request.keep_alive)
        return request.keep_alive

    def receive_body(self, fd: Optional[int]) -> None:
        """Read the rest of the request body into file descriptor ``fd``, or drop it if None."""
        self.reader.deadline = time.monotonic() + self.server.timeout
        while self.body_left:
            try:
                # read1 returns what one recv brought (or what the read buffer
                # already held), never more than a chunk, whatever the length announced.
                data = self.rfile.read1(min(self.body_left, COPY_CHUNK))
            except OSError as exc:
                raise ClientGone(exc) from exc
            if not data:
                raise ClientGone("closed with %d body bytes missing" % self.body_left)
            self.body_left -= len(data)
            self.reader.deadline += len(data) / MIN_BODY_RATE
            if fd is not None:
                # os.write, not a buffered file: a full disk must fail here, as
                # a 500, and not later in a flush that looks like a socket error.
                chunk = memoryview(data)
                try:
                    while chunk:
                        chunk = chunk[os.write(fd, chunk):]
                except OSError as exc:
                    raise _file_error(exc) from exc

    def finish_body(self, request: Request) -> bool:
        """Drop what is left of the request body; True if the connection can be kept."""
        if request.chunked or (self.body_left and request.expect_continue and not self.continue_sent):
            # No length to skip by, or a client holding its body back until a
            # Continue that will not come: only closing ends this request.
            self.linger = True
            return False
        self.receive_body(None)
        return request.keep_alive

    def refuse(self, request: Request, status: int) -> bool:
        """Answer ``status`` instead of serving; True if the connection can be kept."""
        keep = self.finish_body(request)
        self.linger = self.linger or not keep
        self.respond(request, status, keep_alive=keep)
        return keep

    def respond(self, request: Optional[Request], status: int, body: Optional[bytes] = None, *,
                keep_alive: bool, length: Optional[int] = None,
                content_type: str = "text/plain; charset=utf-8", counted: bool = True) -> None:
        """Send the status line, headers and ``body`` (default: the reason phrase).

        ``length`` announces a body sent separately.  A HEAD answer gets the
        headers of the GET answer without its body.
        """
        phrase = HTTPStatus(status).phrase
        if body is None:
            body = b"" if length is not None else phrase.encode("ascii") + b"\n"
        if length is None:
            length = len(body)
        head = "HTTP/1.1 %d %s\r\nContent-Length: %d\r\nContent-Type: %s\r\n%s\r\n" % (
            status, phrase, length, content_type, "" if keep_alive else "Connection: close\r\n")
        if request is not None and request.method == "HEAD":
            body = b""
        if counted:
            # Counted before sending, so a client holding the answer knows the
            # count already includes it.
            self.server.record(status)
        self.response_started = True
        self.send(head.encode("latin-1") + body)
        if self.server.log_requests:
            line = "%s %s %s" % (request.method, request.target, request.version) if request else "-"
            log.info('%s "%s" %d %d', self.peer, line, status, length)

    def send(self, data: bytes) -> None:
        try:
            # Reads leave the socket with whatever remained of their deadline.
            self.sock.settimeout(self.server.timeout)
            self.sock.sendall(data)
        except OSError as exc:
            raise ClientGone(exc) from exc

    def lingering_close(self) -> None:
        """Half-close, then drain the client's input for a while before the socket is closed."""
        try:
            self.sock.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + LINGER_SECONDS
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                self.sock.settimeout(remaining)
                if not self.sock.recv(READ_BUFFER):
                    return
        except OSError:
            pass


class FileServer:
    """Serve one directory over HTTP/1.1 from background threads.

    ``start()`` binds and starts accepting (OSError if the address is taken);
    ``stop()`` stops accepting and cuts the open connections.  Usable as a
    context manager.  ``entries`` and ``errors`` are what ``/healthcheck`` reports.
    At most ``max_connections`` connections are served at once; more wait in
    the listen backlog until one ends.
    """

    def __init__(self, directory: str = ".", port: int = 0, host: str = "127.0.0.1",
                 timeout: float = DEFAULT_TIMEOUT, log_requests: bool = False,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS):
        self.root = os.path.realpath(directory)
        if not os.path.isdir(self.root):
            raise NotADirectoryError(errno.ENOTDIR, "not a directory", directory)
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1, not %d" % max_connections)
        self.host = host
        self.timeout = timeout
        self.log_requests = log_requests
        self.max_connections = max_connections
        self._port = port
        self._lock = threading.Lock()  # guards _entries, _errors, _sockets, _stopping
        self._slot_freed = threading.Condition(self._lock)  # a connection left _sockets, or stopping
        self._entries = 0
        self._errors = 0
        # Open client connections, at most max_connections; cut by stop().
        self._sockets: set[socket.socket] = set()
        self._stopping = False
        self._listener: Optional[socket.socket] = None
        # A socket pair: stop() writes to [1] to end the accept loop.
        self._wakeup: tuple[socket.socket, ...] = ()
        self._thread: Optional[threading.Thread] = None

    @property
    def port(self) -> int:
        """The port listened on: the real one once started, even when 0 was asked for."""
        return self._port

    @property
    def entries(self) -> int:
        with self._lock:
            return self._entries

    @property
    def errors(self) -> int:
        with self._lock:
            return self._errors

    def counts(self) -> tuple[int, int]:
        """``(errors, entries)`` taken together, as /healthcheck reports them."""
        with self._lock:
            return self._errors, self._entries

    def record(self, status: int) -> None:
        """Count one answered request."""
        with self._lock:
            self._entries += 1
            if status >= 400:
                self._errors += 1

    def start(self) -> FileServer:
        if self._listener is not None:
            raise RuntimeError("FileServer already started")
        listener = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((self.host, self._port))
            listener.listen(LISTEN_BACKLOG)
            # Non-blocking: a connection reset between poll() and accept()
            # must not leave the accept loop blocked where stop() cannot wake it.
            listener.setblocking(False)
        except OSError:
            listener.close()
            raise
        self._listener = listener
        self._port = listener.getsockname()[1]
        self._wakeup = socket.socketpair()
        self._stopping = False
        self._thread = threading.Thread(target=self._accept_loop, args=(listener, self._wakeup[0]),
                                        daemon=True, name="fastlb-backend:%d" % self._port)
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            if listener is None:
                return
            self._stopping = True
            self._slot_freed.notify_all()
        self._wakeup[1].send(b"\0")
        assert self._thread is not None  # started with the listener
        self._thread.join()
        listener.close()  # connections still in the backlog are reset
        for end in self._wakeup:
            end.close()
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            # shutdown, not close: the connection thread still owns the descriptor.
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _accept_loop(self, listener: socket.socket, wakeup: socket.socket) -> None:
        """Accept connections while fewer than max_connections are open (the accept thread)."""
        poller = select.poll()
        poller.register(listener, select.POLLIN)
        poller.register(wakeup, select.POLLIN)
        stop_poller = select.poll()  # poll, not select: descriptors may exceed FD_SETSIZE
        stop_poller.register(wakeup, select.POLLIN)
        while True:
            with self._lock:
                # At the cap, stop accepting: new connections wait in the
                # listen backlog rather than costing a thread each.
                while len(self._sockets) >= self.max_connections and not self._stopping:
                    self._slot_freed.wait()
                if self._stopping:
                    return
            if any(fd == wakeup.fileno() for fd, _ in poller.poll()):
                return
            try:
                sock, peer = listener.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                continue  # gone before it was accepted
            except OSError as exc:
                # EMFILE, ENFILE, ENOBUFS, ENOMEM: the listener stays readable,
                # so retrying at once would spin.
                log.warning("cannot accept connections for now: %s", exc)
                if stop_poller.poll(ACCEPT_RETRY_SECONDS * 1000):
                    return
                continue
            with self._lock:
                self._sockets.add(sock)
            try:
                threading.Thread(target=self.serve_connection, args=(sock, peer), daemon=True,
                                 name="fastlb-backend:%d %s:%s" % (self._port, *peer[:2])).start()
            except RuntimeError as exc:  # no thread to be had: this connection is refused
                log.warning("cannot serve the connection from %s:%s: %s", *peer[:2], exc)
                self._forget(sock)

    def serve_connection(self, sock: socket.socket, peer: tuple[Any, ...]) -> None:
        """Answer requests on one accepted connection until it ends (runs in its own thread)."""
        try:
            _Connection(self, sock, peer).serve()
        except Exception:
            # Only a bug gets here (client failures are handled in _Connection), so keep the traceback.
            log.exception("unexpected error on the connection from %s:%s", *peer[:2])
        finally:
            self._forget(sock)

    def _forget(self, sock: socket.socket) -> None:
        """Close an accepted connection and give its slot back."""
        with self._lock:
            self._sockets.discard(sock)
            # Closed under the lock, so that the cap counts descriptors too;
            # closing a TCP socket without SO_LINGER never blocks.
            sock.close()
            self._slot_freed.notify()

    def __enter__(self) -> FileServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastlb-backend",
        description="Serve a directory over HTTP/1.1 (GET, HEAD, PUT) with a fastlb /healthcheck.",
    )
    parser.add_argument("port", type=argparse_type(port_or_zero), metavar="PORT",
                        help="TCP port to listen on; 0 picks a free one (the start-up line shows it)")
    parser.add_argument("--dir", default=".", metavar="DIR",
                        help="directory to serve (default: the current directory)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--timeout", type=argparse_type(seconds), default=DEFAULT_TIMEOUT, metavar="SECONDS",
                        help="close a connection whose request head takes longer than this to"
                             " arrive, idle ones included, or whose body falls below %d bytes/s"
                             " after this long (default: %g)" % (MIN_BODY_RATE, DEFAULT_TIMEOUT))
    parser.add_argument("--max-connections", type=argparse_type(at_least_one), default=DEFAULT_MAX_CONNECTIONS,
                        metavar="N",
                        help="serve at most N connections at once; more wait in the listen backlog"
                             " until one ends (default: %d)" % DEFAULT_MAX_CONNECTIONS)
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("-v", "--verbose", action="store_true",
                           help="log every request to stderr")
    verbosity.add_argument("-q", "--quiet", dest="verbose", action="store_false",
                           help="log only the start-up line and errors (the default)")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    """Run the server until SIGTERM or SIGINT; return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not os.path.isdir(args.dir):
        parser.error("--dir %s is not a directory" % args.dir)
    logging.basicConfig(stream=sys.stderr, format="fastlb-backend: %(message)s",
                        level=logging.INFO if args.verbose else logging.WARNING)
    server = FileServer(args.dir, args.port, args.host, args.timeout, log_requests=args.verbose,
                        max_connections=args.max_connections)
    # Block the stop signals before any thread exists: every thread inherits
    # the mask and only sigwait() below receives them, so no handler or
    # KeyboardInterrupt ever fires in the middle of a request.
    stop_signals = {signal.SIGTERM, signal.SIGINT}
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    try:
        try:
            server.start()
        except OSError as exc:
            print("fastlb-backend: cannot listen on %s:%d: %s"
                  % (args.host, args.port, exc.strerror or exc), file=sys.stderr)
            return 1
        print("fastlb-backend listening on %s:%d serving %s" % (args.host, server.port, server.root),
              file=sys.stderr, flush=True)
        signal.sigwait(stop_signals)
        server.stop()
        return 0
    finally:
        # Swallow a second signal that arrived while stopping, so that
        # unblocking does not deliver it as a traceback or a kill.
        while signal.sigpending() & stop_signals:
            signal.sigwait(stop_signals)
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)


if __name__ == "__main__":
    sys.exit(main())
