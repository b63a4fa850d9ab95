"""The balancer: accept loop, worker engines, router, drain.

Who runs where:
- the thread that calls ``Balancer.run`` (the main thread under the CLI) runs
  the first probe round, then accepts connections, counts them in the pool
  (waking the health checker on every R-th) and hands each to the least busy
  worker engine; with ``--max-connections`` open it stops accepting (new
  clients wait in the listen backlog, as with HAProxy's ``maxconn``) until one
  closes, and when an engine's hand-off queue holds ``--max-queue`` the client
  gets a 503;
- ``threads`` worker threads each run one relay engine (``fastlb.bridge.Engine``;
  its design is in docs/design.md, "The relay engine"); one whose loop dies is
  replaced;
- engines reach the backend table only through ``PoolRouter`` (the
  ``fastlb.router.Router`` protocol): choosing a backend, reporting a failed
  connect or a replay, reporting a finished connection;
- the health-check thread (``fastlb.health``) runs probe rounds, and wakes the
  engines when a round has been applied (connections parked for fresh figures).
Shared state is the backend table (``BackendPool``, one lock).  A client socket
belongs to the accept loop until ``Engine.add``, then to that engine, which
always closes it.
"""

from __future__ import annotations

import errno
import logging
import os
import resource
import select
import signal
import socket
import threading
import time
from typing import Any, Callable, Literal, Optional, Sequence, Union

from fastlb import __version__, bridge
from fastlb.accesslog import AccessLog
from fastlb.admin import ADMIN_MAX_CONNECTIONS, AdminServer
from fastlb.api import Runtime
from fastlb.discovery import Discovery, is_spec
from fastlb.failsafe import INTERNAL_ERRORS
from fastlb.notify import inherited_listener, notify
from fastlb.health import HealthChecker, probe_many
from fastlb.pool import Backend, BackendPool
from fastlb.router import Route, Router
from fastlb.settings import SETTINGS, Address, Config, SettingError, default_balance, parse_resolvers
from fastlb.waker import Waker

log = logging.getLogger("fastlb")

RESPONSE_503 = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n"

# Descriptors kept for fastlb's own use (listener, wakers, epoll and event
# descriptors, logs); probes and the admin endpoint are counted on top.
RESERVED_FDS = 64
# How often a drain checks whether the last connection has finished.
DRAIN_POLL = 0.05
# At most one "at capacity" warning per this many seconds.
CAPACITY_LOG_EVERY = 10.0
# While at --max-connections, how often the accept loop looks again unwoken.
CAPACITY_RECHECK = 0.05
# Out of descriptors, or after an unexpected error, the accept loop pauses this long.
ACCEPT_PAUSE = 0.1
# A new client goes to the first engine holding fewer connections than this;
# only when every engine holds as many does the least busy one get it.  An
# engine wakes once for all its ready connections, so a few connections spread
# over -N engines cost -N wake-ups where one would do: on two shared cores,
# four bulk downloads on one engine moved 1.28x the bytes at half the CPU per
# GB of four engines with one each (docs/benchmarks.md, "Engine fill").
ENGINE_FILL = 8


def _peer(addr: Any) -> str:
    if isinstance(addr, tuple) and len(addr) >= 2:
        return ("[%s]:%d" if ":" in addr[0] else "%s:%d") % (addr[0], addr[1])
    return str(addr)


class ListenError(Exception):
    """The listening socket could not be set up; the message is meant for the user."""


def _reserved_fds(backends: int, admin: bool) -> int:
    """Descriptors not for relays: fastlb's own, a probe and a reload's probe per backend, the admin endpoint."""
    return RESERVED_FDS + 2 * backends + (ADMIN_MAX_CONNECTIONS if admin else 0)


def descriptor_budget(fd_limit: int, backends: int, admin: bool,
                      max_connections: int = 0) -> tuple[int, int]:
    """``(client connections, splice pipes)`` that fit in ``fd_limit`` open files.

    A relayed connection takes two descriptors and a splice pipe two more.
    As in HAProxy (maxpipes = maxconn / 4), the default leaves room for a pipe
    per four connections; with ``max_connections`` given, pipes get what is
    left, up to the same ratio.
    """
    room = max(0, fd_limit - _reserved_fds(backends, admin))
    if not max_connections:
        max_connections = max(1, room * 2 // 5)
    return max_connections, max(0, min(max_connections // 4, (room - 2 * max_connections) // 2))


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


class Client:
    """What fastlb knows of one client connection; the engine hands it back to the router as is."""

    __slots__ = ("peer", "round", "source")

    def __init__(self, peer: Any, asked_round: int):
        self.peer = peer              # the address the connection came from
        self.round = asked_round      # the probe round this connection asked for (0: none)
        # The client's address from an accepted PROXY header.
        self.source: Optional[tuple[str, int]] = None


class PoolRouter:
    """The ``fastlb.router.Router`` of a balancer: routes over its backend table."""

    def __init__(self, balancer: "Balancer"):
        self.balancer = balancer
        self.pool = balancer.pool

    def choose(self, tried: Sequence[Any], ticket: Any, client: Client,
               source: Optional[tuple[str, int]] = None) -> Union[Route, None, Literal[False]]:
        """A route ``(backend, family, ip, port, send_proxy)``, None when nothing is usable, False to wait.

        ``source`` is the client's ``(ip, port)`` from an accepted PROXY header, if any.
        """
        if ticket and not self.pool.round_applied(ticket):
            return False
        if source is not None:
            client.source = source
        peer = source or client.peer
        backend = self.pool.choose(tried, peer[0] if peer else None)
        if backend is None:
            return None
        address = backend.address
        return backend, address.family, address.ip or address.host, address.port, address.send_proxy

    def connect_failed(self, backend: Backend, reason: str) -> None:
        self.pool.connect_failed(backend, reason)

    def replayed(self, backend: Backend, reason: str) -> None:
        """The backend ended a connection before its first answer byte; the engine replays it elsewhere."""
        self.pool.replayed(backend)

    def finished(self, backend: Optional[Backend], client: Client, bytes_up: int, bytes_down: int,
                 status: int, end: str, duration: float) -> None:
        if client.round:
            self.pool.trigger_closed(client.round)
        if self.balancer.at_capacity:
            self.balancer.wake_accept_loop()
        if backend is not None:
            # A server timeout is counted (as a failure) but changes no state:
            # a client that stops in the middle of its request must not be
            # able to eject a healthy backend (SPEC §4).
            self.pool.release(backend, bytes_up, bytes_down, status, duration,
                              timed_out=end == "server_timeout" and not bytes_down)
        elif end == "bad_proxy_header":
            self.pool.count_bad_proxy_header()
        access_log = self.balancer.access_log
        if access_log:
            access_log.record(_peer(client.source or client.peer),
                              backend.name if backend is not None else "",
                              bytes_up, bytes_down, duration, status, end)


class Balancer:
    """One load balancer instance: ``bind()``, then ``run()`` until ``stop()``."""

    def __init__(self, config: Config):
        self.config = config
        # Backends given by name stand for what DNS says (fastlb.discovery).
        self.discovery = Discovery(parse_resolvers(config.resolvers))
        # Backends added, removed, drained or reweighed at run time (fastlb.api).
        self.runtime = Runtime(self)
        self.pool = BackendPool(self.discovery.expand(config.backends), config.requests, config.rise,
                                config.fall, config.balance or default_balance(config.check))
        # Unexpected exceptions of every thread's loop, counted and logged.
        self.internal_errors = INTERNAL_ERRORS
        self.health = HealthChecker(self.pool, config.probe_timeout, config.interval,
                                    self.internal_errors)
        self.listener: Optional[socket.socket] = None
        self.inherited = False        # the listener came from the service manager (LISTEN_FDS)
        self.port = config.port
        self._stopping = threading.Event()
        # Set once the first probe round is done: from then on clients are routed.
        self.health_ready = threading.Event()
        # Signals recorded by signal_received, acted on by the accept loop.
        self._signals: list[int] = []
        self._term_seen = False
        # What SIGHUP re-reads (the CLI sets it with --config); None: nothing.
        self.config_source: Optional[Callable[[], Config]] = None
        self._reload_lock = threading.Lock()
        # Wakes the accept loop: stop(), and Python's C-level signal handler
        # when the CLI makes it the wakeup fd (a signal may be delivered to
        # any thread, and only this one runs the Python handlers).
        self._waker = Waker()
        self._workers: list[threading.Thread] = []
        self.fd_limit = raise_fd_limit()
        self.max_connections, self.max_pipes = descriptor_budget(
            self.fd_limit, len(config.backends), bool(config.admin), config.max_connections)
        bridge.set_pipe_budget(self.max_pipes)
        self.router: Router = PoolRouter(self)
        # Read by other threads (accept loop, admin); replaced, never changed in place.
        self.engines: list[bridge.Engine] = [self._new_engine() for _ in range(config.threads)]
        # True while the accept loop waits for a connection to close
        # (--max-connections open); Router.finished then wakes it.
        self.at_capacity = False
        self._capacity_logged = 0.0
        self._accept_error_logged = float("-inf")
        self.started = time.time()
        self.access_log: Optional[AccessLog] = None
        self.admin: Optional[AdminServer] = None

    # -- setup -----------------------------------------------------------------

    def bind(self) -> None:
        """Open the listening socket (or take the service manager's); ListenError with a clear message on failure."""
        try:
            inherited = inherited_listener()
        except OSError as exc:
            raise ListenError(exc.strerror or str(exc)) from None
        if inherited is not None:
            self.listener = inherited
            self.listener.setblocking(False)
            self.inherited = True
            self.port = inherited.getsockname()[1]
            log.info("listening on the socket the service manager passed (LISTEN_FDS)")
            self._bind_the_rest()
            return
        where = "%s:%d" % (self.config.bind, self.config.port)
        try:
            infos = socket.getaddrinfo(self.config.bind, self.config.port, 0, socket.SOCK_STREAM,
                                       0, socket.AI_PASSIVE)
        except socket.gaierror as exc:
            raise ListenError("cannot listen on %s: %s" % (where, exc.strerror)) from None
        except UnicodeError:
            raise ListenError("cannot listen on %s: not a valid host name" % where) from None
        family, _, _, _, sockaddr = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if self.config.reuseport:
                # Several fastlb processes on one port; the kernel spreads the connections.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(sockaddr)
            # The kernel caps the backlog at net.core.somaxconn.
            sock.listen(max(1024, min(self.max_connections, 65535)))
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EADDRINUSE:
                raise ListenError("cannot listen on %s: port %d is already in use"
                                  % (where, self.config.port)) from None
            raise ListenError("cannot listen on %s: %s" % (where, exc.strerror or exc)) from None
        sock.setblocking(False)
        self.listener = sock
        self.port = sock.getsockname()[1]
        if self.config.reuseport and _migrate_requests() == 0:
            log.warning("--reuseport: net.ipv4.tcp_migrate_req is 0, so connections waiting in this "
                        "process's accept queue when it exits are reset; set it to 1 (Linux 5.14 or "
                        "later) for restarts that refuse nobody, or use socket activation")
        self._bind_the_rest()

    def _bind_the_rest(self) -> None:
        """The admin endpoint and the access log, once the listener is there."""
        if self.config.admin:
            try:
                self.admin = AdminServer(self.config.admin, self.stats, errors=self.internal_errors,
                                         api=self.runtime, token=self._admin_token())
            except OSError as exc:
                if self.listener is not None:
                    self.listener.close()
                self.listener = None
                raise ListenError("cannot serve the admin endpoint on %s: %s"
                                  % (self.config.admin, exc.strerror or exc)) from None
        if self.config.access_log:
            try:
                self.access_log = AccessLog(self.config.access_log)
            except OSError as exc:
                raise ListenError("cannot open the access log %s: %s"
                                  % (self.config.access_log, exc.strerror or exc)) from None

    def _admin_token(self) -> bytes:
        """The admin API's secret, from --admin-token-file (b"": the API is off)."""
        path = self.config.admin_token_file
        if not path:
            return b""
        try:
            with open(path, "rb") as handle:
                token = handle.read().strip()
        except OSError as exc:
            raise OSError(exc.errno, "cannot read the admin token file %s: %s"
                          % (path, exc.strerror)) from None
        if len(token) < 16:
            raise OSError(0, "the admin token file %s must hold a secret of at least 16 characters"
                          % path)
        return token

    def run(self) -> None:
        """Probe, start the threads, accept until ``stop()``, then drain."""
        if self.listener is None:
            self.bind()
        listener = self.listener
        assert listener is not None
        log.info(
            "fastlb %s (%s bridge) listening on %s:%d; %d worker(s); backends %s; "
            "health check every %d connection(s) and %gs; up to %d open files, "
            "so up to %d client connections and %d splice pipes",
            __version__, bridge.IMPLEMENTATION, self.config.bind, self.port,
            self.config.threads, ", ".join(b.name for b in self.pool.backends),
            self.config.requests, self.config.interval, self.fd_limit, self.max_connections,
            self.max_pipes,
        )
        needed = 2 * self.max_connections + _reserved_fds(len(self.pool.backends),
                                                            bool(self.config.admin))
        if needed > self.fd_limit:
            log.warning("--max-connections %d needs about %d descriptors but the open-file limit "
                        "is %d: at capacity accepts and backend connections will fail; raise the "
                        "limit (ulimit -n) or lower --max-connections", self.max_connections,
                        needed, self.fd_limit)
        if self.admin:
            self.admin.start()
            log.info("admin endpoint on http://%s/ (stats page, /stats.json, /metrics, /healthz)",
                     self.config.admin.rsplit(":", 1)[0] + ":%d" % self.admin.port)
        # Connections arriving now wait in the kernel's backlog until the
        # first round says which backends are up.
        pending = self.health.first_round()
        self.health_ready.set()
        notify("READY=1")
        up = sum(b.state == "up" for b in self.pool.backends)
        log.info("first health round done: %d of %d backend(s) up%s", up, len(self.pool.backends),
                 "; %d still being probed" % pending if pending else "")
        if not up and any(b.address.check.kind == "load" and b.reason.startswith("status ")
                          for b in self.pool.backends):
            # The first thing a new user meets: ordinary servers behind the classic check.
            log.warning("backends answer %s with an HTTP status but no load report; for ordinary "
                        "servers use --check http --check-path PATH, or --check tcp "
                        "(see docs/recipes.md)", self.config.check_path)
        self.health.start()
        if self.config.resolve_interval and any(map(is_spec, self.config.backends)):
            threading.Thread(target=self._rediscover, name="fastlb-discovery", daemon=True).start()
        for i, engine in enumerate(self.engines):
            self._start_worker(engine, "fastlb-worker-%d" % i)
        try:
            self._accept_loop(listener)
        finally:
            notify("STOPPING=1")
            if self.config.reuseport or self.inherited:
                # Another process may serve this port: take what already waits
                # in our queue rather than let closing reset it.
                self._accept_what_waits()
            listener.close()
            for engine in self.engines:
                engine.stop()
            self._drain()
            self.health.stop()
            if self.admin:
                self.admin.stop()
            if self.access_log:
                self.access_log.close()

    # -- workers -------------------------------------------------------------------

    def _new_engine(self) -> bridge.Engine:
        config = self.config
        engine = bridge.Engine(self.router, config.server_timeout, config.idle_timeout,
                               config.client_timeout, config.connect_timeout,
                               accept_proxy=config.accept_proxy,
                               retry_on_empty=config.retry_on_empty)
        self.pool.round_listeners.append(engine.wake)
        return engine

    def _start_worker(self, engine: bridge.Engine, name: str) -> None:
        worker = threading.Thread(target=self._work, args=(engine, name), name=name, daemon=True)
        self._workers.append(worker)
        worker.start()

    def _work(self, engine: bridge.Engine, name: str) -> None:
        """Run one engine; if its loop dies, a fresh engine takes its place in the hand-off.

        The engine's own connections were finished and reported as its run
        ended; without a replacement it would report no connections and so
        look the least busy, and every new client would be handed to a loop
        that is gone.
        """
        try:
            engine.run()
        except Exception as exc:
            self.internal_errors.record("relay engine %s, which is replaced" % name, exc)
            if self._stopping.is_set():
                return
            fresh = self._new_engine()
            self.engines = [fresh if e is engine else e for e in self.engines]
            self.pool.round_listeners = [w for w in self.pool.round_listeners if w != engine.wake]
            self._start_worker(fresh, name)

    # -- signals: the handler records, the accept loop acts (gunicorn's Arbiter) -------

    def signal_received(self, signum: int, frame: object = None) -> None:
        """The signal handler: record the signal and wake the accept loop, which acts on it.

        Only a second SIGTERM or SIGINT is acted on here, at once: the
        operator insists, even while the first one's drain is under way.
        """
        if signum in (signal.SIGTERM, signal.SIGINT):
            if self._term_seen:
                os.write(2, b"fastlb: second signal, exiting at once\n")
                os._exit(1)
            self._term_seen = True
        self._signals.append(signum)
        self._waker.wake()

    def _handle_signals(self) -> None:
        while self._signals:
            signum = self._signals.pop(0)
            if signum == signal.SIGHUP:
                self.handle_hup()
            else:
                self.handle_term(signum)

    def handle_term(self, signum: int) -> None:
        log.info("%s received: no longer accepting, draining (send it again to exit at once)",
                 signal.Signals(signum).name)
        self.stop()

    def handle_hup(self) -> None:
        """Reload in a thread of its own: re-reading the file and resolving names must not stall accepting."""
        threading.Thread(target=self._reload_from_source, name="fastlb-reload", daemon=True).start()

    def _reload_from_source(self) -> None:
        try:
            with self._reload_lock:
                if self.config_source is None:
                    log.warning("SIGHUP: no --config file to re-read; reopening the access log only")
                    if self.access_log:
                        self.access_log.reopen()
                    return
                try:
                    config = self.config_source()
                except SettingError as exc:
                    log.error("reload failed, keeping the running configuration: %s", exc)
                    return
                self.reload(config)
        except Exception as exc:   # the running configuration stays; the thread ends cleanly
            self.internal_errors.record("a reload", exc)

    def stop(self) -> None:
        """Stop accepting and drain; safe to call from a signal handler or another thread."""
        self._stopping.set()
        self._waker.wake()

    def close(self) -> None:
        """Release what ``run`` leaves open, once it has returned: the accept loop's waker.

        A caller that made ``wakeup_fd`` the signal wakeup fd resets that
        first.  The health checker closes itself as its thread ends (or here,
        if ``run`` never started it).
        """
        self.health.stop()
        self._waker.close()

    def wake_accept_loop(self) -> None:
        self._waker.wake()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    @property
    def wakeup_fd(self) -> int:
        """A non-blocking descriptor that wakes the accept loop (for ``signal.set_wakeup_fd``)."""
        return self._waker.write_fd

    # -- accept loop -----------------------------------------------------------

    def _accept_loop(self, listener: socket.socket) -> None:
        # accept_batch waits and accepts without the GIL (compiled twin) and
        # returns up to a batch at a time, so this thread takes the GIL once
        # per batch: a per-connection Python accept would contend for it with
        # every engine.
        while not self._stopping.is_set():
            try:
                if self._signals:
                    self._handle_signals()
                    continue
                room = self._room()
                if not room:
                    continue
                try:
                    batch = bridge.accept_batch(listener, self._waker, room)
                except OSError as exc:
                    if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                        self._accept_failed(exc)
                    continue
                if batch:
                    self._dispatch(batch)
                elif not self._stopping.is_set():
                    # Woken: by a signal, whose handler has run by now and
                    # recorded it, or by a connection that closed at capacity.
                    self._waker.drain()
            except Exception as exc:
                self.internal_errors.record("the accept loop", exc)
                time.sleep(ACCEPT_PAUSE)

    def _accept_what_waits(self) -> None:
        """Accept and hand out every connection already in the listen queue, without waiting."""
        listener = self.listener
        assert listener is not None
        batch: list[tuple[int, Any]] = []
        while len(batch) < self.max_connections:
            try:
                fd, addr = listener._accept()  # type: ignore[attr-defined]  # the descriptor, not a socket
            except OSError:   # nothing left waiting (EAGAIN), or nothing more to be had
                break
            os.set_blocking(fd, False)
            batch.append((fd, addr))
        if batch:
            log.info("took %d connection(s) waiting in the listen queue before closing it", len(batch))
            self._dispatch(batch)

    def _accept_failed(self, exc: OSError) -> None:
        """Out of descriptors (or kernel memory): pause instead of spinning, as HAProxy does."""
        now = time.monotonic()
        if now - self._accept_error_logged >= CAPACITY_LOG_EVERY:
            self._accept_error_logged = now
            log.error("accept failed: %s; pausing accepts for %gs at a time until descriptors "
                      "free up (raise the open-file limit or lower --max-connections)",
                      exc.strerror, ACCEPT_PAUSE)
        time.sleep(ACCEPT_PAUSE)

    def _dispatch(self, batch: list[tuple[int, Any]]) -> None:
        """Count each accepted client and hand it to an engine (``_pick_engine``), or refuse it."""
        for client, addr in batch:
            try:
                trigger, ticket = self.pool.count_accept()
                if trigger:
                    self.health.trigger()
                engine = _pick_engine(self.engines)
                if engine.pending >= self.config.max_queue:
                    self._refuse(client, addr)
                    continue
                # The engine hands the Client back to the router: with the round
                # this connection asked for, if it was the R-th.
                engine.add(client, Client(addr, ticket + 1 if trigger else 0), ticket)
            except Exception as exc:
                # The client was not handed over: it is still ours to close.
                _close_client(client)
                self.internal_errors.record("handing a client to a worker", exc)

    def _room(self) -> int:
        """How many clients may be accepted now; with none, wait (at most a moment) for one to close.

        Like HAProxy at ``maxconn``: new clients wait in the listen backlog
        instead of being accepted and refused.  Router.finished wakes this
        thread when a connection ends; the recheck after CAPACITY_RECHECK
        covers a connection reported before it closed (a 500 still lingering).
        0 after such a wait: the caller looks again.
        """
        # Set before ``inflight`` is read, so that a report after the read wakes us.
        self.at_capacity = True
        room = self.max_connections - self.inflight
        if room > 0:
            self.at_capacity = False
            return room
        now = time.monotonic()
        if now - self._capacity_logged >= CAPACITY_LOG_EVERY:
            self._capacity_logged = now
            log.warning("at capacity: %d client connections open (--max-connections); "
                        "new clients wait in the listen backlog", self.max_connections)
        # poll, not select: the waker's descriptor may be above FD_SETSIZE.
        waiter = select.poll()
        waiter.register(self._waker, select.POLLIN)
        waiter.poll(CAPACITY_RECHECK * 1000)
        self._waker.drain()
        return 0

    def _refuse(self, client: int, addr: Any) -> None:
        self.pool.count_queue_full()
        if self.access_log:
            self.access_log.record(_peer(addr), "", 0, 0, 0.0, 503, "queue_full")
        log.warning("overloaded (a worker's hand-off queue holds %d, --max-queue): "
                    "answering 503", self.config.max_queue)
        # Under overload the answer must cost nothing: no lingering, and a
        # client whose buffer is full simply misses it.
        conn = socket.socket(fileno=client)    # accept_batch gives descriptors
        try:
            conn.setblocking(False)
            conn.send(RESPONSE_503)
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        conn.close()

    # -- operations ----------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Everything the admin endpoint shows, as plain data."""
        backends = self.pool.snapshot()
        totals: dict[str, Any] = {"up": sum(b["state"] == "up" for b in backends),
                  "responses": {c: sum(b["responses"][c] for b in backends)
                                for c in ("1xx", "2xx", "3xx", "4xx", "5xx", "other")}}
        for key in ("routed", "active", "bytes_up", "bytes_down", "failures", "replays"):
            totals[key] = sum(b[key] for b in backends)
        return {
            "version": __version__, "bridge": bridge.IMPLEMENTATION,
            "listen": "%s:%d" % (self.config.bind, self.port),
            "state": "draining" if self.stopping else "running",
            "started": self.started, "uptime": int(time.time() - self.started),
            "threads": self.config.threads, "accepted": self.pool.accepted,
            "no_backend": self.pool.no_backend, "queue_full": self.pool.queue_full,
            "bad_proxy_header": self.pool.bad_proxy_header, "balance": self.pool.policy.name,
            "internal_errors": self.internal_errors.count,
            "access_log_dropped": self.access_log.dropped if self.access_log else 0,
            "access_log_errors": self.access_log.errors if self.access_log else 0,
            "accept_proxy": self.config.accept_proxy,
            "inflight": self.inflight, "queue_length": sum(e.pending for e in self.engines),
            "max_connections": self.max_connections, "at_capacity": self.at_capacity,
            "pipes": bridge.pipes_in_use(), "max_pipes": self.max_pipes,
            "backends": backends, "totals": totals,
        }

    def reload(self, config: Config) -> None:
        """Apply a re-read configuration without dropping anything in flight.

        Everything takes effect at once (timeouts for connections that start
        after the reload) but the listen port and the settings declared with
        ``restart=True`` (``fastlb.settings``), which are logged and kept.
        """
        if config.log_level != self.config.log_level:
            logging.getLogger().setLevel(config.log_level)
        for name in ["port"] + [setting.name for setting in SETTINGS if setting.restart]:
            if getattr(config, name) != getattr(self.config, name) and not (
                    name == "port" and config.port == self.port):
                log.warning("reload: %s changed; restart fastlb to apply it", name)
                setattr(config, name, getattr(self.config, name))
        self.discovery.resolvers = parse_resolvers(config.resolvers)
        with self.runtime.lock:
            # The configuration as it is written: run-time changes end here.
            self.runtime.reset()
            self.pool.reset_admin_states()
            backends = self.runtime.desired(config.backends)
            added = self._apply_backends(backends, config)
        self.health.probe_timeout, self.health.interval = config.probe_timeout, config.interval
        for engine in self.engines:
            engine.set_timeouts(config.server_timeout, config.idle_timeout, config.client_timeout,
                                config.connect_timeout)
        self.config = config
        if self.access_log:
            self.access_log.reopen()
        log.info("reload: %d backend(s), %d new", len(backends), len(added))

    def _apply_backends(self, addresses: list[Address], config: Config) -> list[Backend]:
        """Swap the backend table for ``addresses``; the new backends are probed before the swap.

        So traffic never meets a table whose only candidates are still
        unprobed; vanished backends take no new traffic and leave once their
        relays are done.  Returns the backends that are new.
        """
        known = {b.name for b in self.pool.backends if not b.removed}
        fresh = {a.name: a for a in addresses if a.name not in known}
        first_probes = probe_many(list(fresh.values()), config.probe_timeout)
        return self.pool.update(addresses, config.requests, config.rise, config.fall,
                                first_probes, config.balance or default_balance(config.check))

    def apply_runtime(self) -> list[Backend]:
        """Serve what the configuration and the run-time changes say now (``fastlb.api``); the caller holds runtime.lock."""
        return self._apply_backends(self.runtime.desired(self.config.backends), self.config)

    def probe_now(self, backends: list[Backend]) -> None:
        """Probe these backends at once and apply the outcomes (a backend out of maintenance)."""
        outcomes = probe_many([b.address for b in backends], self.config.probe_timeout)
        for backend in backends:
            if self.pool.begin_probe(backend):
                self.pool.apply_probe(backend, *outcomes[backend.address.name])

    def _rediscover(self) -> None:
        """The discovery thread: look the backend names up every --resolve-interval; apply changes."""
        while not self._stopping.wait(self.config.resolve_interval):
            try:
                with self._reload_lock, self.runtime.lock:
                    config = self.config
                    backends = self.runtime.desired(config.backends)
                    current = [b.address for b in self.pool.backends if not b.removed]
                    if _identity(backends) != _identity(current):
                        added = self._apply_backends(backends, config)
                        log.info("DNS: %d backend(s), %d new", len(backends), len(added))
            except Exception as exc:
                self.internal_errors.record("the discovery thread", exc)

    # -- drain -------------------------------------------------------------------

    @property
    def inflight(self) -> int:
        """Client connections owned by the engines."""
        return sum(engine.active for engine in self.engines)

    def _drain(self) -> None:
        deadline = time.monotonic() + self.config.drain_timeout
        if self.inflight:
            log.info("draining %d connection(s) for up to %gs", self.inflight,
                     self.config.drain_timeout)
        while self.inflight:
            if time.monotonic() >= deadline:
                log.warning("drain timeout: closing %d connection(s)", self.inflight)
                return
            time.sleep(DRAIN_POLL)
        for worker in list(self._workers):
            worker.join(1.0)
        log.info("all connections finished")


def _migrate_requests() -> int:
    """net.ipv4.tcp_migrate_req: 1 moves a closing reuseport listener's queue to another (-1: unknown)."""
    try:
        with open("/proc/sys/net/ipv4/tcp_migrate_req") as handle:
            return int(handle.read())
    except (OSError, ValueError):
        return -1


def _load(engine: bridge.Engine) -> int:
    return engine.active


def _pick_engine(engines: list[bridge.Engine]) -> bridge.Engine:
    """The engine for a new client: the first one below ENGINE_FILL connections, else the least busy."""
    for engine in engines:
        if engine.active < ENGINE_FILL:
            return engine
    return min(engines, key=_load)


def _identity(addresses: list[Address]) -> list[tuple[str, int, bool]]:
    """What makes two backend lists the same table: names, in order, with weight and backup."""
    return [(a.name, a.weight, a.backup) for a in addresses]


def _close_client(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
