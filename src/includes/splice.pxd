# The Linux extensions for moving bytes through a pipe with splice(2), which
# Cython's posix.fcntl and posix.unistd do not declare: splice and the pipe
# size commands from <fcntl.h>, pipe2 from <unistd.h>.  Python.h defines
# _GNU_SOURCE, which exposes them.

cdef extern from "fcntl.h" nogil:
    ctypedef long loff_t

    enum:
        F_GETPIPE_SZ
        F_SETPIPE_SZ
        SPLICE_F_MOVE
        SPLICE_F_NONBLOCK

    ssize_t splice(int fd_in, loff_t* off_in, int fd_out, loff_t* off_out,
                   size_t length, unsigned int flags)

cdef extern from "unistd.h" nogil:
    int pipe2(int* fds, int flags)
