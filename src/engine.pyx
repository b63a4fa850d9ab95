# cython: language_level=3, embedsignature=True
"""Compiled twin of the relay engine: one epoll loop, without the GIL, relaying many connections.

Built into ``fastlb._engine``; the public API and the decisions are those of
``fastlb._engine_py``, and the design both follow is in ``docs/design.md``
("The relay engine", "The GIL is taken per batch").  Local to this twin: the
``Conn`` struct and its queues (live, dead, parked, routes, reports), the
eventfd hand-off guarded by the GIL, one GIL section per loop turn
(``_settle``), splice pipes against the process's pipe budget, and the
C-level PROXY codec of ``src/proxy_header.pxd``.

This file holds the tunables and the loop (``Engine``); the rooms it includes
from ``src/engine/`` hold the rest: ``direction.pxi`` (the Direction struct,
recv/send/splice, the pipe budget), ``queue.pxi`` (ConnQueue, the one queue
type), ``conn.pxi`` (the Conn struct, its states and endings, the status and
replay copies) and ``sockaddr.pxi`` (socket addresses, ``accept_batch``).
"""

from fastlb._twin_common import connect_reason, splice_mode
from fastlb.failsafe import INTERNAL_ERRORS

from cpython.ref cimport Py_INCREF, Py_XDECREF, PyObject
from libc.errno cimport EAGAIN, EALREADY, EINPROGRESS, EINTR, EINVAL, EISCONN, ENOSYS, errno
from libc.math cimport ceil
from libc.stdint cimport uint64_t, uintptr_t
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memcpy, memmove, memset, strerror, strlen

from includes.epoll cimport (EPOLL_CLOEXEC, EPOLL_CTL_ADD, EPOLL_CTL_DEL, EPOLL_CTL_MOD, EPOLLERR,
                             EPOLLHUP, EPOLLIN, EPOLLOUT, epoll_create1, epoll_ctl, epoll_event,
                             epoll_wait)
from includes.eventfd cimport (EFD_CLOEXEC, EFD_NONBLOCK, eventfd, eventfd_read, eventfd_t,
                               eventfd_write)
from includes.netinet cimport IPPROTO_TCP, TCP_NODELAY
from includes.socket cimport (MSG_PEEK, SHUT_WR, SO_ERROR, SOCK_CLOEXEC, SOCK_NONBLOCK,
                              SOCK_STREAM, SOL_SOCKET, connect, getpeername, getsockname,
                              getsockopt, setsockopt, shutdown, sockaddr, sockaddr_storage, socket,
                              socklen_t)

from proxy_header cimport (PROXY_BUILD_MAX, PROXY_MAX_HEADER, ProxyAddresses,
                           proxy_addresses_from_sockaddrs, proxy_addresses_tuple, proxy_build,
                           proxy_parse)
from sigpipe cimport block_sigpipe, unblock_sigpipe
from twin_common cimport SpliceMode, monotonic, SPLICE_ALWAYS, SPLICE_NEVER

cdef enum:
    # One recv per readable event, into the engine's scratch buffer, sent on at
    # once (write-through).  64 KiB, as in the Python twin: request/response
    # traffic never has more ready per wake-up, and bulk transfers leave the
    # copy path for splice after SPLICE_THRESHOLD; a bigger read would only
    # let one connection hold the loop longer before the others get a turn.
    C_READ_SIZE = 65536

    # Bytes a direction may hold for a peer that is not draining before we stop
    # reading its source (back-pressure): four reads' worth, as in the Python
    # twin.  The buffer is malloc'ed only when a write falls behind, with room
    # for one more read on top, and freed as soon as it is drained, so an idle
    # or keep-alive connection holds none.
    C_BUFFER_LIMIT = 4 * C_READ_SIZE
    BUFFER_CAPACITY = C_BUFFER_LIMIT + C_READ_SIZE

    # The automatic splice policy of src/bridge.pyx: a direction moves to
    # splice(2) through its own pipe once it has carried SPLICE_THRESHOLD bytes
    # and its last read filled the scratch buffer (a bulk transfer, likely to
    # go on).  Small messages stay on the copy path, where splice measured no
    # faster and costs a pipe (two descriptors) per direction.
    SPLICE_THRESHOLD = 1048576
    BULK_READ = C_READ_SIZE

    # Events taken per epoll_wait: enough that a busy loop makes one wait per
    # few hundred events, small enough (3 KiB of stack) to keep turns short.
    MAX_EVENTS = 256

    C_LINGER_BYTES = 1 << 20

    # --retry-on-empty (see fastlb._engine_py.REPLAY_LIMIT): the most client
    # bytes kept for a replay, in a buffer that starts small and doubles.
    C_REPLAY_LIMIT = 65536
    REPLAY_FIRST_CAPACITY = 1024

    # Interest bits, as selectors.EVENT_READ / EVENT_WRITE in the Python twin.
    READ = 1
    WRITE = 2

    # Low bit of the epoll data word: the event is for the backend side.
    SIDE_SERVER = 1

# How often deadlines are checked; timeouts are accurate to this.
cdef double C_TICK = 0.1
# The longest a connection stays parked waiting for fresher health figures (see
# fastlb._engine_py.ROUTE_WAIT).
cdef double C_ROUTE_WAIT = 0.25
# After fastlb's own answer: how long we read and discard before closing, so
# the client's unread request cannot turn our close into a RST.
cdef double C_LINGER_SECONDS = 1.0

__all__ = [
    "ACCEPT_BATCH", "BUFFER_LIMIT", "LINGER_BYTES", "LINGER_SECONDS", "READ_SIZE", "REPLAY_LIMIT",
    "RESPONSE_500", "ROUTE_WAIT", "TICK", "Engine", "accept_batch", "pipes_in_use",
    "set_pipe_budget",
]

REPLAY_LIMIT = C_REPLAY_LIMIT
TICK = C_TICK
ROUTE_WAIT = C_ROUTE_WAIT
READ_SIZE = C_READ_SIZE
BUFFER_LIMIT = C_BUFFER_LIMIT
LINGER_SECONDS = C_LINGER_SECONDS
LINGER_BYTES = C_LINGER_BYTES

cdef const char* C_RESPONSE_500 = b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n"
cdef size_t C_RESPONSE_500_LEN = strlen(C_RESPONSE_500)
RESPONSE_500 = C_RESPONSE_500[:C_RESPONSE_500_LEN]

include "engine/direction.pxi"
include "engine/queue.pxi"
include "engine/conn.pxi"
include "engine/sockaddr.pxi"


cdef class Engine:
    """An event loop relaying many client/backend pairs without the GIL (see the module comment).

    ``splice`` chooses how bulk bytes move: None (automatic: a direction
    switches to splice(2) once it has carried 1 MiB in full reads), True
    (splice from the start, after the backend's status line), False (always
    copy).  The Python twin accepts and ignores it.
    """

    cdef readonly object router
    cdef readonly double server_timeout
    cdef readonly double idle_timeout
    cdef readonly double client_timeout
    cdef readonly double connect_timeout
    cdef SpliceMode splice_mode
    cdef readonly bint accept_proxy
    cdef Retry retry
    cdef int epfd
    cdef int wakefd
    # The hand-off, guarded by the GIL: (fd, addr, ticket) tuples and flags.
    cdef list incoming
    cdef bint wake_pending
    cdef bint unpark
    cdef bint stopping
    cdef bint running
    cdef bint finished
    cdef long long n_added          # written by adders, under the GIL
    cdef long long n_closed         # written by the loop (or by add once the loop is over)
    # Loop state, touched only by the thread in run().
    cdef bint retry_parked
    cdef double now
    # Every Conn is on exactly one of fresh, live and dead, and maybe on
    # parked, on routes or decided, and on reports (src/engine/queue.pxi).
    cdef ConnQueue fresh            # picked up from the hand-off, not yet set up
    cdef ConnQueue live             # set up and not closed, oldest first
    cdef ConnQueue dead             # closed, to be freed at the end of the loop turn
    cdef ConnQueue parked           # ST_PARKED, waiting for fresher figures
    cdef ConnQueue routes           # waiting for the router (ST_ROUTING)
    cdef ConnQueue decided          # routed in this GIL section, to act on without it
    cdef ConnQueue reports          # waiting for router.finished
    cdef unsigned char* scratch
    cdef bint sigpipe_blocked

    def __cinit__(self, router, double server_timeout, double idle_timeout, double client_timeout,
                  double connect_timeout, splice=None, bint accept_proxy=False,
                  retry_on_empty="idempotent"):
        cdef epoll_event ev
        cdef int err
        self.epfd = -1
        self.wakefd = -1
        queue_init(&self.fresh, LINK_LIFE)
        queue_init(&self.live, LINK_LIFE)
        queue_init(&self.dead, LINK_LIFE)
        queue_init(&self.parked, LINK_PARKED)
        queue_init(&self.routes, LINK_ROUTE)
        queue_init(&self.decided, LINK_ROUTE)
        queue_init(&self.reports, LINK_REPORT)
        self.router = router
        self.server_timeout = server_timeout
        self.idle_timeout = idle_timeout
        self.client_timeout = client_timeout
        self.connect_timeout = connect_timeout
        self.splice_mode = <SpliceMode><int>splice_mode(splice)
        self.accept_proxy = accept_proxy
        if retry_on_empty not in _RETRY_POLICIES:
            raise ValueError("retry_on_empty must be never, idempotent or always")
        self.retry = _RETRY_POLICIES[retry_on_empty]
        self.incoming = []
        self.scratch = <unsigned char*>malloc(C_READ_SIZE)
        if self.scratch == NULL:
            raise MemoryError()
        self.epfd = epoll_create1(EPOLL_CLOEXEC)
        if self.epfd < 0:
            err = errno
            raise OSError(err, strerror(err).decode())
        self.wakefd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
        if self.wakefd < 0:
            err = errno
            raise OSError(err, strerror(err).decode())
        ev.events = EPOLLIN
        ev.data.u64 = 0   # no Conn: the wake-up
        if epoll_ctl(self.epfd, EPOLL_CTL_ADD, self.wakefd, &ev) < 0:
            err = errno
            raise OSError(err, strerror(err).decode())

    def __dealloc__(self):
        # run() never ran (it closes everything itself as it returns): close what we own.
        if self.incoming:
            for fd, _, _ in self.incoming:
                _close_fd(fd)
        _close_fd(self.wakefd)
        _close_fd(self.epfd)
        free(self.scratch)

    # -- any thread (holding the GIL) ------------------------------------------

    def add(self, client, addr=None, ticket=None):
        """Hand a freshly accepted client to this engine, which now owns its descriptor.

        ``client`` is a non-blocking descriptor from ``accept_batch``, or a
        socket object (made non-blocking and detached here).  ``ticket`` is
        passed to ``router.choose`` as is (None: route at once).  The engine
        closes the descriptor.
        """
        cdef int fd
        if isinstance(client, int):
            fd = client
        else:
            client.setblocking(False)
            fd = client.detach()
        self.n_added += 1
        if self.finished:
            _close_fd(fd)
            self.n_closed += 1
            return
        self.incoming.append((fd, addr, ticket))
        self._wake()

    @property
    def retry_on_empty(self):
        """When a connection whose backend ended before answering is replayed."""
        return ("never", "idempotent", "always")[self.retry]

    @property
    def active(self):
        """Connections this engine owns (handed over and not yet closed)."""
        return self.n_added - self.n_closed

    @property
    def pending(self):
        """Connections handed over that the loop has not picked up yet."""
        return len(self.incoming)

    @property
    def added(self):
        """Connections handed over so far."""
        return self.n_added

    @property
    def closed(self):
        """Connections closed so far."""
        return self.n_closed

    def wake(self):
        """Ask the engine to retry its parked connections (the router's figures changed)."""
        self.unpark = True
        self._wake()

    def stop(self):
        """Return from ``run`` once every connection has finished."""
        self.stopping = True
        self._wake()

    def set_timeouts(self, double server_timeout, double idle_timeout, double client_timeout,
                     double connect_timeout):
        """New timeouts, for deadlines set from now on."""
        self.server_timeout = server_timeout
        self.idle_timeout = idle_timeout
        self.client_timeout = client_timeout
        self.connect_timeout = connect_timeout

    cdef void _wake(self) noexcept:
        # One eventfd write is enough however many calls come before the loop
        # reads it (it clears wake_pending, under the GIL, before taking them).
        # Written with the GIL held, so run() cannot close the eventfd under us.
        if self.wake_pending or self.wakefd < 0:
            return
        self.wake_pending = True
        eventfd_write(self.wakefd, 1)

    # -- the loop --------------------------------------------------------------

    def run(self):
        """Relay until ``stop()`` was called and every connection finished; then close it all."""
        if self.running or self.finished:
            raise RuntimeError("this engine is already running or has run")
        self.running = True
        try:
            if self.splice_mode != SPLICE_NEVER:
                self._block_sigpipe()
            with nogil:
                self._loop()
        finally:
            try:
                self._shutdown()
            finally:
                self.running = False

    cdef int _loop(self) except -1 nogil:
        cdef epoll_event events[MAX_EVENTS]
        cdef int n, i, err, timeout_ms
        cdef uint64_t data
        cdef Conn* c
        cdef bint woken, done
        cdef double next_tick
        self.now = monotonic()
        next_tick = self.now + C_TICK
        while True:
            if self.stopping and self.live.head == NULL:
                with gil:
                    done = self._finish_if_idle()
                if done:
                    return 0
            timeout_ms = <int>ceil((next_tick - self.now) * 1000.0)
            n = epoll_wait(self.epfd, events, MAX_EVENTS, timeout_ms if timeout_ms > 0 else 0)
            if n < 0:
                err = errno
                if err != EINTR:
                    with gil:
                        raise OSError(err, strerror(err).decode())
                n = 0
            self.now = monotonic()
            woken = False
            for i in range(n):
                data = events[i].data.u64
                if data == 0:
                    woken = True
                    continue
                c = <Conn*><uintptr_t>(data & ~(<uint64_t>SIDE_SERVER))
                if c.state != ST_CLOSED:
                    self._on_event(c, (data & SIDE_SERVER) == 0, events[i].events)
            self.now = monotonic()
            if self.now >= next_tick:
                next_tick = self.now + C_TICK
                self._check_deadlines()
            if woken or self.reports.head != NULL or self.routes.head != NULL:
                self._settle(woken)
            if self.dead.head != NULL:
                self._free_dead()

    cdef bint _finish_if_idle(self) noexcept:
        """With the GIL: nothing left and nothing queued, so the loop may end; later adds close."""
        if self.incoming:
            return False
        self.finished = True
        return True

    cdef int _settle(self, bint woken) except -1 nogil:
        """The end of a loop turn: everything that needs Python, in one GIL section per pass.

        Each pass takes the new connections and the flags from the hand-off,
        reports the finished connections, and asks the router about every
        connection queued for it; then, without the GIL, sets up the new
        connections and acts on the answers (park, answer 500, or connect).
        A connect that fails at once queues its connection again, so passes
        repeat until nothing waits for Python.  Reports go first so that the
        router sees a backend's finished connections before choosing.
        """
        cdef eventfd_t value
        cdef Conn* c
        if woken:
            eventfd_read(self.wakefd, &value)
        while True:
            with gil:
                if woken:
                    self._pop_incoming()
                    woken = False
                if self.retry_parked:
                    self.retry_parked = False
                    self._requeue_parked()
                if self.reports.head != NULL:
                    self._report_all()
                self._route_all()
            # Neither _accept nor _act puts a connection back on the queue it
            # came from: these loops end.
            c = queue_pop(&self.fresh)
            while c != NULL:
                self._accept(c)
                c = queue_pop(&self.fresh)
            c = queue_pop(&self.decided)
            while c != NULL:
                self._act(c)
                c = queue_pop(&self.decided)
            if self.routes.head == NULL and self.reports.head == NULL:
                return 0

    cdef int _pop_incoming(self) except -1:
        """With the GIL: take the hand-off list and flags; a Conn for each new connection."""
        cdef Conn* c
        cdef int fd
        self.wake_pending = False
        if self.unpark:
            self.unpark = False
            self.retry_parked = True
        batch = self.incoming
        if not batch:
            return 0
        self.incoming = []
        for fd, addr, ticket in batch:
            c = <Conn*>calloc(1, sizeof(Conn))
            if c == NULL:
                _close_fd(fd)
                self.n_closed += 1
                try:
                    self.router.finished(None, addr, 0, 0, 0, "client_error", 0.0)
                except Exception as exc:
                    INTERNAL_ERRORS.record("the router's finished", exc)
                continue
            c.client = fd
            c.server = -1
            c.status = -1
            c.copy_off = self.retry == RETRY_NEVER
            _init_direction(&c.up)
            _init_direction(&c.down)
            Py_INCREF(addr)
            c.addr = <PyObject*>addr
            if ticket is not None:
                Py_INCREF(ticket)
                c.ticket = <PyObject*>ticket
            queue_append(&self.fresh, c)
        return 0

    cdef void _accept(self, Conn* c) noexcept nogil:
        cdef int one = 1
        c.state = ST_WAIT
        c.accepted = self.now
        c.deadline = self.now + self.client_timeout
        queue_append(&self.live, c)
        if setsockopt(c.client, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)) < 0:
            self._close(c, END_CLIENT_ERROR)
            return
        # Most clients have sent their request by the time we get here: look
        # for the first byte before asking epoll (which then is never asked).
        self._on_first_byte(c)

    # -- interest bookkeeping ----------------------------------------------------

    cdef void _watch(self, Conn* c, int client_mask, int server_mask) noexcept nogil:
        if c.client >= 0 and c.client_mask != client_mask:
            self._interest(c.client, c.client_mask, client_mask, <uint64_t><uintptr_t>c)
            c.client_mask = client_mask
        if c.server >= 0 and c.server_mask != server_mask:
            self._interest(c.server, c.server_mask, server_mask,
                           <uint64_t><uintptr_t>c | SIDE_SERVER)
            c.server_mask = server_mask

    cdef void _forget_server(self, Conn* c) noexcept nogil:
        """Take the backend descriptor out of epoll and close it.

        Closing alone removes a descriptor from epoll only when no other
        reference to the socket exists; a fork elsewhere in the process holds
        one until its exec, and an event for it would then carry the address
        of a freed Conn.  So every registered descriptor is deleted first.
        """
        self._watch(c, c.client_mask, 0)
        _close_fd(c.server)
        c.server = -1

    cdef void _interest(self, int fd, int old, int new, uint64_t data) noexcept nogil:
        # A failure (ENOMEM, the max_user_watches limit) leaves the side
        # without events; the connection's deadline still ends it.
        cdef epoll_event ev
        ev.events = (EPOLLIN if new & READ else 0) | (EPOLLOUT if new & WRITE else 0)
        ev.data.u64 = data
        if not old:
            epoll_ctl(self.epfd, EPOLL_CTL_ADD, fd, &ev)
        elif not new:
            epoll_ctl(self.epfd, EPOLL_CTL_DEL, fd, &ev)
        else:
            epoll_ctl(self.epfd, EPOLL_CTL_MOD, fd, &ev)

    # -- events ----------------------------------------------------------------

    cdef int _on_event(self, Conn* c, bint from_client, unsigned int events) except -1 nogil:
        cdef int mask
        if c.state == ST_WAIT:
            return self._on_first_byte(c)
        if c.state == ST_CONNECTING:
            if not from_client:
                return self._on_connected(c, events)
        elif c.state == ST_RELAYING:
            # As selectors does: an error or hang-up counts as both readable
            # and writable, limited to what the side is registered for.
            mask = (READ if events & ~EPOLLOUT else 0) | (WRITE if events & ~EPOLLIN else 0)
            mask &= c.client_mask if from_client else c.server_mask
            if mask:
                self._on_relay(c, from_client, mask)
        elif c.state == ST_LINGER:
            self._on_linger(c)
        return 0

    cdef int _on_first_byte(self, Conn* c) except -1 nogil:
        """Route c once its client has sent a byte (peeked: it is relayed as it is)."""
        cdef unsigned char byte
        cdef int err = 0
        cdef Py_ssize_t n
        if self.accept_proxy and not c.header_done:
            return self._on_proxy_header(c)
        n = _recv(c.client, &byte, 1, MSG_PEEK, &err)
        if n < 0:
            if err != EAGAIN:
                self._close(c, END_CLIENT_ERROR)
            else:
                self._watch(c, READ, 0)
            return 0
        if n == 0:
            self._close(c, END_CLIENT_CLOSED)
            return 0
        self._watch(c, 0, 0)
        return self._connect_next(c, FAILED_NOTHING, False)

    cdef int _on_proxy_header(self, Conn* c) except -1 nogil:
        """Take the client's PROXY header (--accept-proxy), never a byte beyond it.

        The bytes are peeked behind those taken so far; only a complete header
        is taken off the socket, or, while it is incomplete, everything peeked
        (all of it header).  A client that sends something else is closed as
        bad_proxy_header.
        """
        cdef int err = 0, reason = 0
        cdef Py_ssize_t n, length
        if c.header_len:
            memcpy(self.scratch, c.header, c.header_len)
        n = _recv(c.client, self.scratch + c.header_len, PROXY_MAX_HEADER - c.header_len, MSG_PEEK,
                  &err)
        if n < 0:
            if err == EAGAIN:
                self._watch(c, READ, 0)
            else:
                self._close(c, END_BAD_PROXY_HEADER if c.header_len else END_CLIENT_ERROR)
            return 0
        if n == 0:
            self._close(c, END_BAD_PROXY_HEADER if c.header_len else END_CLIENT_CLOSED)
            return 0
        length = proxy_parse(self.scratch, c.header_len + n, &c.proxied, &reason)
        if length < 0:
            self._close(c, END_BAD_PROXY_HEADER)
            return 0
        if length == 0:
            if c.header == NULL:
                c.header = <unsigned char*>malloc(PROXY_MAX_HEADER)
                if c.header == NULL:
                    self._close(c, END_CLIENT_ERROR)
                    return 0
            memcpy(c.header + c.header_len, self.scratch + c.header_len, n)
            c.header_len += n
            if _recv(c.client, self.scratch, n, 0, &err) != n:
                self._close(c, END_CLIENT_ERROR)
                return 0
            self._watch(c, READ, 0)
            return 0
        n = length - c.header_len
        if _recv(c.client, self.scratch, n, 0, &err) != n:
            self._close(c, END_CLIENT_ERROR)
            return 0
        free(c.header)
        c.header = NULL
        c.header_len = 0
        c.header_done = True
        # The payload's first byte, as for any client.
        return self._on_first_byte(c)

    cdef int _connect_next(self, Conn* c, int failed, bint drop_ticket) except -1 nogil:
        """Queue c for the router: the best backend not tried yet, or 500 when none is left.

        The router is asked at the end of this loop turn (``_settle``), in one
        GIL section with every other connection waiting for it.  ``failed``
        reports the previous attempt first: an errno, or FAILED_TIMEOUT.
        ``drop_ticket``: stop waiting for fresher figures.
        """
        c.state = ST_ROUTING
        c.route_failed = failed
        c.route_drop_ticket = drop_ticket
        queue_append(&self.routes, c)
        return 0

    cdef int _route_all(self) except -1:
        """With the GIL: route every queued connection through the router onto the decided list."""
        cdef Conn* c = queue_pop(&self.routes)
        while c != NULL:
            c.route = self._route(c, c.route_failed, c.route_drop_ticket)
            queue_append(&self.decided, c)
            c = queue_pop(&self.routes)
        return 0

    cdef int _act(self, Conn* c) except -1 nogil:
        """Carry out the router's answer for c: park it, answer 500, or start connecting."""
        cdef int fd, err = 0
        if c.route == ROUTE_PARK:
            if c.park_deadline == 0:
                c.park_deadline = self.now + C_ROUTE_WAIT
            c.state = ST_PARKED
            c.deadline = c.park_deadline
            self._park(c)
            return 0
        if c.route == ROUTE_NONE:
            self._answer(c, 500)
            return 0
        fd = socket(c.peer.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0)
        if fd < 0:
            # A local failure (out of descriptors): not the backend's fault,
            # so it is not marked down; the client gets the 500 as when a
            # backend fails before its first byte.
            self._queue_report(c, END_SERVER_ERROR, 500)
            self._answer(c, 0)
            return 0
        if connect(fd, <sockaddr*>&c.peer, c.peer_len) < 0:
            err = errno
        if err != 0 and err != EINPROGRESS and err != EINTR:
            _close_fd(fd)
            return self._connect_next(c, err, False)
        # EINTR: the connect goes on in the background, like EINPROGRESS.
        c.server = fd
        c.server_mask = 0
        c.state = ST_CONNECTING
        c.deadline = self.now + self.connect_timeout
        if err != 0:
            # Asking again costs one call and, on loopback or a LAN where the
            # handshake is already over, saves a round through epoll.
            err = 0
            if connect(fd, <sockaddr*>&c.peer, c.peer_len) < 0:
                err = errno
            if err == EALREADY or err == EINPROGRESS or err == EINTR:
                self._watch(c, 0, WRITE)
                return 0
            if err != 0 and err != EISCONN:
                return self._connect_failed(c, err)
        return self._on_connected(c, EPOLLOUT)

    cdef Route _route(self, Conn* c, int failed, bint drop_ticket) except *:
        """With the GIL: report a failed connect, then ask the router; fill c.peer on ROUTE_OK.

        A router that raises costs this connection its route (it gets the
        500), never the loop.
        """
        try:
            return self._ask_router(c, failed, drop_ticket)
        except Exception as exc:
            INTERNAL_ERRORS.record("the router's choose", exc)
            return ROUTE_NONE

    cdef Route _ask_router(self, Conn* c, int failed, bint drop_ticket) except *:
        reason = None
        if failed == FAILED_TIMEOUT:
            reason = "connect timeout (%gs)" % self.connect_timeout
        elif failed != FAILED_NOTHING:
            reason = connect_reason(failed)
        if drop_ticket:
            _clear(&c.ticket)
        if c.route_replay != REPLAY_NONE:
            self._report_replayed(c, _REPLAY_REASONS[c.route_replay])
            c.route_replay = REPLAY_NONE
        while True:
            if reason is not None:
                self._report_connect_failed(c, reason)
            if c.tried == NULL:
                tried = []
                Py_INCREF(tried)
                c.tried = <PyObject*>tried
            if c.source == NULL and c.proxied.family != 0:
                source = proxy_addresses_tuple(&c.proxied)[0]
                Py_INCREF(source)
                c.source = <PyObject*>source
            choice = self.router.choose(<object>c.tried, _obj(c.ticket), _obj(c.addr),
                                        _obj(c.source))
            if choice is False:
                return ROUTE_PARK
            _clear(&c.ticket)
            if choice is None:
                return ROUTE_NONE
            token, family, ip, port, send_proxy = choice
            Py_INCREF(token)
            c.token = <PyObject*>token
            (<list>c.tried).append(token)
            c.send_proxy = send_proxy
            reason = _fill_sockaddr(&c.peer, &c.peer_len, family, ip, port)
            if reason is None:
                return ROUTE_OK

    cdef int _report_replayed(self, Conn* c, reason) except -1:
        """With the GIL: router.replayed for the current backend, which c then forgets."""
        cdef PyObject* token = c.token
        c.token = NULL
        try:
            self.router.replayed(_obj(token), reason)
        except Exception as exc:
            INTERNAL_ERRORS.record("the router's replayed", exc)
        finally:
            Py_XDECREF(token)
        return 0

    cdef int _report_connect_failed(self, Conn* c, reason) except -1:
        """With the GIL: router.connect_failed for the current backend, which c then forgets."""
        cdef PyObject* token = c.token
        c.token = NULL
        try:
            self.router.connect_failed(_obj(token), reason)
        except Exception as exc:
            INTERNAL_ERRORS.record("the router's connect_failed", exc)
        finally:
            Py_XDECREF(token)
        return 0

    cdef void _park(self, Conn* c) noexcept nogil:
        if not queue_holds(&self.parked, c):
            queue_append(&self.parked, c)

    cdef int _requeue_parked(self) except -1 nogil:
        """Queue every parked connection for the router again (its figures changed)."""
        cdef Conn* c = queue_pop(&self.parked)
        while c != NULL:
            if c.state == ST_PARKED:
                self._connect_next(c, FAILED_NOTHING, False)
            c = queue_pop(&self.parked)
        return 0

    cdef int _on_connected(self, Conn* c, unsigned int events) except -1 nogil:
        cdef int code = 0, one = 1
        cdef socklen_t length = sizeof(code)
        cdef End end
        # Writable without an error or hang-up: connected.  Otherwise the
        # socket's pending error says why not.
        if events & (EPOLLERR | EPOLLHUP) or not events & EPOLLOUT:
            if getsockopt(c.server, SOL_SOCKET, SO_ERROR, &code, &length) < 0:
                code = errno
            if code:
                return self._connect_failed(c, code)
        setsockopt(c.server, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one))
        c.state = ST_RELAYING
        c.last_up = self.now
        c.deadline = self.now + self.server_timeout
        end = self._send_proxy_header(c) if c.send_proxy else END_NONE
        # A replay's bytes, held since the previous backend: on their way now.
        if end == END_NONE and _held(&c.up):
            end = self._flush(c, True)
        # The client's first bytes are waiting (they were peeked): pass them on
        # now rather than after another round through epoll.
        if end == END_NONE:
            end = self._pump(c, True)
        if end != END_NONE:
            self._finish(c, end)
        else:
            self._update(c)
        return 0

    cdef End _send_proxy_header(self, Conn* c) noexcept nogil:
        """Send the backend its PROXY header: accepted addresses if any, else the connection's own.

        Before any client byte; what the socket does not take waits in the
        up direction's buffer, where the client's bytes queue behind it.
        """
        cdef ProxyAddresses a
        cdef sockaddr_storage peer, local
        cdef socklen_t peer_len = sizeof(peer), local_len = sizeof(local)
        cdef unsigned char header[PROXY_BUILD_MAX]
        cdef Py_ssize_t n, sent, held
        cdef int err = 0
        cdef Direction* d = &c.up
        if c.proxied.family != 0:
            a = c.proxied
        elif (getpeername(c.client, <sockaddr*>&peer, &peer_len) < 0
              or getsockname(c.client, <sockaddr*>&local, &local_len) < 0
              or not proxy_addresses_from_sockaddrs(&a, &peer, &local)):
            # Not an inet socket, or the peer just left: an address-less header.
            memset(&a, 0, sizeof(a))
        n = proxy_build(header, c.send_proxy, &a)
        sent = _send(c.server, header, n, &err)
        if sent < 0:
            if err != EAGAIN:
                return END_SERVER_ERROR
            sent = 0
        if sent < n:
            # In front of anything held (a replay's bytes, at most C_REPLAY_LIMIT).
            held = d.end - d.start
            if d.buf == NULL:
                d.buf = <unsigned char*>malloc(BUFFER_CAPACITY)
                if d.buf == NULL:
                    return END_SERVER_ERROR
            memmove(d.buf + (n - sent), d.buf + d.start, held)
            memcpy(d.buf, header + sent, n - sent)
            d.start = 0
            d.end = held + n - sent
        return END_NONE

    cdef int _connect_failed(self, Conn* c, int failed) except -1 nogil:
        self._forget_server(c)
        return self._connect_next(c, failed, False)

    cdef void _on_relay(self, Conn* c, bint from_client, int mask) noexcept nogil:
        cdef End end = END_NONE
        if mask & READ:
            end = self._pump(c, from_client)
        if end == END_NONE and mask & WRITE:
            end = self._flush(c, not from_client)
        if end != END_NONE:
            self._finish(c, end)
        else:
            self._update(c)

    cdef End _pump(self, Conn* c, bint from_client) noexcept nogil:
        """Read once from one side and pass it on; an end reason or END_NONE."""
        cdef Direction* d = &c.up if from_client else &c.down
        if not _has_room(d) or d.eof:
            return END_NONE   # a stale event: the side is no longer read
        if (d.pipe_size == 0 and not d.copy_only and self.splice_mode != SPLICE_NEVER
                and _held(d) == 0
                # The status line is read from copied bytes, and a replay copy
                # from the client's: neither while bytes move by splice.
                and (c.copy_off if from_client else c.status >= 0)
                and (self.splice_mode == SPLICE_ALWAYS
                     or d.nbytes >= SPLICE_THRESHOLD and d.last_read >= BULK_READ)):
            _start_splice(d)
        if d.pipe_size:
            return self._pump_pipe(c, d, from_client)
        return self._pump_copy(c, d, from_client)

    cdef End _pump_copy(self, Conn* c, Direction* d, bint from_client) noexcept nogil:
        cdef int src = c.client if from_client else c.server
        cdef int dst = c.server if from_client else c.client
        cdef Py_ssize_t held = d.end - d.start, n, sent
        cdef unsigned char* into
        cdef int err = 0
        if held == 0:
            into = self.scratch
        else:
            if BUFFER_CAPACITY - d.end < C_READ_SIZE:
                memmove(d.buf, d.buf + d.start, held)
                d.start = 0
                d.end = held
            into = d.buf + d.end
        n = _recv(src, into, C_READ_SIZE, 0, &err)
        if n < 0:
            if err == EAGAIN:
                return END_NONE
            return END_CLIENT_ERROR if from_client else END_SERVER_ERROR
        if n == 0:
            d.eof = True
            return END_NONE
        d.nbytes += n
        d.last_read = n
        if not c.copy_off:
            if from_client:
                _keep_copy(c, into, n)
            else:
                _drop_copy(c)   # the backend answered: nothing to replay any more
        if not from_client and c.status < 0:
            _capture_status(c, into, n)
        c.deadline = self.now + self.idle_timeout
        if held:
            d.end += n
            return END_NONE
        sent = _send(dst, into, n, &err)
        if sent < 0:
            if err != EAGAIN:
                return END_SERVER_ERROR if from_client else END_CLIENT_ERROR
            sent = 0
        if from_client and sent:
            c.last_up = self.now
        if sent < n:
            d.buf = <unsigned char*>malloc(BUFFER_CAPACITY)
            if d.buf == NULL:
                return END_SERVER_ERROR if from_client else END_CLIENT_ERROR
            memcpy(d.buf, into + sent, n - sent)
            d.start = 0
            d.end = n - sent
        return END_NONE

    cdef End _pump_pipe(self, Conn* c, Direction* d, bint from_client) noexcept nogil:
        cdef int src = c.client if from_client else c.server
        cdef Py_ssize_t n
        cdef bint was_empty
        cdef int err = 0
        n = _splice(src, d.pipe_w, d.pipe_size - d.in_pipe, &err)
        if n < 0:
            if err == EAGAIN:
                return END_NONE
            if (err == EINVAL or err == ENOSYS) and d.in_pipe == 0:
                # This kind of socket cannot splice; nothing is in the pipe.
                _stop_splice(d)
                d.copy_only = True
                return self._pump_copy(c, d, from_client)
            return END_CLIENT_ERROR if from_client else END_SERVER_ERROR
        if n == 0:
            d.eof = True
            return END_NONE
        d.nbytes += n
        d.last_read = n
        if not from_client and not c.copy_off:
            _drop_copy(c)
        c.deadline = self.now + self.idle_timeout
        was_empty = d.in_pipe == 0
        d.in_pipe += n
        if was_empty:
            return self._drain_pipe(c, d, from_client)
        return END_NONE

    cdef End _drain_pipe(self, Conn* c, Direction* d, bint to_server) noexcept nogil:
        cdef int dst = c.server if to_server else c.client
        cdef int err = 0
        cdef Py_ssize_t k = _splice(d.pipe_r, dst, d.in_pipe, &err)
        if k < 0:
            if err == EAGAIN:
                return END_NONE
            return END_SERVER_ERROR if to_server else END_CLIENT_ERROR
        d.in_pipe -= k
        if to_server and k:
            c.last_up = self.now
        return END_NONE

    cdef End _flush(self, Conn* c, bint to_server) noexcept nogil:
        """Write what one direction holds; an end reason or END_NONE."""
        cdef Direction* d = &c.up if to_server else &c.down
        cdef int dst = c.server if to_server else c.client
        cdef Py_ssize_t k
        cdef int err = 0
        if _held(d) == 0:
            return END_NONE
        if d.pipe_size:
            k = _splice(d.pipe_r, dst, d.in_pipe, &err)
        else:
            k = _send(dst, d.buf + d.start, d.end - d.start, &err)
        if k < 0:
            if err == EAGAIN:
                return END_NONE
            return END_SERVER_ERROR if to_server else END_CLIENT_ERROR
        if d.pipe_size:
            d.in_pipe -= k
        else:
            d.start += k
            if d.start == d.end:
                free(d.buf)
                d.buf = NULL
                d.start = d.end = 0
        if to_server:
            c.last_up = self.now
        c.deadline = self.now + self.idle_timeout
        return END_NONE

    cdef void _update(self, Conn* c) noexcept nogil:
        """Pass on finished directions, recompute interests and deadline; end when both are done."""
        cdef int client_mask, server_mask
        cdef bint up_done, down_done
        if (c.down.eof and c.down.nbytes == 0 and c.failed == END_NONE
                and self._replay(c, REPLAY_CLOSED)):
            return
        up_done = c.up.eof and _held(&c.up) == 0
        down_done = c.down.eof and _held(&c.down) == 0
        if up_done and down_done:
            # Both sides ended and everything was read: closing sends the FIN
            # a shutdown would have (no unread data, so no reset).
            self._finish(c, c.failed if c.failed != END_NONE else END_DONE)
            return
        if up_done and not c.up.shut:
            c.up.shut = True
            shutdown(c.server, SHUT_WR)
        if down_done and not c.down.shut:
            c.down.shut = True
            shutdown(c.client, SHUT_WR)
        client_mask = ((READ if not c.up.eof and _has_room(&c.up) else 0)
                       | (WRITE if _held(&c.down) else 0))
        server_mask = ((READ if not c.down.eof and _has_room(&c.down) else 0)
                       | (WRITE if _held(&c.up) else 0))
        self._watch(c, client_mask, server_mask)
        if c.down.nbytes == 0 and not c.down.eof:
            c.deadline = c.last_up + self.server_timeout

    cdef void _on_linger(self, Conn* c) noexcept nogil:
        cdef int err = 0
        cdef Py_ssize_t n = _recv(c.client, self.scratch, C_READ_SIZE, 0, &err)
        if n < 0:
            if err == EAGAIN:
                return
            n = 0
        c.lingered += n
        if n == 0 or c.lingered >= C_LINGER_BYTES:
            self._close(c, END_NONE)

    # -- timeouts --------------------------------------------------------------

    cdef int _check_deadlines(self) except -1 nogil:
        cdef Conn* c = self.live.head
        cdef Conn* nxt
        cdef double now = self.now
        while c != NULL:
            nxt = queue_next(&self.live, c)   # a handler may close c, never another connection
            if c.deadline <= now:
                self._on_timeout(c)
            c = nxt
        return 0

    cdef int _on_timeout(self, Conn* c) except -1 nogil:
        if c.state == ST_WAIT:
            self._close(c, END_BAD_PROXY_HEADER if c.header_len else END_CLIENT_TIMEOUT)
        elif c.state == ST_PARKED:
            queue_remove(&self.parked, c)
            return self._connect_next(c, FAILED_NOTHING, True)
        elif c.state == ST_CONNECTING:
            return self._connect_failed(c, FAILED_TIMEOUT)
        elif c.state == ST_RELAYING:
            if c.down.nbytes == 0 and not c.down.eof:
                self._finish(c, END_SERVER_TIMEOUT)
            else:
                self._finish(c, END_IDLE_TIMEOUT)
        elif c.state == ST_LINGER:
            self._close(c, END_NONE)
        return 0

    # -- endings ---------------------------------------------------------------

    cdef void _finish(self, Conn* c, End end) noexcept nogil:
        """The relay is over: report it; answer 500 if the backend failed before its first byte."""
        if end == END_SERVER_ERROR and self._replay(c, REPLAY_RESET):
            return
        if c.down.nbytes == 0 and (end == END_SERVER_TIMEOUT or end == END_SERVER_ERROR):
            self._drop_server(c)
            self._queue_report(c, end, 500)
            self._answer(c, 0)
            return
        if ((end == END_SERVER_ERROR or end == END_CLIENT_ERROR) and c.failed == END_NONE
                and self._deliver_what_is_owed(c, end)):
            return
        self._close(c, end)

    cdef bint _replay(self, Conn* c, int why) noexcept nogil:
        """The backend ended before its first answer byte: replay the client's bytes on another.

        As in the Python twin: only while the copy is whole and, with
        --retry-on-empty idempotent, starts with an idempotent method.  The
        backend is released without a verdict (router.replayed, told when the
        router is next asked, with this connection's route).
        """
        cdef Direction* d = &c.up
        cdef unsigned char* buf
        if (c.copy_off or c.copy_len == 0 or c.down.nbytes != 0 or c.failed != END_NONE
                or (self.retry == RETRY_IDEMPOTENT and not _idempotent(c.copy, c.copy_len))):
            return False
        buf = <unsigned char*>malloc(BUFFER_CAPACITY)
        if buf == NULL:
            return False
        self._watch(c, 0, 0)
        self._forget_server(c)
        _release_direction(d)
        d.buf = buf
        memcpy(d.buf, c.copy, c.copy_len)
        d.start = 0
        d.end = c.copy_len
        d.shut = False
        c.down.eof = False
        c.down.shut = False
        c.route_replay = why
        self._connect_next(c, FAILED_NOTHING, False)
        return True

    cdef bint _deliver_what_is_owed(self, Conn* c, End end) noexcept nogil:
        """One side failed (a reset, say): write what was read from it to the other, then close.

        As in the Python twin: the failed side's direction is dropped and no
        longer read; the surviving one drains, and _update ends the relay with
        ``end`` once it is empty.  False when nothing is owed.
        """
        cdef bint server_failed = end == END_SERVER_ERROR
        cdef Direction* owed = &c.down if server_failed else &c.up
        cdef Direction* dropped = &c.up if server_failed else &c.down
        if _held(owed) == 0:
            return False
        c.failed = end
        _release_direction(dropped)
        dropped.eof = True
        dropped.shut = True
        owed.eof = True
        self._update(c)
        return True

    cdef void _answer(self, Conn* c, int status) noexcept nogil:
        """Send fastlb's own answer, half-close, and linger before closing.

        ``status`` is 0 when the connection was already reported.
        """
        cdef int err = 0
        self._drop_server(c)
        c.answered = status
        if (_send(c.client, C_RESPONSE_500, C_RESPONSE_500_LEN, &err) < 0
                or shutdown(c.client, SHUT_WR) < 0):
            # Reported already (status 0): just close.  The Python twin reports
            # it a second time here, as client_error.
            self._close(c, END_CLIENT_ERROR if status else END_NONE)
            return
        c.state = ST_LINGER
        c.deadline = self.now + C_LINGER_SECONDS
        self._watch(c, READ, 0)

    cdef void _drop_server(self, Conn* c) noexcept nogil:
        if c.server >= 0:
            self._forget_server(c)

    cdef void _queue_report(self, Conn* c, End end, int status) noexcept nogil:
        """Report c to router.finished at the end of this loop iteration (once per connection)."""
        if c.reported:
            return
        c.reported = True
        c.report_end = end
        c.report_status = status
        c.report_duration = monotonic() - c.accepted
        queue_append(&self.reports, c)

    cdef void _close(self, Conn* c, End end) noexcept nogil:
        """Close both sockets once and queue the report (unless already reported)."""
        if c.state == ST_CLOSED:
            return
        self._watch(c, 0, 0)   # see _forget_server
        self._forget_server(c)
        _close_fd(c.client)
        c.client = -1
        _release_direction(&c.up)
        _release_direction(&c.down)
        free(c.header)
        c.header = NULL
        c.header_len = 0
        _drop_copy(c)
        if end != END_NONE:
            self._queue_report(c, end,
                               c.answered if c.answered else (c.status if c.status > 0 else 0))
        elif c.answered:
            self._queue_report(c, END_NO_BACKEND, c.answered)
        # Off parked, and off routes or decided (only when run() ends early).
        queue_remove(&self.parked, c)
        queue_leave(c, LINK_ROUTE)
        c.state = ST_CLOSED
        queue_remove(&self.live, c)
        queue_append(&self.dead, c)
        self.n_closed += 1

    cdef int _report_all(self) except -1:
        """With the GIL: router.finished for every queued connection, then drop its references."""
        cdef Conn* c = queue_pop(&self.reports)
        error = None
        while c != NULL:
            try:
                self.router.finished(_obj(c.token), _obj(c.addr), c.up.nbytes, c.down.nbytes,
                                     c.report_status, _END_NAMES[c.report_end], c.report_duration)
            except Exception as exc:
                INTERNAL_ERRORS.record("the router's finished", exc)
            except BaseException as exc:   # KeyboardInterrupt and the like end the loop
                if error is None:
                    error = exc
            _drop_refs(c)
            c = queue_pop(&self.reports)
        if error is not None:
            raise error
        return 0

    cdef void _free_dead(self) noexcept nogil:
        cdef Conn* c = queue_pop(&self.dead)
        while c != NULL:
            if _holds_refs(c):
                with gil:   # never reported: cannot happen, but never leak either
                    _drop_refs(c)
            free(c)
            c = queue_pop(&self.dead)

    cdef void _shutdown(self) except *:
        """With the GIL, as run() returns: close every connection and descriptor left, reporting."""
        cdef Conn* c
        self.now = monotonic()
        # Closing takes a connection off live, and off parked, routes or decided.
        while self.live.head != NULL:
            self._close(self.live.head, END_CLIENT_ERROR)
        # Picked up from the hand-off but not set up (the loop raised meanwhile).
        c = queue_pop(&self.fresh)
        while c != NULL:
            c.accepted = self.now
            c.state = ST_WAIT
            queue_append(&self.live, c)
            self._close(c, END_CLIENT_ERROR)
            c = queue_pop(&self.fresh)
        queued, self.incoming = self.incoming, []
        self.finished = True
        try:
            self._report_all()
        finally:
            self._free_dead()
            for fd, _, _ in queued:
                _close_fd(fd)
                self.n_closed += 1
            try:
                for _, addr, _ in queued:
                    self.router.finished(None, addr, 0, 0, 0, "client_error", 0.0)
            finally:
                _close_fd(self.wakefd)
                self.wakefd = -1
                _close_fd(self.epfd)
                self.epfd = -1
                self._unblock_sigpipe()

    # -- SIGPIPE ---------------------------------------------------------------

    cdef void _block_sigpipe(self) noexcept:
        """Block SIGPIPE in this thread while it runs (see src/sigpipe.pxd)."""
        self.sigpipe_blocked = block_sigpipe()

    cdef void _unblock_sigpipe(self) noexcept:
        if self.sigpipe_blocked:
            unblock_sigpipe()
            self.sigpipe_blocked = False
