# cython: language_level=3, embedsignature=True
"""Compiled twin of the hot path: the byte relay, the HTTP parsers and the PROXY protocol codec.

Built from ``src/bridge.pyx`` into ``fastlb._bridge``.  It exposes the same
names as ``fastlb._bridge_py`` -- the readable specification -- and makes the
same decisions; the test suite runs every relay and parser test on both.
Nothing but ``fastlb.bridge`` imports either twin.

What differs is how: the relay loop runs entirely without the GIL (so several
worker threads relay in parallel), uses a larger buffer, and moves bulk
transfers with splice(2) through a pipe instead of copying them through user
space.  The parsers are C functions over the bytes, shared with the relay,
which uses the status-line parser on the backend's first bytes.  The PROXY
protocol codec is src/proxy_header.pxd, shared with the engine; here it is only
wrapped for Python.
"""

import os

from fastlb._twin_common import RelayResult, splice_mode

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.exc cimport PyErr_CheckSignals
from libc.errno cimport EAGAIN, EINTR, EINVAL, ENOSYS, errno
from libc.math cimport ceil
from libc.stdint cimport uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memchr, memcpy
from posix.fcntl cimport F_GETFL, F_SETFL, O_NONBLOCK, fcntl
from posix.unistd cimport close

from includes.poll cimport POLLIN, POLLOUT, poll, pollfd
from includes.socket cimport MSG_DONTWAIT, MSG_NOSIGNAL, SHUT_WR, recv, send, shutdown
from includes.splice cimport SPLICE_F_MOVE, SPLICE_F_NONBLOCK
from includes.splice cimport splice as splice_fd

from http_status cimport STATUS_PREFIX_LEN, _is_digit, status_code
from proxy_header cimport (PROXY_BUILD_MAX, PROXY_MAX_HEADER, ProxyAddresses,
                           proxy_addresses_from_tuples, proxy_addresses_tuple, proxy_build,
                           proxy_error_reason, proxy_parse)
from sigpipe cimport block_sigpipe, unblock_sigpipe
from splice_pipe cimport open_splice_pipe
from twin_common cimport SpliceMode, monotonic, SPLICE_ALWAYS, SPLICE_NEVER

__all__ = [
    "IMPLEMENTATION",
    "BUFFER_SIZE",
    "MAX_HEALTH_ANSWER",
    "MAX_PROXY_HEADER",
    "RelayResult",
    "parse_status_line",
    "parse_health_answer",
    "parse_proxy_header",
    "build_proxy_header",
    "relay",
]

IMPLEMENTATION = "cython"

cdef enum:
    # One recv per poll wake-up, copied to the other side before the next.
    # Measured over loopback (docs/benchmarks.md), a 64 MiB copy ran faster
    # with 256 KiB than with the Python twin's 64 KiB, and a little faster
    # still with 1 MiB; but bulk transfers leave the copy path for splice
    # after SPLICE_THRESHOLD, so this buffer mostly carries request/response
    # traffic where size does not matter.  256 KiB keeps what a worker can
    # touch small; it is malloc'ed per relay and only touched pages are mapped.
    C_BUFFER_SIZE = 262144

    # See fastlb._bridge_py: a health answer is a status line, a few headers
    # and two integers.
    C_MAX_HEALTH_ANSWER = 4096

    # The automatic policy moves a direction to splice(2) once it has carried
    # SPLICE_THRESHOLD bytes and its last read brought at least BULK_READ:
    # that is a bulk transfer, likely to go on, and splice then halves the
    # relay's CPU time per byte (it skips both copies through user space).
    # Small messages stay on the copy path even on a long keep-alive
    # connection: there splice measured no faster and cost a little more CPU,
    # plus a pipe (two descriptors) per direction.
    SPLICE_THRESHOLD = 1048576
    BULK_READ = 65536

BUFFER_SIZE = C_BUFFER_SIZE
MAX_HEALTH_ANSWER = C_MAX_HEALTH_ANSWER
MAX_PROXY_HEADER = PROXY_MAX_HEADER

# Largest value the health answer may carry (63 bits, a signed 64-bit int).
cdef uint64_t MAX_COUNT = (<uint64_t>1 << 63) - 1

# module= because a compiled module has no frame for namedtuple to find its
# name in; without it the class claims to live in importlib and cannot pickle.
# -- parsers ------------------------------------------------------------------

# RFC 9110 token characters, the only ones allowed in a header name.
cdef bint IS_TCHAR[256]
cdef int _c
for _c in range(256):
    IS_TCHAR[_c] = _c in (b"!#$%&'*+-.^_`|~0123456789"
                          b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


cdef enum Health:
    # Outcomes of _parse_health, in the order fastlb._bridge_py checks them.
    HEALTH_OK
    HEALTH_NEED_MORE
    HEALTH_TOO_LONG
    HEALTH_BAD_STATUS_LINE
    HEALTH_STATUS
    HEALTH_BAD_HEADER
    HEALTH_BAD_CONTENT_LENGTH
    HEALTH_TRANSFER_ENCODING
    HEALTH_TRUNCATED
    HEALTH_BAD_BODY
    HEALTH_TOO_LARGE

_HEALTH_ERRORS = {
    HEALTH_TOO_LONG: "answer too long",
    HEALTH_BAD_STATUS_LINE: "malformed status line",
    HEALTH_BAD_HEADER: "malformed header",
    HEALTH_BAD_CONTENT_LENGTH: "malformed content-length",
    HEALTH_TRANSFER_ENCODING: "unsupported transfer-encoding",
    HEALTH_TRUNCATED: "truncated answer",
    HEALTH_BAD_BODY: "malformed body",
    HEALTH_TOO_LARGE: "number too large",
}


cdef inline Py_ssize_t _find(const unsigned char* data, Py_ssize_t start, Py_ssize_t end,
                             unsigned char c) noexcept nogil:
    """Index of the first c in data[start:end], -1 if none (bytes.find)."""
    if start >= end:
        return -1
    cdef const unsigned char* hit = <const unsigned char*>memchr(data + start, c, end - start)
    return -1 if hit == NULL else hit - data


cdef bint _name_is(const unsigned char* name, Py_ssize_t n, const char* lower) noexcept nogil:
    """Whether the header name equals ``lower`` ignoring ASCII case (names are tokens)."""
    cdef Py_ssize_t i
    cdef unsigned char c
    for i in range(n):
        if lower[i] == 0:
            return False
        c = name[i]
        if 0x41 <= c <= 0x5A:
            c += 0x20
        if c != <unsigned char>lower[i]:
            return False
    return lower[n] == 0


cdef Health _parse_count(const unsigned char* field, Py_ssize_t n, uint64_t* value) noexcept nogil:
    cdef Py_ssize_t i
    cdef uint64_t v = 0
    if n == 0:
        return HEALTH_BAD_BODY
    for i in range(n):
        if not _is_digit(field[i]):
            return HEALTH_BAD_BODY
    # 19 digits always fit in 64 unsigned bits; more cannot fit in 63.
    if n > 19:
        return HEALTH_TOO_LARGE
    for i in range(n):
        v = v * 10 + (field[i] - 0x30)
    if v > MAX_COUNT:
        return HEALTH_TOO_LARGE
    value[0] = v
    return HEALTH_OK


cdef Health _parse_health(const unsigned char* data, Py_ssize_t n, bint at_eof, int* status,
                          uint64_t* errors, uint64_t* entries) noexcept nogil:
    """fastlb._bridge_py.parse_health_answer over a C buffer, step for step."""
    cdef Py_ssize_t eol, line_end, pos, colon, i, vstart, vend, body_end, sep
    cdef long long content_length = -1, length
    cdef Health outcome
    cdef unsigned char c

    if n > C_MAX_HEALTH_ANSWER:
        return HEALTH_TOO_LONG
    status[0] = status_code(data, n)
    if status[0] < 0:
        return HEALTH_BAD_STATUS_LINE
    if status[0] == 0:
        return HEALTH_TRUNCATED if at_eof else HEALTH_NEED_MORE
    if status[0] != 200:
        return HEALTH_STATUS

    eol = _find(data, 0, n, b'\n')
    if eol < 0:
        return HEALTH_TRUNCATED if at_eof else HEALTH_NEED_MORE
    line_end = eol - 1 if eol > 0 and data[eol - 1] == 0x0D else eol
    for i in range(STATUS_PREFIX_LEN, line_end):
        c = data[i]
        if c < 0x20 and c != 0x09 or c == 0x7F:
            return HEALTH_BAD_STATUS_LINE

    pos = eol + 1
    while True:
        eol = _find(data, pos, n, b'\n')
        if eol < 0:
            return HEALTH_TRUNCATED if at_eof else HEALTH_NEED_MORE
        line_end = eol - 1 if eol > pos and data[eol - 1] == 0x0D else eol
        if line_end == pos:
            pos = eol + 1
            break
        colon = _find(data, pos, line_end, b':')
        if colon <= pos:
            return HEALTH_BAD_HEADER
        for i in range(pos, colon):
            if not IS_TCHAR[data[i]]:
                return HEALTH_BAD_HEADER
        vstart = colon + 1
        vend = line_end
        while vstart < vend and (data[vstart] == 0x20 or data[vstart] == 0x09):
            vstart += 1
        while vend > vstart and (data[vend - 1] == 0x20 or data[vend - 1] == 0x09):
            vend -= 1
        if _name_is(data + pos, colon - pos, b"content-length"):
            if vend == vstart or vend - vstart > 10:
                return HEALTH_BAD_CONTENT_LENGTH
            length = 0
            for i in range(vstart, vend):
                if not _is_digit(data[i]):
                    return HEALTH_BAD_CONTENT_LENGTH
                length = length * 10 + (data[i] - 0x30)
            if content_length >= 0 and length != content_length:
                return HEALTH_BAD_CONTENT_LENGTH
            content_length = length
        elif _name_is(data + pos, colon - pos, b"transfer-encoding"):
            return HEALTH_TRANSFER_ENCODING
        pos = eol + 1

    body_end = n
    if content_length >= 0:
        if pos + content_length > C_MAX_HEALTH_ANSWER:
            return HEALTH_TOO_LONG
        if n - pos < content_length:
            return HEALTH_TRUNCATED if at_eof else HEALTH_NEED_MORE
        body_end = pos + content_length
    elif not at_eof:
        return HEALTH_NEED_MORE

    if body_end > pos and data[body_end - 1] == 0x0A:
        body_end -= 1
    sep = _find(data, pos, body_end, b'\n')
    if sep < 0:
        return HEALTH_BAD_BODY
    outcome = _parse_count(data + pos, sep - pos, errors)
    if outcome != HEALTH_OK:
        return outcome
    return _parse_count(data + sep + 1, body_end - sep - 1, entries)


def parse_status_line(data):
    """Return the status code at the start of ``data``, 0 if more bytes are needed, -1 if malformed.

    A status line starts ``HTTP/1.<digit> <three digits>`` followed by a space,
    CR or LF; the code must be at least 100.  Only the first 13 bytes are
    examined: the reason phrase is the health parser's business.  ``data`` is
    any bytes-like object.
    """
    cdef Py_buffer view
    cdef int code
    if type(data) is bytes:
        return status_code(<const unsigned char*>PyBytes_AS_STRING(<bytes>data),
                           PyBytes_GET_SIZE(<bytes>data))
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    code = status_code(<const unsigned char*>view.buf, view.len)
    PyBuffer_Release(&view)
    return code


def parse_health_answer(data, bint at_eof):
    """Parse a complete health answer: ``(errors, entries)``, or None if more bytes are needed.

    ``at_eof`` says the backend closed the connection, so ``data`` is all there
    will be.  Raises ``ValueError`` with a short reason when the answer is not a
    healthy one; the reasons and the order in which they are checked are those
    of ``fastlb._bridge_py.parse_health_answer``.  ``data`` is any bytes-like
    object.
    """
    cdef Py_buffer view
    cdef Health outcome
    cdef int status = 0
    cdef uint64_t errors = 0, entries = 0
    if type(data) is bytes:
        outcome = _parse_health(<const unsigned char*>PyBytes_AS_STRING(<bytes>data),
                                PyBytes_GET_SIZE(<bytes>data), at_eof, &status, &errors, &entries)
    else:
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        outcome = _parse_health(<const unsigned char*>view.buf, view.len, at_eof,
                                &status, &errors, &entries)
        PyBuffer_Release(&view)
    if outcome == HEALTH_OK:
        return errors, entries
    if outcome == HEALTH_NEED_MORE:
        return None
    if outcome == HEALTH_STATUS:
        raise ValueError("status %d" % status)
    raise ValueError(_HEALTH_ERRORS[outcome])


# -- PROXY protocol -------------------------------------------------------------

def parse_proxy_header(data):
    """Parse the PROXY header at the start of ``data``: ``(length, source, destination)``, or None.

    None means ``data`` is a valid beginning of a header but not all of it yet.
    ``source`` and ``destination`` are ``(ip, port)``, or both None when the
    connection's real endpoints apply.  Raises ``ValueError`` as soon as
    ``data`` cannot start a valid header; the reasons and the order in which
    they are checked are those of ``fastlb._bridge_py.parse_proxy_header``.
    ``data`` is any bytes-like object.
    """
    cdef Py_buffer view
    cdef ProxyAddresses addresses
    cdef int error = 0
    cdef Py_ssize_t length
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    length = proxy_parse(<const unsigned char*>view.buf, view.len, &addresses, &error)
    PyBuffer_Release(&view)
    if length == 0:
        return None
    if length < 0:
        raise ValueError(proxy_error_reason(error))
    source, destination = proxy_addresses_tuple(&addresses)
    return length, source, destination


def build_proxy_header(version, source, destination):
    """The PROXY protocol header (``version`` 1 or 2) that announces ``source`` -> ``destination``.

    Each endpoint is ``(ip, port)``; when either is None the header says to use
    the connection's own endpoints.  Mixed IPv4 and IPv6 become IPv6 with the
    IPv4 address mapped.  Errors are those of
    ``fastlb._bridge_py.build_proxy_header``.
    """
    cdef ProxyAddresses addresses
    cdef unsigned char out[PROXY_BUILD_MAX]
    cdef Py_ssize_t length
    if version not in (1, 2):
        raise ValueError("PROXY protocol version must be 1 or 2")
    proxy_addresses_from_tuples(&addresses, source, destination)
    length = proxy_build(out, version, &addresses)
    return out[:length]


# -- relay --------------------------------------------------------------------

cdef enum DirectionState:
    OPEN
    AT_EOF
    FAILED

cdef enum RelayEnd:
    END_DONE
    END_SERVER_TIMEOUT
    END_IDLE_TIMEOUT
    END_CLIENT_ERROR
    END_SERVER_ERROR

cdef enum:
    # What _send_all and _flush_pipe report (-1 is a raised Python exception).
    SENT_ALL = 0
    SEND_DEADLINE = 1
    SEND_BROKEN = 2

_DIRECTION_STATES = ("open", "eof", "error")
_RELAY_ENDS = ("done", "server_timeout", "idle_timeout", "client_error", "server_error")


cdef struct Direction:
    int src
    int dst
    DirectionState state
    unsigned long long nbytes
    # The pipe of a direction moved to splice(2); pipe_size 0 while copying.
    int pipe_r
    int pipe_w
    Py_ssize_t pipe_size
    bint copy_only          # no pipe could be made, or the socket cannot splice
    Py_ssize_t last_read    # bytes the last read brought, for the automatic policy


cdef struct Relay:
    Direction up            # client -> backend
    Direction down          # backend -> client
    unsigned char* buf
    SpliceMode mode
    double server_timeout
    double idle_timeout
    RelayEnd end
    int status              # -1 until the first response's status is decided
    unsigned char head[STATUS_PREFIX_LEN]
    Py_ssize_t head_len
    bint nonblocking_set    # the sockets were made non-blocking for splice
    bint sigpipe_blocked    # this thread's SIGPIPE was blocked for splice
    int client_flags        # file status flags to restore, -1 if untouched
    int server_flags
    int os_error            # errno of an unexpected poll(2) failure


cdef inline int _poll_ms(double seconds) noexcept nogil:
    """poll(2) timeout for a positive wait, rounded up as the Python twin does."""
    cdef double ms = ceil(seconds * 1000.0)
    return 2147483647 if ms > 2147483647.0 else <int>ms


cdef int _check_signals() except -1 nogil:
    """Run pending Python signal handlers after an EINTR; raises what they raise (Ctrl-C)."""
    with gil:
        PyErr_CheckSignals()
    return 0


cdef int _wait_writable(int fd, double deadline) except -1 nogil:
    """Wait for room to write on fd, until deadline at most; 0 when the deadline passed."""
    cdef pollfd pfd
    cdef double remaining = deadline - monotonic()
    cdef int err
    if remaining <= 0:
        return 0
    pfd.fd = fd
    pfd.events = POLLOUT
    pfd.revents = 0
    # POLLERR/POLLHUP also wake us; the next write then reports the error.
    if poll(&pfd, 1, _poll_ms(remaining)) < 0:
        err = errno
        if err == EINTR:
            _check_signals()
    return 1


cdef int _send_all(int fd, const unsigned char* data, Py_ssize_t n,
                   double deadline) except -1 nogil:
    """Write all n bytes to fd before deadline."""
    cdef Py_ssize_t sent = 0, k
    cdef int err
    while sent < n:
        k = send(fd, data + sent, n - sent, MSG_DONTWAIT | MSG_NOSIGNAL)
        if k >= 0:
            sent += k
            continue
        err = errno
        if err == EINTR:
            _check_signals()
        elif err != EAGAIN:  # EWOULDBLOCK == EAGAIN on Linux
            return SEND_BROKEN
        elif not _wait_writable(fd, deadline):
            return SEND_DEADLINE
    return SENT_ALL


cdef int _flush_pipe(Direction* d, Py_ssize_t n, double deadline) except -1 nogil:
    """Move the n bytes in d's pipe to d.dst before deadline (the splice twin of _send_all)."""
    cdef Py_ssize_t k
    cdef int err
    while n > 0:
        k = splice_fd(d.pipe_r, NULL, d.dst, NULL, n, SPLICE_F_MOVE | SPLICE_F_NONBLOCK)
        if k > 0:
            n -= k
            continue
        if k == 0:
            return SEND_BROKEN  # the pipe cannot be empty while it holds n bytes
        err = errno
        if err == EINTR:
            _check_signals()
        elif err != EAGAIN:
            return SEND_BROKEN
        elif not _wait_writable(d.dst, deadline):
            return SEND_DEADLINE
    return SENT_ALL


cdef int _make_nonblocking(int fd) noexcept nogil:
    """Set O_NONBLOCK on fd: the flags to restore later, -1 if nothing to restore, -2 on failure."""
    cdef int flags = fcntl(fd, F_GETFL)
    if flags < 0:
        return -2
    if flags & O_NONBLOCK:
        return -1
    if fcntl(fd, F_SETFL, flags | O_NONBLOCK) < 0:
        return -2
    return flags


cdef void _block_sigpipe(Relay* r) noexcept nogil:
    """Block SIGPIPE in this thread while the relay splices (see src/sigpipe.pxd)."""
    r.sigpipe_blocked = block_sigpipe()


cdef void _unblock_sigpipe(Relay* r) noexcept nogil:
    if r.sigpipe_blocked:
        unblock_sigpipe()
        r.sigpipe_blocked = False


cdef void _start_splice(Relay* r, Direction* d) noexcept nogil:
    """Give direction d a pipe so that it moves bytes with splice(2); copy_only if impossible."""
    cdef int fds[2]
    cdef int size
    # A splice into a socket blocks on a blocking socket whatever the splice
    # flags say, so the deadline would not hold: both sockets go non-blocking
    # for the rest of the relay and get their flags back at the end.
    if not r.nonblocking_set:
        r.client_flags = _make_nonblocking(r.up.src)
        r.server_flags = _make_nonblocking(r.up.dst)
        if r.client_flags == -2 or r.server_flags == -2:
            r.client_flags = max(r.client_flags, -1)
            r.server_flags = max(r.server_flags, -1)
            r.up.copy_only = r.down.copy_only = True
            return
        r.nonblocking_set = True
    size = open_splice_pipe(fds)
    if size < 0:
        d.copy_only = True
        return
    d.pipe_r = fds[0]
    d.pipe_w = fds[1]
    d.pipe_size = size
    if not r.sigpipe_blocked:
        _block_sigpipe(r)


cdef void _stop_splice(Direction* d) noexcept nogil:
    if d.pipe_size:
        close(d.pipe_r)
        close(d.pipe_w)
        d.pipe_size = 0


cdef int _pump(Relay* r, Direction* d, pollfd* pfd, double* now) except -1 nogil:
    """Move one chunk from d.src to d.dst after poll reported d.src; 1 when the relay is over."""
    cdef bint upstream = d == &r.up
    cdef Py_ssize_t n = -1, take
    cdef int err
    cdef int sent

    # The backend's first bytes are copied, so the status line can be read.
    if (d.pipe_size == 0 and not d.copy_only and r.mode != SPLICE_NEVER
            and (upstream or r.status >= 0)
            and (r.mode == SPLICE_ALWAYS
                 or d.nbytes >= SPLICE_THRESHOLD and d.last_read >= BULK_READ)):
        _start_splice(r, d)

    while True:
        if d.pipe_size:
            n = splice_fd(d.src, NULL, d.pipe_w, NULL, d.pipe_size,
                          SPLICE_F_MOVE | SPLICE_F_NONBLOCK)
        else:
            n = recv(d.src, r.buf, C_BUFFER_SIZE, MSG_DONTWAIT)
        if n >= 0:
            break
        err = errno
        if err == EINTR:
            _check_signals()
        elif err == EAGAIN:
            return 0  # woken for nothing
        elif d.pipe_size and (err == EINVAL or err == ENOSYS):
            # This kind of socket cannot splice; the pipe is empty, so copying
            # from here on changes nothing else.
            _stop_splice(d)
            d.copy_only = True
        else:
            break

    if n <= 0:
        if n == 0:
            d.state = AT_EOF
            pfd.fd = -1  # stop polling this side for input
            shutdown(d.dst, SHUT_WR)
            return 0
        d.state = FAILED
        r.end = END_CLIENT_ERROR if upstream else END_SERVER_ERROR
        return 1

    if not upstream and r.status < 0:
        take = STATUS_PREFIX_LEN - r.head_len
        if take > n:
            take = n
        memcpy(r.head + r.head_len, r.buf, take)
        r.head_len += take
        r.status = status_code(r.head, r.head_len)
        if r.status == 0 and r.head_len < STATUS_PREFIX_LEN:
            r.status = -1  # undecided: more bytes needed
        elif r.status < 0:
            r.status = 0

    if d.pipe_size:
        sent = _flush_pipe(d, n, now[0] + r.idle_timeout)
    else:
        sent = _send_all(d.dst, r.buf, n, now[0] + r.idle_timeout)
    now[0] = monotonic()
    if sent == SEND_BROKEN:
        # The destination is gone: both directions are over.
        d.state = FAILED
        r.end = END_SERVER_ERROR if upstream else END_CLIENT_ERROR
        return 1
    if sent == SEND_DEADLINE:
        r.end = END_IDLE_TIMEOUT
        return 1
    d.nbytes += n
    d.last_read = n
    return 0


cdef int _relay_loop(Relay* r) except -1 nogil:
    """The relay proper: runs without the GIL until both directions end, a timeout or an error."""
    cdef pollfd fds[2]
    cdef double now = monotonic(), deadline, wait
    cdef double last_up = now, last_any = now
    cdef RelayEnd on_timeout
    cdef int ready, err
    cdef unsigned long long before

    fds[0].fd = r.up.src
    fds[0].events = POLLIN
    fds[1].fd = r.down.src
    fds[1].events = POLLIN

    while r.up.state == OPEN or r.down.state == OPEN:
        if r.down.nbytes == 0 and r.down.state == OPEN:
            deadline, on_timeout = last_up + r.server_timeout, END_SERVER_TIMEOUT
        else:
            deadline, on_timeout = last_any + r.idle_timeout, END_IDLE_TIMEOUT
        wait = deadline - now
        ready = 0
        if wait > 0:
            fds[0].revents = 0
            fds[1].revents = 0
            ready = poll(fds, 2, _poll_ms(wait))
            if ready < 0:
                err = errno
                if err != EINTR:
                    r.os_error = err
                    return 0
                _check_signals()
                now = monotonic()
                continue
        now = monotonic()
        if ready == 0:
            if now >= deadline:
                r.end = on_timeout
                return 0
            continue

        if fds[0].revents:
            before = r.up.nbytes
            if _pump(r, &r.up, &fds[0], &now):
                return 0
            if r.up.nbytes != before:
                last_up = last_any = now
        if fds[1].revents:
            before = r.down.nbytes
            if _pump(r, &r.down, &fds[1], &now):
                return 0
            if r.down.nbytes != before:
                last_any = now
    return 0


cdef void _release(Relay* r) noexcept nogil:
    """Undo what the relay set up: pipes, SIGPIPE mask, socket flags, the buffer."""
    _stop_splice(&r.up)
    _stop_splice(&r.down)
    _unblock_sigpipe(r)
    if r.client_flags >= 0:
        fcntl(r.up.src, F_SETFL, r.client_flags)
    if r.server_flags >= 0:
        fcntl(r.up.dst, F_SETFL, r.server_flags)
    free(r.buf)
    r.buf = NULL


def relay(client, server, double server_timeout, double idle_timeout, splice=None):
    """Relay bytes both ways between two connected sockets until both directions end.

    When one side reaches EOF, writing toward the other side is shut down and the
    opposite direction goes on (half-close).  Before the backend's first byte,
    the relay gives up ``server_timeout`` seconds after the last byte sent to the
    backend; afterwards, when nothing moved either way for ``idle_timeout``
    seconds.  A reset or error on either side ends the relay.  The sockets are
    not closed and are left as they were given (splicing makes them
    non-blocking while it runs, then restores their flags); the caller owns
    them.  The loop runs without the GIL; pending signal handlers still run
    when a signal interrupts it, and an exception they raise comes out of
    relay() after it has cleaned up.

    ``splice`` chooses how bytes move: None (automatic) switches a direction to
    splice(2) through a pipe once it has carried 1 MiB and is reading in bulk
    (64 KiB or more at a time), True splices from the start (after the
    backend's status line), False always copies.  The result is the same
    either way.
    """
    cdef Relay r
    cdef int cfd = client.fileno()
    cdef int sfd = server.fileno()
    if cfd < 0 or sfd < 0:
        raise ValueError("file descriptor cannot be a negative integer (%d)" % min(cfd, sfd))

    r.up = Direction(src=cfd, dst=sfd, state=OPEN, nbytes=0, pipe_r=-1, pipe_w=-1,
                     pipe_size=0, copy_only=False, last_read=0)
    r.down = Direction(src=sfd, dst=cfd, state=OPEN, nbytes=0, pipe_r=-1, pipe_w=-1,
                       pipe_size=0, copy_only=False, last_read=0)
    r.mode = <SpliceMode><int>splice_mode(splice)
    r.server_timeout = server_timeout
    r.idle_timeout = idle_timeout
    r.end = END_DONE
    r.status = -1
    r.head_len = 0
    r.nonblocking_set = False
    r.sigpipe_blocked = False
    r.client_flags = -1
    r.server_flags = -1
    r.os_error = 0
    r.buf = <unsigned char*>malloc(C_BUFFER_SIZE)
    if r.buf == NULL:
        raise MemoryError()
    try:
        with nogil:
            _relay_loop(&r)
    finally:
        _release(&r)
    if r.os_error:
        raise OSError(r.os_error, os.strerror(r.os_error))
    return RelayResult(r.up.nbytes, r.down.nbytes, _DIRECTION_STATES[r.up.state],
                       _DIRECTION_STATES[r.down.state], _RELAY_ENDS[r.end],
                       r.status if r.status > 0 else 0)
