# The thread-level functions of <signal.h> that Cython's posix.signal does not
# declare (its sigset_t operations and SIG_BLOCK/SIG_UNBLOCK are used from
# there, SIGPIPE from libc.signal).

from posix.signal cimport siginfo_t
from posix.time cimport timespec
from posix.types cimport sigset_t


cdef extern from "signal.h" nogil:
    int pthread_sigmask(int how, const sigset_t* set, sigset_t* old)
    int sigtimedwait(const sigset_t* set, siginfo_t* info, const timespec* timeout)
