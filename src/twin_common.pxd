# The C-level definitions both compiled modules share (src/bridge.pyx and
# src/engine.pyx); their Python-level counterparts are in fastlb/_twin_common.py.

from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec

cdef enum SpliceMode:
    # Values as fastlb._twin_common.SPLICE_AUTO / _ALWAYS / _NEVER (splice_mode()).
    SPLICE_AUTO = 0
    SPLICE_ALWAYS = 1
    SPLICE_NEVER = 2


cdef inline double monotonic() noexcept nogil:
    """Seconds on the monotonic clock, as time.monotonic() gives them."""
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9
