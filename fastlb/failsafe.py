"""What a thread does with an exception its loop did not expect: count it, tell once in a while, go on.

Every long-lived thread (accept loop, health checker, admin endpoint, reload,
and the relay engines around each call into the router) catches an unexpected
exception around one iteration of its loop and hands it to ``INTERNAL_ERRORS``,
so one bad moment (a descriptor limit, a bug hit by one odd connection) costs
that iteration, never the thread.  The count, for the whole process, is
``fastlb_internal_errors_total``.
"""

from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger("fastlb")

# At most one log line (with its traceback) per this many seconds.
LOG_EVERY = 10.0


class InternalErrors:
    """A counter of unexpected exceptions, logged with their traceback at most every ``LOG_EVERY`` s."""

    def __init__(self, log_every: float = LOG_EVERY):
        self.count = 0
        self._log_every = log_every
        self._logged = float("-inf")
        self._lock = threading.Lock()

    def record(self, where: str, exc: BaseException) -> None:
        with self._lock:
            self.count += 1
            now = time.monotonic()
            if now - self._logged < self._log_every:
                return
            self._logged = now
            count = self.count
        log.error("internal error in %s (%d so far; it goes on): %s", where, count,
                  exc, exc_info=(type(exc), exc, exc.__traceback__))


# The process's one counter: every thread records into it.
INTERNAL_ERRORS = InternalErrors()
