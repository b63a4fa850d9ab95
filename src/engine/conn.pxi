# The Conn struct, one per client connection, its states and ways to end, and
# what is done to its bytes besides relaying them: the first response's status
# and the replay copy (included by src/engine.pyx, after direction.pxi and
# queue.pxi).

from cpython.ref cimport Py_XDECREF, PyObject
from libc.stdlib cimport free, realloc
from libc.string cimport memcmp, memcpy, strlen

from includes.socket cimport sockaddr_storage, socklen_t

from http_status cimport STATUS_PREFIX_LEN, status_code
from proxy_header cimport ProxyAddresses


cdef enum State:
    ST_WAIT
    ST_ROUTING              # queued for the router (the end of this loop turn)
    ST_PARKED
    ST_CONNECTING
    ST_RELAYING
    ST_LINGER
    ST_CLOSED

cdef enum End:
    END_NONE
    END_DONE
    END_CLIENT_TIMEOUT
    END_CLIENT_CLOSED
    END_CLIENT_ERROR
    END_SERVER_ERROR
    END_SERVER_TIMEOUT
    END_IDLE_TIMEOUT
    END_NO_BACKEND
    END_BAD_PROXY_HEADER

_END_NAMES = ("", "done", "client_timeout", "client_closed", "client_error", "server_error",
              "server_timeout", "idle_timeout", "no_backend", "bad_proxy_header")

cdef enum Route:
    ROUTE_PARK
    ROUTE_NONE
    ROUTE_OK

cdef enum Retry:
    RETRY_NEVER
    RETRY_IDEMPOTENT
    RETRY_ALWAYS

# Why a backend is replayed (Conn.route_replay), as the router is told.
cdef enum:
    REPLAY_NONE = 0
    REPLAY_CLOSED
    REPLAY_RESET

_REPLAY_REASONS = ("", "closed the connection without an answer",
                   "reset the connection without an answer")
_RETRY_POLICIES = {"never": RETRY_NEVER, "idempotent": RETRY_IDEMPOTENT, "always": RETRY_ALWAYS}

# Values of the "failed" argument of _connect_next besides a positive errno.
cdef enum:
    FAILED_NOTHING = 0
    FAILED_TIMEOUT = -1


cdef struct Conn:
    Link links[N_LINKS]     # its places on the engine's queues (queue.pxi)
    bint reported           # queued for router.finished already: never twice
    int client
    int server              # -1 when there is none
    int client_mask         # registered interest (READ | WRITE), 0 when not in epoll
    int server_mask
    State state
    double accepted
    double deadline
    double park_deadline    # when parking ends (set when first parked, 0 before)
    double last_up          # last byte written to the backend
    Direction up            # client -> backend
    Direction down          # backend -> client
    int status              # first response status, -1 until known
    unsigned char head[STATUS_PREFIX_LEN]
    Py_ssize_t head_len
    int answered            # status of fastlb's own answer, if any
    Py_ssize_t lingered
    # --accept-proxy: the client's PROXY header.  While it is incomplete, the
    # bytes taken so far (malloc'ed, header_len of them); once complete,
    # header_done and the addresses it carried (family 0: none).
    bint header_done
    unsigned char* header
    Py_ssize_t header_len
    ProxyAddresses proxied
    int send_proxy          # PROXY version owed to the current backend before any client byte
    End failed              # a side that failed while the other was owed bytes (END_NONE: none)
    # --retry-on-empty: the client's bytes so far (copy_len of them, in a
    # buffer of copy_cap), until the backend's first answer byte; copy_off
    # once that came, the bytes outgrew C_REPLAY_LIMIT, or replays are off.
    unsigned char* copy
    Py_ssize_t copy_len
    Py_ssize_t copy_cap
    bint copy_off
    int route_replay        # REPLAY_*: tell the router the current backend was replayed
    End report_end
    int report_status
    double report_duration
    # The routing request (ST_ROUTING) and its answer.
    int route_failed        # FAILED_NOTHING, FAILED_TIMEOUT or the errno of the last connect
    bint route_drop_ticket
    Route route
    sockaddr_storage peer   # the backend's address when route is ROUTE_OK
    socklen_t peer_len
    # Strong references, NULL meaning None; released once reported.
    PyObject* addr
    PyObject* ticket
    PyObject* token
    PyObject* tried
    PyObject* source        # (ip, port) from the accepted header, made when first routed


cdef inline object _obj(PyObject* p):
    return <object>p if p != NULL else None


cdef inline void _clear(PyObject** slot) noexcept:
    cdef PyObject* p = slot[0]
    slot[0] = NULL
    Py_XDECREF(p)


cdef inline bint _holds_refs(Conn* c) noexcept nogil:
    return (c.token != NULL or c.tried != NULL or c.addr != NULL or c.ticket != NULL
            or c.source != NULL)


cdef inline void _drop_refs(Conn* c) noexcept:
    """With the GIL: release every Python object c refers to."""
    _clear(&c.token)
    _clear(&c.tried)
    _clear(&c.addr)
    _clear(&c.ticket)
    _clear(&c.source)


cdef void _capture_status(Conn* c, const unsigned char* data, Py_ssize_t n) noexcept nogil:
    """Decide the first response's status from its first STATUS_PREFIX_LEN bytes (as the twin)."""
    cdef Py_ssize_t take = STATUS_PREFIX_LEN - c.head_len
    cdef int code
    if take > n:
        take = n
    memcpy(c.head + c.head_len, data, take)
    c.head_len += take
    code = status_code(c.head, c.head_len)
    if code != 0 or c.head_len >= STATUS_PREFIX_LEN:
        c.status = code if code > 0 else 0


cdef void _drop_copy(Conn* c) noexcept nogil:
    free(c.copy)
    c.copy = NULL
    c.copy_len = c.copy_cap = 0
    c.copy_off = True


cdef void _keep_copy(Conn* c, const unsigned char* data, Py_ssize_t n) noexcept nogil:
    """Add the client's bytes to its replay copy; give the copy up past C_REPLAY_LIMIT."""
    cdef Py_ssize_t capacity = c.copy_cap
    cdef unsigned char* grown
    if c.copy_len + n > C_REPLAY_LIMIT:
        _drop_copy(c)
        return
    if c.copy_len + n > capacity:
        if capacity == 0:
            capacity = REPLAY_FIRST_CAPACITY
        while capacity < c.copy_len + n:
            capacity *= 2
        grown = <unsigned char*>realloc(c.copy, capacity)
        if grown == NULL:
            _drop_copy(c)
            return
        c.copy = grown
        c.copy_cap = capacity
    memcpy(c.copy + c.copy_len, data, n)
    c.copy_len += n


cdef bint _idempotent(const unsigned char* data, Py_ssize_t n) noexcept nogil:
    """Do the bytes start with an idempotent HTTP method (RFC 9110 9.2.2) and its space?"""
    cdef const char* methods[6]
    cdef Py_ssize_t i, k
    methods[0] = b"GET "
    methods[1] = b"HEAD "
    methods[2] = b"OPTIONS "
    methods[3] = b"TRACE "
    methods[4] = b"PUT "
    methods[5] = b"DELETE "
    for i in range(6):
        k = strlen(methods[i])
        if n >= k and memcmp(data, methods[i], k) == 0:
            return True
    return False
