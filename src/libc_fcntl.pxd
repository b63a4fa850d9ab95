# Declarations from <fcntl.h> used by the compiled twins (src/*.pyx).  splice() and the pipe
# size commands are Linux extensions; Python.h defines _GNU_SOURCE, which
# exposes them.

cdef extern from "fcntl.h" nogil:
    ctypedef long loff_t

    enum:
        F_GETFL
        F_SETFL
        F_GETPIPE_SZ
        F_SETPIPE_SZ
        O_NONBLOCK
        O_CLOEXEC
        SPLICE_F_MOVE
        SPLICE_F_NONBLOCK

    int fcntl(int fd, int cmd, ...)
    ssize_t splice(int fd_in, loff_t* off_in, int fd_out, loff_t* off_out,
                   size_t length, unsigned int flags)
