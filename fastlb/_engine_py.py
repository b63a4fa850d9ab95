"""Pure-Python twin of the relay engine, and its readable specification.

One event loop relaying many connections, with the same public API and the
same decisions in the same states as the compiled twin (``src/engine.pyx``).
The design both follow -- who runs where, who owns which descriptor, the
states of a connection, relaying, the router protocol -- is in
``docs/design.md`` ("The relay engine").  Local to this twin: a ``selectors``
loop with a socket-pair waker, ``bytearray`` buffers, deadlines as floats on
``_Conn`` objects, and router calls made at once rather than gathered per
loop turn.
"""

from __future__ import annotations

import collections
import errno
import os
import select
import selectors
import socket
import time
from typing import TYPE_CHECKING, Any, Literal, Optional, Union

from fastlb._bridge_py import (MAX_PROXY_HEADER, STATUS_PREFIX_LEN, Endpoint, build_proxy_header,
                               parse_proxy_header, parse_status_line)
from fastlb._twin_common import connect_reason
from fastlb.failsafe import INTERNAL_ERRORS
from fastlb.waker import Waker

if TYPE_CHECKING:
    from _typeshed import HasFileno

    from fastlb.router import Route, Router

__all__ = [
    "ACCEPT_BATCH", "BUFFER_LIMIT", "LINGER_BYTES", "LINGER_SECONDS", "READ_SIZE", "REPLAY_LIMIT",
    "RESPONSE_500", "ROUTE_WAIT", "TICK", "Engine", "accept_batch", "pipes_in_use",
    "set_pipe_budget",
]

# One recv per readable event.  64 KiB matches the loopback socket buffer
# granularity; the Python twin pays per call, so fewer, larger reads win.
READ_SIZE = 65536
# Bytes a direction may hold for a peer that is not draining before we stop
# reading its source (back-pressure): four reads' worth.
BUFFER_LIMIT = 4 * READ_SIZE
# How often deadlines are checked; timeouts are accurate to this.
TICK = 0.1
# The longest a connection stays parked waiting for fresher health figures: far
# more than a healthy backend takes to answer a probe, little enough that a
# hung backend's probe holds a client back only briefly.
ROUTE_WAIT = 0.25
# After fastlb's own answer: how long and how much we read before closing, so
# the client's unread request cannot turn our close into a RST (nginx's
# lingering close).
LINGER_SECONDS = 1.0
LINGER_BYTES = 1 << 20

RESPONSE_500 = b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n"

# --retry-on-empty: a connection whose backend closes or resets before its
# first answer byte is replayed on the next backend, from a copy of what the
# client sent so far, kept until that first byte and up to REPLAY_LIMIT bytes
# (a request head and a small body; a larger upload is not replayed).
REPLAY_LIMIT = 65536
RETRY_NEVER, RETRY_IDEMPOTENT, RETRY_ALWAYS = "never", "idempotent", "always"
# RFC 9110 9.2.2: the idempotent methods, as a request line starts.
IDEMPOTENT_METHODS = (b"GET ", b"HEAD ", b"OPTIONS ", b"TRACE ", b"PUT ", b"DELETE ")

WAIT, PARKED, CONNECTING, RELAYING, LINGER = "wait", "parked", "connecting", "relaying", "linger"
READ, WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE

# Most clients accept_batch takes per call.
ACCEPT_BATCH = 64


# The Python twin never splices: it holds no pipes, whatever the budget.
_pipe_budget = 1 << 30


def set_pipe_budget(pipes: int) -> None:
    """At most this many splice pipes open at once in the process's engines (others copy)."""
    global _pipe_budget
    _pipe_budget = pipes


def pipes_in_use() -> int:
    """Splice pipes the process's engines hold now (always 0 here)."""
    return 0


def accept_batch(listener: socket.socket, waker: HasFileno,
                 limit: int = ACCEPT_BATCH) -> list[tuple[int, Any]]:
    """Wait for clients on the non-blocking ``listener`` and accept up to ``limit`` of them.

    Returns ``[(client, addr), ...]``: ``client`` is a non-blocking,
    close-on-exec descriptor for ``Engine.add`` (the caller owns it until
    then), ``addr`` the peer as ``socket.accept`` gives it, exactly as the
    compiled twin returns them.  Returns an empty list as soon as
    ``waker`` is readable (it is not read) or a signal interrupted the wait.
    An accept error other than "try again" is raised as OSError, unless
    clients were accepted before it: those are returned, and the error comes
    again on the next call.
    """
    poller = select.poll()
    poller.register(listener, select.POLLIN)
    poller.register(waker, select.POLLIN)
    try:
        ready = poller.poll()
    except InterruptedError:
        return []
    if any(fd == waker.fileno() for fd, _ in ready):
        return []
    batch: list[tuple[int, Any]] = []
    while len(batch) < min(limit, ACCEPT_BATCH):
        try:
            # The descriptor itself, as accept4 gives it (close-on-exec), not a socket object.
            fd, addr = listener._accept()  # type: ignore[attr-defined]  # socket's own private call
        except (BlockingIOError, InterruptedError):
            break
        except ConnectionAbortedError:
            continue
        except OSError:
            if batch:
                break
            raise
        os.set_blocking(fd, False)
        batch.append((fd, addr))
    return batch


class _Conn:
    __slots__ = (
        "client", "server", "addr", "ticket", "state", "token", "tried", "accepted", "deadline",
        "up", "down", "up_eof", "down_eof", "up_shut", "down_shut", "bytes_up", "bytes_down",
        "status", "head", "last_up", "client_mask", "server_mask", "lingered", "answered",
        "reported", "header", "proxied", "preamble", "failed", "copy",
    )

    def __init__(self, client: socket.socket, addr: Any, ticket: Any, now: float,
                 client_timeout: float):
        self.client, self.addr, self.ticket = client, addr, ticket
        self.server: Optional[socket.socket] = None
        self.state: Optional[str] = WAIT   # None once closed
        self.token: Any = None            # the router's handle for the backend being tried
        self.tried: list[Any] = []
        self.accepted = now
        self.deadline = now + client_timeout
        self.up = bytearray()             # client -> backend, not yet written
        self.down = bytearray()           # backend -> client, not yet written
        self.up_eof = self.down_eof = False
        self.up_shut = self.down_shut = False
        self.bytes_up = self.bytes_down = 0
        self.status = -1                  # first response status, -1 until known
        self.head = b""
        self.last_up = now
        self.client_mask = self.server_mask = 0
        self.lingered = 0
        self.answered = 0                 # status of fastlb's own answer, if any
        self.reported = False             # router.finished called: never twice
        # --accept-proxy: the PROXY header's bytes taken so far (None once it
        # is complete), and the (source, destination) it carried, if any.
        self.header: Optional[bytearray] = None
        self.proxied: Optional[tuple[Optional[Endpoint], Optional[Endpoint]]] = None
        self.preamble = b""               # a PROXY header for the backend, sent before all else
        # The end of a side that failed while the other was owed bytes.
        self.failed: Optional[str] = None
        self.copy: Optional[bytearray] = None   # the client's bytes so far, for a replay


class Engine:
    """An event loop relaying many client/backend pairs (see the module comment)."""

    def __init__(self, router: Router, server_timeout: float, idle_timeout: float,
                 client_timeout: float, connect_timeout: float, splice: Optional[bool] = None,
                 accept_proxy: bool = False, retry_on_empty: str = RETRY_IDEMPOTENT):
        if retry_on_empty not in (RETRY_NEVER, RETRY_IDEMPOTENT, RETRY_ALWAYS):
            raise ValueError("retry_on_empty must be never, idempotent or always")
        self.router = router
        self.accept_proxy = accept_proxy
        self.retry_on_empty = retry_on_empty
        self.server_timeout, self.idle_timeout = server_timeout, idle_timeout
        self.client_timeout, self.connect_timeout = client_timeout, connect_timeout
        self._selector = selectors.DefaultSelector()
        self._waker = Waker()
        self._selector.register(self._waker, READ, None)
        self._incoming: collections.deque[tuple[socket.socket, Any, Any]] = collections.deque()
        self._conns: set[_Conn] = set()
        self._parked: list[_Conn] = []
        self._unpark = False
        self._stopping = False
        self._finished = False            # run() has returned
        # Connections owned = added - closed; each counter has one writer
        # thread, so the accept loop can read both without a lock.
        self.added = 0
        self.closed = 0

    # -- any thread ------------------------------------------------------------------

    def add(self, client: Union[int, socket.socket], addr: Any = None, ticket: Any = None) -> None:
        """Hand a freshly accepted client to this engine, which now owns it.

        ``client`` is a descriptor from ``accept_batch`` or a socket object.
        ``ticket`` is passed to ``router.choose`` as is (None: route at once).
        """
        if not isinstance(client, socket.socket):
            client = socket.socket(fileno=client)
        self.added += 1
        if self._finished:
            client.close()
            self.closed += 1
            return
        self._incoming.append((client, addr, ticket))
        self._waker.wake()

    @property
    def active(self) -> int:
        """Connections this engine owns (handed over and not yet closed)."""
        return self.added - self.closed

    @property
    def pending(self) -> int:
        """Connections handed over that the loop has not picked up yet."""
        return len(self._incoming)

    def wake(self) -> None:
        """Ask the engine to retry its parked connections (the router's figures changed)."""
        self._unpark = True
        self._waker.wake()

    def stop(self) -> None:
        """Return from ``run`` once every connection has finished."""
        self._stopping = True
        self._waker.wake()

    def set_timeouts(self, server_timeout: float, idle_timeout: float, client_timeout: float,
                     connect_timeout: float) -> None:
        self.server_timeout, self.idle_timeout = server_timeout, idle_timeout
        self.client_timeout, self.connect_timeout = client_timeout, connect_timeout

    # -- the loop ------------------------------------------------------------------------

    def run(self) -> None:
        next_tick = time.monotonic() + TICK
        try:
            while not (self._stopping and not self._conns and not self._incoming):
                events = self._selector.select(max(0.0, next_tick - time.monotonic()))
                for key, mask in events:
                    conn = key.data
                    if conn is None:
                        # Then the deque and flags are read: an add() whose
                        # wake wrote nothing has its connection taken below.
                        self._waker.drain()
                    elif conn.state is not None:
                        self._on_event(conn, key.fileobj is conn.client, mask)
                while self._incoming:
                    self._accept(*self._incoming.popleft())
                if self._unpark:
                    self._unpark = False
                    parked, self._parked = self._parked, []
                    for conn in parked:
                        if conn.state is PARKED:
                            self._connect_next(conn)
                now = time.monotonic()
                if now >= next_tick:
                    next_tick = now + TICK
                    for conn in [c for c in self._conns if c.deadline <= now]:
                        self._on_timeout(conn, now)
        finally:
            self._finished = True
            for conn in list(self._conns):
                self._close(conn, "client_error")
            while self._incoming:
                client, _, _ = self._incoming.popleft()
                client.close()
                self.closed += 1
            self._selector.close()
            self._waker.close()

    def _accept(self, client: socket.socket, addr: Any, ticket: Any) -> None:
        conn = _Conn(client, addr, ticket, time.monotonic(), self.client_timeout)
        if self.accept_proxy:
            conn.header = bytearray()
        if self.retry_on_empty != RETRY_NEVER:
            conn.copy = bytearray()
        self._conns.add(conn)
        try:
            client.setblocking(False)
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            self._close(conn, "client_error")
            return
        # Most clients have sent their request by the time we get here: look
        # for the first byte before asking the selector.
        self._on_first_byte(conn)

    # -- interest bookkeeping --------------------------------------------------------------

    def _watch(self, conn: _Conn, client_mask: int, server_mask: int) -> None:
        for sock, old, new, attr in ((conn.client, conn.client_mask, client_mask, "client_mask"),
                                     (conn.server, conn.server_mask, server_mask, "server_mask")):
            if sock is None or old == new:
                continue
            if not old:
                self._selector.register(sock, new, conn)
            elif not new:
                self._selector.unregister(sock)
            else:
                self._selector.modify(sock, new, conn)
            setattr(conn, attr, new)

    # -- events ----------------------------------------------------------------------------

    def _on_event(self, conn: _Conn, from_client: bool, mask: int) -> None:
        if conn.state is WAIT:
            self._on_first_byte(conn)
        elif conn.state is CONNECTING:
            self._on_connected(conn)
        elif conn.state is RELAYING:
            self._on_relay(conn, from_client, mask)
        elif conn.state is LINGER:
            self._on_linger(conn)

    def _on_first_byte(self, conn: _Conn) -> None:
        if conn.header is not None:
            self._on_proxy_header(conn)
            return
        try:
            first = conn.client.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            self._watch(conn, READ, 0)
            return
        except OSError:
            self._close(conn, "client_error")
            return
        if not first:
            self._close(conn, "client_closed")
            return
        self._watch(conn, 0, 0)
        self._connect_next(conn)

    def _on_proxy_header(self, conn: _Conn) -> None:
        """Take the client's PROXY header (--accept-proxy), never a byte beyond it.

        The bytes are peeked; only a complete header is taken off the socket,
        or, while it is incomplete, everything peeked (all of it header).  A
        client that sends something else is closed as ``bad_proxy_header``.
        """
        taken = conn.header
        assert taken is not None  # the header is still being read
        try:
            data = conn.client.recv(MAX_PROXY_HEADER - len(taken), socket.MSG_PEEK)
        except BlockingIOError:
            self._watch(conn, READ, 0)
            return
        except OSError:
            self._close(conn, "bad_proxy_header" if taken else "client_error")
            return
        if not data:
            self._close(conn, "bad_proxy_header" if taken else "client_closed")
            return
        try:
            parsed = parse_proxy_header(bytes(taken) + data)
        except ValueError:
            self._close(conn, "bad_proxy_header")
            return
        try:
            if parsed is None:
                taken += conn.client.recv(len(data))
                self._watch(conn, READ, 0)
                return
            length, source, destination = parsed
            conn.client.recv(length - len(taken))
        except OSError:
            self._close(conn, "client_error")
            return
        conn.header = None
        if source is not None:
            conn.proxied = (source, destination)
        # The payload's first byte, as for any client.
        self._on_first_byte(conn)

    def _connect_next(self, conn: _Conn) -> None:
        """Connect to the best backend not tried yet, or answer 500 when none is left."""
        while True:
            choice = self._choose(conn)
            if choice is False:
                if conn.state is not PARKED:
                    conn.state = PARKED
                    conn.deadline = time.monotonic() + ROUTE_WAIT
                self._parked.append(conn)
                return
            conn.ticket = None
            if choice is None:
                self._answer(conn, RESPONSE_500, 500)
                return
            token, family, ip, port, send_proxy = choice
            conn.token = token
            conn.tried.append(token)
            conn.preamble = self._proxy_header(conn, send_proxy) if send_proxy else b""
            try:
                server = socket.socket(family, socket.SOCK_STREAM)
            except OSError:
                # A local failure (out of descriptors): not the backend's
                # fault, so it is not marked down; the client gets the 500 as
                # when a backend fails before its first byte.
                self._report(conn, "server_error", 500)
                self._answer(conn, RESPONSE_500, 0)
                return
            server.setblocking(False)
            try:
                code = server.connect_ex((ip, port))
            except OSError as exc:  # an address the kernel rejects
                code = exc.errno or errno.EINVAL
            if code in (0, errno.EINPROGRESS):
                conn.server = server
                conn.state = CONNECTING
                conn.deadline = time.monotonic() + self.connect_timeout
                if code:
                    # Asking again costs one call and, on loopback or a LAN
                    # where the handshake is already over, saves a round
                    # through the selector.
                    code = server.connect_ex((ip, port))
                    if code in (errno.EALREADY, errno.EINPROGRESS):
                        self._watch(conn, 0, WRITE)
                        return
                    if code not in (0, errno.EISCONN):
                        self._connect_failed(conn, connect_reason(code))
                        return
                self._on_connected(conn, checked=True)
                return
            server.close()
            self._tell_connect_failed(token, connect_reason(code))
            conn.token = None

    # -- the router: its exceptions cost one connection, never the loop ----------------

    def _choose(self, conn: _Conn) -> Union[Route, None, Literal[False]]:
        """``router.choose`` for conn: a route, None (answer 500) or False (park)."""
        try:
            choice = self.router.choose(conn.tried, conn.ticket, conn.addr,
                                        conn.proxied[0] if conn.proxied else None)
            if choice is None or choice is False:
                return choice
            token, family, ip, port, send_proxy = choice   # a malformed route fails here
            return token, family, ip, port, send_proxy
        except Exception as exc:
            INTERNAL_ERRORS.record("the router's choose", exc)
            return None

    def _tell_connect_failed(self, token: Any, reason: str) -> None:
        try:
            self.router.connect_failed(token, reason)
        except Exception as exc:
            INTERNAL_ERRORS.record("the router's connect_failed", exc)

    def _on_connected(self, conn: _Conn, checked: bool = False) -> None:
        server = conn.server
        assert server is not None  # CONNECTING
        if not checked:
            code = server.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code:
                self._connect_failed(conn, connect_reason(code))
                return
        server.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.state = RELAYING
        conn.last_up = time.monotonic()
        conn.deadline = conn.last_up + self.server_timeout
        if conn.preamble:
            # Before any client byte; what the socket does not take waits in
            # the buffer, where the client's bytes queue behind it.
            try:
                sent = server.send(conn.preamble)
            except BlockingIOError:
                sent = 0
            except OSError:
                self._finish(conn, "server_error")
                return
            conn.up[:0] = conn.preamble[sent:]
        # A replay's bytes, held since the previous backend: on their way now.
        end = self._flush(conn, True) if conn.up else None
        # The client's first bytes are waiting (they were peeked): pass them on
        # now rather than after another round through the selector.
        if end is None:
            end = self._pump(conn, True)
        if end is not None:
            self._finish(conn, end)
        else:
            self._update(conn)

    def _proxy_header(self, conn: _Conn, version: int) -> bytes:
        """The PROXY header for the backend: the accepted header's addresses, else the connection's own."""
        if conn.proxied:
            return build_proxy_header(version, *conn.proxied)
        try:
            return build_proxy_header(version, conn.client.getpeername()[:2],
                                      conn.client.getsockname()[:2])
        except (OSError, ValueError):
            # Not an inet socket, or the peer just left: an address-less header.
            return build_proxy_header(version, None, None)

    def _connect_failed(self, conn: _Conn, reason: str) -> None:
        assert conn.server is not None  # CONNECTING
        self._watch(conn, conn.client_mask, 0)
        conn.server.close()
        conn.server = None
        conn.server_mask = 0
        self._tell_connect_failed(conn.token, reason)
        conn.token = None
        self._connect_next(conn)

    def _on_relay(self, conn: _Conn, from_client: bool, mask: int) -> None:
        end = None
        if mask & READ:
            end = self._pump(conn, from_client)
        if end is None and mask & WRITE:
            end = self._flush(conn, not from_client)
        if end is not None:
            self._finish(conn, end)
        else:
            self._update(conn)

    def _pump(self, conn: _Conn, from_client: bool) -> Optional[str]:
        """Read once from one side and pass it on; return an end reason or None."""
        assert conn.server is not None  # RELAYING
        src, dst = (conn.client, conn.server) if from_client else (conn.server, conn.client)
        try:
            data = src.recv(READ_SIZE)
        except BlockingIOError:
            return None
        except OSError:
            return "client_error" if from_client else "server_error"
        if not data:
            if from_client:
                conn.up_eof = True
            else:
                conn.down_eof = True
            return None
        now = time.monotonic()
        if from_client:
            conn.bytes_up += len(data)
            pending = conn.up
            if conn.copy is not None:
                if len(conn.copy) + len(data) <= REPLAY_LIMIT:
                    conn.copy += data
                else:
                    conn.copy = None      # too much to replay
        else:
            conn.bytes_down += len(data)
            pending = conn.down
            conn.copy = None              # the backend answered: nothing to replay any more
            if conn.status < 0:
                conn.head += data[: STATUS_PREFIX_LEN - len(conn.head)]
                code = parse_status_line(conn.head)
                if code != 0 or len(conn.head) >= STATUS_PREFIX_LEN:
                    conn.status = max(code, 0)
        conn.deadline = now + self.idle_timeout
        if not pending:
            try:
                sent = dst.send(data)
            except BlockingIOError:
                sent = 0
            except OSError:
                return "server_error" if from_client else "client_error"
            if from_client and sent:
                conn.last_up = now
            data = data[sent:]
        if data:
            pending += data
        return None

    def _flush(self, conn: _Conn, to_server: bool) -> Optional[str]:
        """Write what one direction holds; return an end reason or None."""
        assert conn.server is not None  # RELAYING
        pending, dst = (conn.up, conn.server) if to_server else (conn.down, conn.client)
        if not pending:
            return None
        try:
            sent = dst.send(pending)
        except BlockingIOError:
            return None
        except OSError:
            return "server_error" if to_server else "client_error"
        del pending[:sent]
        now = time.monotonic()
        if to_server:
            conn.last_up = now
        conn.deadline = now + self.idle_timeout
        return None

    def _update(self, conn: _Conn) -> None:
        """Pass on finished directions, recompute interests and the deadline; end when both are done."""
        if conn.down_eof and not conn.bytes_down and conn.failed is None \
                and self._replay(conn, "closed the connection without an answer"):
            return
        up_done = conn.up_eof and not conn.up
        down_done = conn.down_eof and not conn.down
        if up_done and down_done:
            # Both sides ended and everything was read: closing sends the FIN
            # a shutdown would have (no unread data, so no reset).
            self._finish(conn, conn.failed or "done")
            return
        if up_done and not conn.up_shut:
            assert conn.server is not None  # RELAYING
            conn.up_shut = True
            _shutdown_write(conn.server)
        if down_done and not conn.down_shut:
            conn.down_shut = True
            _shutdown_write(conn.client)
        client_mask = (READ if not conn.up_eof and len(conn.up) < BUFFER_LIMIT else 0) | \
                      (WRITE if conn.down else 0)
        server_mask = (READ if not conn.down_eof and len(conn.down) < BUFFER_LIMIT else 0) | \
                      (WRITE if conn.up else 0)
        self._watch(conn, client_mask, server_mask)
        if conn.bytes_down == 0 and not conn.down_eof:
            conn.deadline = conn.last_up + self.server_timeout

    def _on_timeout(self, conn: _Conn, now: float) -> None:
        if conn.state is WAIT:
            self._close(conn, "bad_proxy_header" if conn.header else "client_timeout")
        elif conn.state is PARKED:
            conn.ticket = None
            self._connect_next(conn)
        elif conn.state is CONNECTING:
            self._connect_failed(conn, "connect timeout (%gs)" % self.connect_timeout)
        elif conn.state is RELAYING:
            waiting = conn.bytes_down == 0 and not conn.down_eof
            self._finish(conn, "server_timeout" if waiting else "idle_timeout")
        elif conn.state is LINGER:
            self._close(conn, "")

    # -- endings ------------------------------------------------------------------------------

    def _finish(self, conn: _Conn, end: str) -> None:
        """The relay is over: report it, and answer 500 if the backend failed before its first byte."""
        if end == "server_error" and self._replay(conn, "reset the connection without an answer"):
            return
        if conn.bytes_down == 0 and end in ("server_timeout", "server_error"):
            self._drop_server(conn)
            self._report(conn, end, 500)
            self._answer(conn, RESPONSE_500, 0)
            return
        if end in ("server_error", "client_error") and conn.failed is None \
                and self._deliver_what_is_owed(conn, end):
            return
        self._close(conn, end)

    def _replay(self, conn: _Conn, reason: str) -> bool:
        """The backend ended before its first answer byte: replay the client's bytes on the next one.

        Only while the copy of the client's bytes is whole and, with
        ``retry_on_empty`` idempotent, starts with an idempotent HTTP method.
        The backend is released without a verdict (``router.replayed``): a
        dead one refuses the next connect and is marked down as usual.
        """
        copy = conn.copy
        if not copy or conn.bytes_down or conn.failed is not None:
            return False
        if self.retry_on_empty == RETRY_IDEMPOTENT and not copy.startswith(IDEMPOTENT_METHODS):
            return False
        self._drop_server(conn)
        token, conn.token = conn.token, None
        try:
            self.router.replayed(token, reason)
        except Exception as exc:
            INTERNAL_ERRORS.record("the router's replayed", exc)
        conn.up[:] = copy
        conn.up_shut = conn.down_eof = conn.down_shut = False
        self._watch(conn, 0, 0)
        self._connect_next(conn)
        return True

    def _deliver_what_is_owed(self, conn: _Conn, end: str) -> bool:
        """One side failed (a reset, say): write what was read from it to the other side before closing.

        The failed side's direction is dropped and it is no longer read; the
        surviving direction drains as usual, and ``_update`` ends the relay
        with ``end`` once it is empty.  False when nothing is owed.
        """
        server_failed = end == "server_error"
        owed = conn.down if server_failed else conn.up
        if not owed:
            return False
        conn.failed = end
        if server_failed:
            conn.up.clear()
            conn.up_eof = conn.up_shut = conn.down_eof = True
        else:
            conn.down.clear()
            conn.down_eof = conn.down_shut = conn.up_eof = True
        self._update(conn)
        return True

    def _answer(self, conn: _Conn, response: bytes, status: int) -> None:
        """Send fastlb's own answer, half-close, and linger before closing."""
        self._drop_server(conn)
        conn.answered = status
        try:
            conn.client.send(response)
            conn.client.shutdown(socket.SHUT_WR)
        except OSError:
            self._close(conn, "client_error")
            return
        conn.state = LINGER
        conn.deadline = time.monotonic() + LINGER_SECONDS
        self._watch(conn, READ, 0)

    def _on_linger(self, conn: _Conn) -> None:
        try:
            data = conn.client.recv(READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        conn.lingered += len(data)
        if not data or conn.lingered >= LINGER_BYTES:
            self._close(conn, "")

    def _drop_server(self, conn: _Conn) -> None:
        if conn.server is not None:
            self._watch(conn, conn.client_mask, 0)
            conn.server.close()
            conn.server = None

    def _report(self, conn: _Conn, end: str, status: int) -> None:
        if conn.reported:
            return
        conn.reported = True
        try:
            self.router.finished(conn.token, conn.addr, conn.bytes_up, conn.bytes_down, status, end,
                                 time.monotonic() - conn.accepted)
        except Exception as exc:
            INTERNAL_ERRORS.record("the router's finished", exc)
        conn.token = None
        conn.tried = []

    def _close(self, conn: _Conn, end: str) -> None:
        """Close both sockets once and report the connection (unless already reported)."""
        if conn.state is None:
            return
        self._watch(conn, 0, 0)
        if conn.server is not None:
            conn.server.close()
            conn.server = None
        conn.client.close()
        # Reports at most once: a connection answered after a backend failure
        # was reported when the failure happened.
        self._report(conn, end or "no_backend", conn.answered or max(conn.status, 0))
        conn.state = None
        self._conns.discard(conn)
        self.closed += 1


def _shutdown_write(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass


