# SIGPIPE around splice(2), shared by src/bridge.pyx and src/engine.pyx.
#
# splice(2) has no MSG_NOSIGNAL: a splice into a socket whose peer is gone
# fails with EPIPE and also raises SIGPIPE, which would kill a process that
# left SIGPIPE at its default action (Python ignores it; an embedding program
# may not).  Blocked, the signal stays pending on the splicing thread and
# unblock_sigpipe discards it, so splice reports a vanished peer exactly as
# send(MSG_NOSIGNAL) does.

from libc.signal cimport SIGPIPE
from posix.signal cimport SIG_BLOCK, SIG_UNBLOCK, sigaddset, sigemptyset, sigismember
from posix.time cimport timespec
from posix.types cimport sigset_t

from includes.signal cimport pthread_sigmask, sigtimedwait


cdef inline bint block_sigpipe() noexcept nogil:
    """Block SIGPIPE in this thread; True when this call blocked it (so unblock later)."""
    cdef sigset_t pipe_only, previous
    sigemptyset(&pipe_only)
    sigaddset(&pipe_only, SIGPIPE)
    if pthread_sigmask(SIG_BLOCK, &pipe_only, &previous) != 0:
        return False
    return not sigismember(&previous, SIGPIPE)


cdef inline void unblock_sigpipe() noexcept nogil:
    """Discard the SIGPIPEs our splices raised, then unblock SIGPIPE in this thread."""
    cdef sigset_t pipe_only
    cdef timespec no_wait
    sigemptyset(&pipe_only)
    sigaddset(&pipe_only, SIGPIPE)
    no_wait.tv_sec = 0
    no_wait.tv_nsec = 0
    while sigtimedwait(&pipe_only, NULL, &no_wait) > 0:
        pass
    pthread_sigmask(SIG_UNBLOCK, &pipe_only, NULL)
