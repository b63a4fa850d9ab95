"""The balancer: accept loop, bounded queue, worker threads, drain.

Who runs where:
- the thread that calls ``Balancer.run`` (the main thread under the CLI) runs
  the first probe round, then accepts connections, counts them in the pool
  (waking the health checker on every R-th) and puts them on ``queue``; when the
  queue is full the client gets a 503 and is closed;
- ``threads`` worker threads take connections from the queue, wait for the
  client's first byte, choose a backend, connect (trying the next backend when a
  connect fails) and relay through ``fastlb.bridge.relay``;
- the health-check thread (``fastlb.health``) runs probe rounds.
Shared state is the backend table (``BackendPool``, one lock) and the in-flight
count here (guarded by ``_idle``'s lock).  A client socket belongs to the
accept loop until it is queued, then to the worker that takes it, which always
closes it.
"""

from __future__ import annotations

import errno
import logging
import queue
import resource
import select
import socket
import threading
import time
from typing import Optional

from fastlb import __version__, bridge
from fastlb.accesslog import AccessLog
from fastlb.admin import AdminServer
from fastlb.health import HealthChecker, probe
from fastlb.pool import Backend, BackendPool
from fastlb.settings import Address

log = logging.getLogger("fastlb")

RESPONSE_500 = b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n"
RESPONSE_503 = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n"

# After answering a client ourselves we read what it still sends for a moment
# before closing: closing a socket with unread input sends a RST, and the RST
# can destroy our answer before the client reads it (nginx's lingering close).
LINGER_SECONDS = 1.0
LINGER_BYTES = 1 << 20

# How long a connection waits for the results of the probe round triggered
# before it was accepted: far more than a healthy backend takes to answer a
# probe, little enough that a hung backend (probed once per probe timeout) is
# only a small hiccup.
ROUND_WAIT = 0.25


def _peer(addr) -> str:
    if isinstance(addr, tuple) and len(addr) >= 2:
        return ("[%s]:%d" if ":" in addr[0] else "%s:%d") % (addr[0], addr[1])
    return str(addr)


class ListenError(Exception):
    """The listening socket could not be set up; the message is meant for the user."""


def raise_fd_limit() -> int:
    """Raise the soft limit on open files to the hard limit; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def answer_and_close(sock: socket.socket, response: bytes) -> None:
    """Send fastlb's own response, then close without letting a RST destroy it."""
    try:
        sock.settimeout(LINGER_SECONDS)
        sock.sendall(response)
        sock.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + LINGER_SECONDS
        drained = 0
        while drained < LINGER_BYTES:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            sock.settimeout(remaining)
            chunk = sock.recv(65536)
            if not chunk:
                break
            drained += len(chunk)
    except OSError:
        pass
    finally:
        sock.close()


def wait_readable(sock: socket.socket, timeout: float) -> bool:
    """True when ``sock`` has data or EOF within ``timeout`` seconds."""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    return bool(poller.poll(timeout * 1000))


def connect(address: Address, timeout: float) -> socket.socket:
    """Connect to a backend by its resolved address (no name resolution per connection)."""
    sock = socket.socket(address.family, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect((address.ip or address.host, address.port))
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except BaseException:
        sock.close()
        raise
    return sock


def connect_failure_reason(exc: OSError, timeout: float) -> str:
    if isinstance(exc, socket.timeout):
        return "connect timeout (%gs)" % timeout
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    return "connect failed: %s" % (exc.strerror or exc)


class Balancer:
    """One load balancer instance: ``bind()``, then ``run()`` until ``stop()``."""

    def __init__(self, config):
        self.config = config
        self.pool = BackendPool(config.backends, config.requests, config.rise, config.fall)
        self.health = HealthChecker(self.pool, config.probe_timeout, config.interval)
        self.queue: queue.Queue = queue.Queue(config.max_queue)
        self.listener: Optional[socket.socket] = None
        self.port = config.port
        self._stopping = threading.Event()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_w.setblocking(False)
        self._idle = threading.Condition()
        self._inflight = 0
        self._workers: list[threading.Thread] = []
        self.fd_limit = raise_fd_limit()
        self.started = time.time()
        self.access_log: Optional[AccessLog] = None
        self.admin: Optional[AdminServer] = None

    # -- setup -----------------------------------------------------------------

    def bind(self) -> None:
        """Open the listening socket; raise ListenError with a clear message on failure."""
        where = "%s:%d" % (self.config.bind, self.config.port)
        try:
            infos = socket.getaddrinfo(self.config.bind, self.config.port, 0, socket.SOCK_STREAM,
                                       0, socket.AI_PASSIVE)
        except socket.gaierror as exc:
            raise ListenError("cannot listen on %s: %s" % (where, exc.strerror)) from None
        family, _, _, _, sockaddr = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(sockaddr)
            sock.listen(min(max(self.config.max_queue, 128), socket.SOMAXCONN * 16))
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EADDRINUSE:
                raise ListenError("cannot listen on %s: port %d is already in use"
                                  % (where, self.config.port)) from None
            raise ListenError("cannot listen on %s: %s" % (where, exc.strerror or exc)) from None
        sock.setblocking(False)
        self.listener = sock
        self.port = sock.getsockname()[1]
        if self.config.admin:
            try:
                self.admin = AdminServer(self.config.admin, self.stats)
            except OSError as exc:
                sock.close()
                self.listener = None
                raise ListenError("cannot serve the admin endpoint on %s: %s"
                                  % (self.config.admin, exc.strerror or exc)) from None
        if self.config.access_log:
            try:
                self.access_log = AccessLog(self.config.access_log)
            except OSError as exc:
                raise ListenError("cannot open the access log %s: %s"
                                  % (self.config.access_log, exc.strerror or exc)) from None

    def run(self) -> None:
        """Probe, start the threads, accept until ``stop()``, then drain."""
        if self.listener is None:
            self.bind()
        log.info(
            "fastlb %s (%s bridge) listening on %s:%d; %d worker(s); backends %s; "
            "health check every %d connection(s) and %gs; up to %d open files",
            __version__, bridge.IMPLEMENTATION, self.config.bind, self.port,
            self.config.threads, ", ".join(b.name for b in self.pool.backends),
            self.config.requests, self.config.interval, self.fd_limit,
        )
        if self.admin:
            self.admin.start()
            log.info("admin endpoint on http://%s/ (stats page, /stats.json, /metrics, /healthz)",
                     self.config.admin.rsplit(":", 1)[0] + ":%d" % self.admin.port)
        # Connections arriving now wait in the kernel's backlog until the
        # first round says which backends are up.
        self.health.first_round()
        up = sum(b.state == "up" for b in self.pool.backends)
        log.info("first health round done: %d of %d backend(s) up", up, len(self.pool.backends))
        self.health.start()
        for i in range(self.config.threads):
            worker = threading.Thread(target=self._work, name="fastlb-worker-%d" % i, daemon=True)
            worker.start()
            self._workers.append(worker)
        try:
            self._accept_loop()
        finally:
            self.listener.close()
            self._drain()
            self.health.stop()
            if self.admin:
                self.admin.stop()
            if self.access_log:
                self.access_log.close()

    def stop(self) -> None:
        """Stop accepting and drain; safe to call from a signal handler or another thread."""
        self._stopping.set()
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    # -- accept loop -----------------------------------------------------------

    def _accept_loop(self) -> None:
        poller = select.poll()
        poller.register(self.listener.fileno(), select.POLLIN)
        poller.register(self._wake_r.fileno(), select.POLLIN)
        while not self._stopping.is_set():
            poller.poll()
            while not self._stopping.is_set():
                try:
                    conn, addr = self.listener.accept()
                except BlockingIOError:
                    break
                except OSError as exc:
                    if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                        # Out of descriptors: back off instead of spinning.
                        log.error("accept failed: %s", exc.strerror)
                        time.sleep(0.1)
                    break
                self._dispatch(conn, addr)

    def _dispatch(self, conn: socket.socket, addr) -> None:
        # This connection is routed after the rounds triggered before it.
        asked = self.pool.rounds_asked()
        if self.pool.count_accept():
            self.health.trigger()
        with self._idle:
            self._inflight += 1
        try:
            self.queue.put_nowait((conn, addr, time.monotonic(), asked))
        except queue.Full:
            self._finished()
            self.pool.count_queue_full()
            if self.access_log:
                self.access_log.record(_peer(addr), "", 0, 0, 0.0, 503, "queue_full")
            log.warning("queue full (%d): answering 503", self.config.max_queue)
            # Under overload the answer must cost nothing: no lingering, and a
            # client whose buffer is full simply misses it.
            try:
                conn.setblocking(False)
                conn.send(RESPONSE_503)
                conn.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            conn.close()

    # -- workers -------------------------------------------------------------

    def _work(self) -> None:
        while True:
            conn, addr, accepted, asked = self.queue.get()
            outcome = None
            try:
                outcome = self.handle(conn, asked)
            except Exception:
                log.exception("unexpected error while relaying")
            finally:
                conn.close()
                self._finished()
            if self.access_log and outcome:
                backend, up, down, status, end = outcome
                self.access_log.record(_peer(addr), backend, up, down,
                                       time.monotonic() - accepted, status, end)

    def handle(self, conn: socket.socket, asked: int = 0):
        """Serve one client connection from first byte to close.

        ``asked`` is the number of count-triggered probe rounds asked for
        before this connection was accepted; it is routed once they are done.

        Returns ``(backend name, bytes up, bytes down, status, end)`` for the access log.
        """
        cfg = self.config
        conn.setblocking(True)
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # Nothing is routed for a client that sends nothing: it costs no backend.
            if not wait_readable(conn, cfg.client_timeout):
                return "", 0, 0, 0, "client_timeout"
            if not conn.recv(1, socket.MSG_PEEK):
                return "", 0, 0, 0, "client_closed"
        except OSError:
            return "", 0, 0, 0, "client_error"

        if asked:
            # The probe triggered by the previous connection may still be on
            # its way (SPEC §2); wait for it, but never long for a hung one.
            self.pool.wait_for_round(asked, min(ROUND_WAIT, cfg.probe_timeout))
        tried: list[Backend] = []
        while True:
            backend = self.pool.choose(tried)
            if backend is None:
                answer_and_close(conn, RESPONSE_500)
                return "", 0, 0, 500, "no_backend"
            try:
                server = connect(backend.address, cfg.connect_timeout)
                break
            except OSError as exc:
                self.pool.connect_failed(backend, connect_failure_reason(exc, cfg.connect_timeout))
                tried.append(backend)

        started = time.monotonic()
        try:
            result = bridge.relay(conn, server, cfg.server_timeout, cfg.idle_timeout)
        finally:
            server.close()
        self.pool.release(backend, result.bytes_up, result.bytes_down, result.status,
                          time.monotonic() - started)
        status = result.status
        if result.bytes_down == 0 and result.end in ("server_timeout", "server_error"):
            if result.end == "server_timeout":
                self.pool.mark_down(backend, "no answer within %gs (server timeout)" % cfg.server_timeout)
            answer_and_close(conn, RESPONSE_500)
            status = 500
        return backend.name, result.bytes_up, result.bytes_down, status, result.end

    # -- operations ----------------------------------------------------------------

    def stats(self) -> dict:
        """Everything the admin endpoint shows, as plain data."""
        backends = self.pool.snapshot()
        totals = {"up": sum(b["state"] == "up" for b in backends),
                  "responses": {c: sum(b["responses"][c] for b in backends)
                                for c in ("1xx", "2xx", "3xx", "4xx", "5xx", "other")}}
        for key in ("routed", "active", "bytes_up", "bytes_down", "failures"):
            totals[key] = sum(b[key] for b in backends)
        return {
            "version": __version__, "bridge": bridge.IMPLEMENTATION,
            "listen": "%s:%d" % (self.config.bind, self.port),
            "state": "draining" if self.stopping else "running",
            "started": self.started, "uptime": int(time.time() - self.started),
            "threads": self.config.threads, "accepted": self.pool.accepted,
            "no_backend": self.pool.no_backend, "queue_full": self.pool.queue_full,
            "inflight": self.inflight, "queue_length": self.queue.qsize(),
            "backends": backends, "totals": totals,
        }

    def reload(self, config) -> None:
        """Apply a re-read configuration without dropping anything in flight.

        Backends, weights, rise/fall, -R and the timeouts take effect at once
        (timeouts for connections that start after the reload); the listen
        address, -N, the admin address and the queue size need a restart.
        """
        for name in ("port", "bind", "threads", "admin", "max_queue", "access_log"):
            if getattr(config, name) != getattr(self.config, name) and not (
                    name == "port" and config.port == self.port):
                log.warning("reload: %s changed; restart fastlb to apply it", name)
                setattr(config, name, getattr(self.config, name))
        # Probe the new backends before the swap, so traffic never meets a
        # table whose only candidates are still unprobed.
        known = {b.name for b in self.pool.backends if not b.removed}
        fresh = {a.name: a for a in config.backends if a.name not in known}
        first_probes: dict = {}

        def first_probe(address):
            started = time.monotonic()
            result, reason = probe(address, config.probe_timeout)
            first_probes[address.name] = (result, reason, time.monotonic() - started)

        probes = [threading.Thread(target=first_probe, args=(a,), daemon=True) for a in fresh.values()]
        for thread in probes:
            thread.start()
        for thread in probes:
            thread.join()
        added = self.pool.update(config.backends, config.requests, config.rise, config.fall,
                                 first_probes)
        self.health.probe_timeout, self.health.interval = config.probe_timeout, config.interval
        self.config = config
        if self.access_log:
            self.access_log.reopen()
        log.info("reload: %d backend(s), %d new", len(config.backends), len(added))

    # -- drain -------------------------------------------------------------------

    def _finished(self) -> None:
        with self._idle:
            self._inflight -= 1
            if self._inflight == 0:
                self._idle.notify_all()

    @property
    def inflight(self) -> int:
        with self._idle:
            return self._inflight

    def _drain(self) -> None:
        deadline = time.monotonic() + self.config.drain_timeout
        with self._idle:
            if self._inflight:
                log.info("draining %d connection(s) for up to %gs", self._inflight,
                         self.config.drain_timeout)
            while self._inflight:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    log.warning("drain timeout: closing %d connection(s)", self._inflight)
                    return
                self._idle.wait(remaining)
        log.info("all connections finished")
