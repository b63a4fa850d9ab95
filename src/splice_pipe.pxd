# The pipe a direction splices through, shared by src/bridge.pyx and src/engine.pyx.

from posix.fcntl cimport O_CLOEXEC, O_NONBLOCK, fcntl
from posix.unistd cimport close

from includes.splice cimport F_GETPIPE_SZ, F_SETPIPE_SZ, pipe2

cdef enum:
    # Pipe capacity asked for with F_SETPIPE_SZ: one splice moves up to this
    # much, and a full pipe is the direction's back-pressure bound.  1 MiB is
    # the default unprivileged /proc/sys/fs/pipe-max-size; when the per-user
    # pipe budget is spent the kernel refuses and the pipe keeps its default
    # 64 KiB, which still works.
    PIPE_SIZE = 1048576


cdef inline int open_splice_pipe(int* fds) noexcept nogil:
    """A non-blocking, close-on-exec pipe of up to PIPE_SIZE in fds; its capacity, or -1.

    On -1 (out of descriptors, say) nothing is left open: the caller copies
    instead.
    """
    cdef int size
    if pipe2(fds, O_NONBLOCK | O_CLOEXEC) < 0:
        return -1
    size = fcntl(fds[1], F_SETPIPE_SZ, <int>PIPE_SIZE)
    if size < 0:
        size = fcntl(fds[1], F_GETPIPE_SZ)
    if size <= 0:
        close(fds[0])
        close(fds[1])
        return -1
    return size
