# Declarations from <time.h> used by the compiled twins (src/*.pyx).

cdef extern from "time.h" nogil:
    ctypedef long time_t
    ctypedef int clockid_t

    struct timespec:
        time_t tv_sec
        long tv_nsec

    enum:
        CLOCK_MONOTONIC

    int clock_gettime(clockid_t clock, timespec* now)
