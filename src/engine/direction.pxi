# The Direction struct, one per way a connection's bytes flow, and what moves
# its bytes: recv/send, splice through a pipe of its own, and the process-wide
# pipe budget (included by src/engine.pyx, whose tunables it uses).

from libc.errno cimport EINTR, errno
from libc.stdlib cimport free
from libc.string cimport memset
from posix.unistd cimport close

from includes.socket cimport MSG_NOSIGNAL, recv, send
from includes.splice cimport SPLICE_F_MOVE, SPLICE_F_NONBLOCK
from includes.splice cimport splice as splice_fd

from splice_pipe cimport open_splice_pipe


cdef struct Direction:
    # Bytes read but not yet written sit either in buf[start:end] (copy path)
    # or in the pipe (in_pipe bytes, splice path), never both.
    unsigned char* buf      # NULL while nothing is held
    Py_ssize_t start
    Py_ssize_t end
    int pipe_r              # -1 while copying
    int pipe_w
    Py_ssize_t pipe_size    # 0 while copying
    Py_ssize_t in_pipe
    bint copy_only          # no pipe could be made, or the socket cannot splice
    bint eof                # the source ended its output
    bint shut               # ... and that was passed on with shutdown(SHUT_WR)
    Py_ssize_t last_read
    unsigned long long nbytes   # bytes read from the source


cdef inline Py_ssize_t _held(Direction* d) noexcept nogil:
    return d.end - d.start + d.in_pipe


cdef inline bint _has_room(Direction* d) noexcept nogil:
    if d.pipe_size:
        return d.in_pipe < d.pipe_size
    return d.end - d.start < C_BUFFER_LIMIT


cdef inline Py_ssize_t _recv(int fd, void* buf, size_t n, int flags, int* err) noexcept nogil:
    cdef Py_ssize_t k
    while True:
        k = recv(fd, buf, n, flags)
        if k >= 0:
            return k
        err[0] = errno
        if err[0] != EINTR:
            return -1


cdef inline Py_ssize_t _send(int fd, const void* buf, size_t n, int* err) noexcept nogil:
    cdef Py_ssize_t k
    while True:
        k = send(fd, buf, n, MSG_NOSIGNAL)
        if k >= 0:
            return k
        err[0] = errno
        if err[0] != EINTR:
            return -1


cdef inline Py_ssize_t _splice(int src, int dst, size_t n, int* err) noexcept nogil:
    cdef Py_ssize_t k
    while True:
        k = splice_fd(src, NULL, dst, NULL, n, SPLICE_F_MOVE | SPLICE_F_NONBLOCK)
        if k >= 0:
            return k
        err[0] = errno
        if err[0] != EINTR:
            return -1


cdef inline void _close_fd(int fd) noexcept nogil:
    # Linux closes the descriptor even when close() reports EINTR: never retry.
    if fd >= 0:
        close(fd)


cdef void _init_direction(Direction* d) noexcept nogil:
    memset(d, 0, sizeof(Direction))
    d.pipe_r = -1
    d.pipe_w = -1


# The splice pipes every engine of the process holds, against one budget
# (set_pipe_budget): each pipe is two descriptors that --max-connections' two
# per connection do not count, so an unbounded number of them would starve
# accept, backend sockets and probes of descriptors at capacity.  Counted with
# atomics: engines run in parallel without the GIL.
cdef extern from *:
    """
    static long fastlb_pipes_in_use = 0;
    static long fastlb_pipe_budget = 1L << 30;

    static inline int fastlb_take_pipe(void) {
        if (__atomic_add_fetch(&fastlb_pipes_in_use, 1, __ATOMIC_RELAXED)
                > __atomic_load_n(&fastlb_pipe_budget, __ATOMIC_RELAXED)) {
            __atomic_sub_fetch(&fastlb_pipes_in_use, 1, __ATOMIC_RELAXED);
            return 0;
        }
        return 1;
    }
    static inline void fastlb_give_pipe(void) {
        __atomic_sub_fetch(&fastlb_pipes_in_use, 1, __ATOMIC_RELAXED);
    }
    static inline long fastlb_pipes(void) {
        return __atomic_load_n(&fastlb_pipes_in_use, __ATOMIC_RELAXED);
    }
    static inline void fastlb_set_pipe_budget(long n) {
        __atomic_store_n(&fastlb_pipe_budget, n, __ATOMIC_RELAXED);
    }
    """
    bint fastlb_take_pipe() nogil
    void fastlb_give_pipe() nogil
    long fastlb_pipes() nogil
    void fastlb_set_pipe_budget(long n) nogil


def set_pipe_budget(long pipes):
    """At most this many splice pipes open at once in the process's engines (others copy)."""
    fastlb_set_pipe_budget(pipes)


def pipes_in_use():
    """Splice pipes the process's engines hold now."""
    return fastlb_pipes()


cdef void _release_direction(Direction* d) noexcept nogil:
    free(d.buf)
    d.buf = NULL
    d.start = d.end = 0
    if d.pipe_size:
        _stop_splice(d)


cdef bint _start_splice(Direction* d) noexcept nogil:
    """Give d a pipe so that it moves bytes with splice(2); False (it copies) when impossible.

    Out of pipe budget the direction copies for now and may splice later;
    a pipe the kernel refuses makes it copy for good.
    """
    cdef int fds[2]
    cdef int size
    if not fastlb_take_pipe():
        return False
    size = open_splice_pipe(fds)
    if size < 0:
        fastlb_give_pipe()
        d.copy_only = True   # copying still works
        return False
    d.pipe_r = fds[0]
    d.pipe_w = fds[1]
    d.pipe_size = size
    d.in_pipe = 0
    return True


cdef void _stop_splice(Direction* d) noexcept nogil:
    _close_fd(d.pipe_r)
    _close_fd(d.pipe_w)
    d.pipe_r = d.pipe_w = -1
    d.pipe_size = d.in_pipe = 0
    fastlb_give_pipe()
