"""Fault backends for the end-to-end tests: real listening sockets served from threads.

A ``FaultServer`` listens on 127.0.0.1 and answers health probes
(``GET /healthcheck``) and other requests each in a way the test chooses, and
may change while it runs (a healthy backend that starts hanging, say):

OK         probes: ``200`` with ``<errors>\\n<entries>\\n``; requests: ``200`` with ``body``
SILENT     read the request, then never answer (the connection stays open)
STATUS_404 ``404 Not Found``
GARBAGE    bytes that are not HTTP, then close
DELAY      sleep ``delay`` seconds, then answer as OK

It records when each probe and request arrived, so a test can wait for "the
backend has the request" instead of sleeping.  ``stop()`` closes the listener
and every open connection, so no thread outlives the test.
"""

from __future__ import annotations

import select
import socket
import threading
import time
from typing import Optional

OK, SILENT, STATUS_404, GARBAGE, DELAY = "ok", "silent", "status404", "garbage", "delay"

GARBAGE_BYTES = b"\x16\x03\x01\x00\xa5garbage, not HTTP at all\r\n\r\n\xff\xfe"
RESPONSE_404 = b"HTTP/1.1 404 Not Found\r\nContent-Length: 10\r\nConnection: close\r\n\r\nNot Found\n"

# A request head bigger than this is not something a test sends.
MAX_HEAD = 64 * 1024
# How long a handler waits for a request head: far longer than any test step.
HEAD_TIMEOUT = 30.0


class FaultServer:
    """One misbehaving (or well-behaved) backend; see the module comment."""

    def __init__(self, probe: str = OK, request: str = OK, body: bytes = b"fault\n",
                 delay: float = 6.0, port: int = 0, name: str = "fault"):
        self.probe_mode = probe
        self.request_mode = request
        self.body = body
        self.delay = delay
        self.name = name
        self.errors = 0
        self._lock = threading.Lock()          # guards the lists and counters below
        self.probe_log: list[tuple[float, str]] = []    # (monotonic arrival time, mode) of each probe
        self.request_log: list[tuple[float, str]] = []  # ... of each other request
        self.accepted = 0                      # connections accepted, of any kind
        self._conns: set[socket.socket] = set()
        self._stopped = threading.Event()
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", port))
        self._listener.listen(512)
        self.port = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._accept_loop, daemon=True,
                                        name="fault-%s-%d" % (name, self.port))
        self._thread.start()

    # -- what a test looks at ---------------------------------------------------

    @property
    def probes(self) -> int:
        with self._lock:
            return len(self.probe_log)

    @property
    def requests(self) -> int:
        with self._lock:
            return len(self.request_log)

    def probe_times(self, mode: str = "") -> list[float]:
        """Arrival times of the probes answered in ``mode`` (all probes by default)."""
        with self._lock:
            return [t for t, m in self.probe_log if not mode or m == mode]

    def stop(self) -> None:
        """Stop listening and cut every open connection."""
        self._stopped.set()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._thread.join(5)

    def __enter__(self) -> "FaultServer":
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    # -- serving -------------------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._stopped.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self.accepted += 1
                self._conns.add(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            head = self._read_head(conn)
            if head is None:
                return
            is_probe = head.split(b" ", 2)[1:2] == [b"/healthcheck"]
            with self._lock:
                mode = self.probe_mode if is_probe else self.request_mode
                (self.probe_log if is_probe else self.request_log).append((time.monotonic(), mode))
            if mode == DELAY:
                if self._stopped.wait(self.delay):
                    return
                mode = OK
            if mode == SILENT:
                self._hold(conn)
            elif mode == STATUS_404:
                conn.sendall(RESPONSE_404)
            elif mode == GARBAGE:
                conn.sendall(GARBAGE_BYTES)
            elif is_probe:
                with self._lock:
                    body = b"%d\n%d\n" % (self.errors, len(self.request_log))
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                             % (len(body), body))
            else:
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                             % (len(self.body), self.body))
        except OSError:
            pass
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()

    def _read_head(self, conn: socket.socket) -> Optional[bytes]:
        conn.settimeout(HEAD_TIMEOUT)
        data = b""
        while b"\r\n\r\n" not in data and len(data) < MAX_HEAD:
            chunk = conn.recv(65536)
            if not chunk:
                return data or None
            data += chunk
        return data

    def _hold(self, conn: socket.socket) -> None:
        """Never answer; return when the peer closes or the server stops."""
        while not self._stopped.is_set():
            readable, _, _ = select.select([conn], [], [], 0.2)
            if readable and not conn.recv(65536):
                return


def refused_port() -> int:
    """A port on 127.0.0.1 where nothing listens (connections are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
