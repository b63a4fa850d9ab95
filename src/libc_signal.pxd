# Declarations from <signal.h> used by the compiled twins (src/*.pyx).

from libc_time cimport timespec

cdef extern from "signal.h" nogil:
    ctypedef struct sigset_t:
        pass

    ctypedef struct siginfo_t:
        pass

    enum:
        SIGPIPE
        SIG_BLOCK
        SIG_UNBLOCK

    int sigemptyset(sigset_t* set)
    int sigaddset(sigset_t* set, int signum)
    int sigismember(const sigset_t* set, int signum)
    int pthread_sigmask(int how, const sigset_t* set, sigset_t* old)
    int sigtimedwait(const sigset_t* set, siginfo_t* info, const timespec* timeout)
