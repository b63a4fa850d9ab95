# Declarations from <sys/eventfd.h> used by src/engine.pyx (Linux).
from libc.stdint cimport uint64_t

cdef extern from "sys/eventfd.h" nogil:
    ctypedef uint64_t eventfd_t

    enum:
        EFD_CLOEXEC
        EFD_NONBLOCK

    int eventfd(unsigned int initval, int flags)
    int eventfd_read(int fd, eventfd_t* value)
    int eventfd_write(int fd, eventfd_t value)
