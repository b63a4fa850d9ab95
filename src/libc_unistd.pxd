# Declarations from <unistd.h> used by the compiled twins (src/*.pyx) (pipe2 is a Linux
# extension exposed by _GNU_SOURCE, which Python.h defines).

cdef extern from "unistd.h" nogil:
    int pipe2(int* fds, int flags)
    int close(int fd)
