"""The access log: one line per client connection, written by its own thread.

Workers hand a record to a bounded queue and go on; the writer thread formats
and writes.  Nobody ever waits for the disk: ``record`` drops and counts a
record when the queue is full, ``reopen`` (SIGHUP, so log rotation can move the
file away, as with nginx) and ``close`` only raise a flag and nudge the writer.
The writer survives every error: a failed write (a full disk) or a failed
reopen is counted and logged at most every ``ERROR_LOG_EVERY`` seconds, and it
goes on with the next record (a failed reopen keeps the old file).
"""

from __future__ import annotations

import logging
import queue
import sys
import threading
import time
from typing import Any, Callable, Optional, TextIO

log = logging.getLogger("fastlb")

# Records waiting for the writer; at ~150 bytes a line this is a few MiB.
QUEUE_LIMIT = 65536
# At most one log line about failed writes per this many seconds.
ERROR_LOG_EVERY = 10.0
# How long close() lets the writer finish what is queued.
CLOSE_WAIT = 1.0


# What a worker hands the writer: (start time, client, backend, bytes up,
# bytes down, duration, status, end).
Record = tuple[float, str, str, int, int, float, int, str]


def format_record(record: Record) -> str:
    when, client, backend, bytes_up, bytes_down, duration, status, end = record
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(when))
    return "%s.%03d client=%s backend=%s up=%d down=%d duration=%.4f status=%s end=%s\n" % (
        stamp, int(when % 1 * 1000), client, backend or "-", bytes_up, bytes_down, duration,
        status or "-", end,
    )


class AccessLog:
    """Writes access-log lines to a file, or to stderr for ``-``."""

    def __init__(self, target: str):
        self.target = target
        self._queue: queue.Queue[Optional[Record]] = queue.Queue(QUEUE_LIMIT)
        self.dropped = 0              # records dropped because the writer fell behind
        self.errors = 0               # failed writes and reopens
        self._file = self._open()     # raises OSError at start-up: that is the user's to fix
        self._reopen = threading.Event()
        self._closing = threading.Event()
        self._error_logged = 0.0
        self._thread = threading.Thread(target=self._write, name="fastlb-access-log", daemon=True)
        self._thread.start()

    def _open(self) -> TextIO:
        if self.target == "-":
            return sys.stderr
        return open(self.target, "a", encoding="utf-8", buffering=1 << 16)

    # -- any thread: never blocks --------------------------------------------------

    def record(self, client: str, backend: str, bytes_up: int, bytes_down: int, duration: float,
               status: int, end: str) -> None:
        try:
            self._queue.put_nowait((time.time() - duration, client, backend, bytes_up, bytes_down,
                                    duration, status, end))
        except queue.Full:
            self.dropped += 1

    def reopen(self) -> None:
        self._reopen.set()
        self._nudge()

    def close(self) -> None:
        """Stop the writer once it has written what is queued, waiting at most CLOSE_WAIT."""
        self._closing.set()
        self._nudge()
        self._thread.join(CLOSE_WAIT)

    def _nudge(self) -> None:
        # A full queue wakes the writer anyway: it has records to take.
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass

    # -- the writer thread ------------------------------------------------------------

    def _write(self) -> None:
        reported = 0
        while True:
            item = self._queue.get()
            if item is not None:
                self._guarded(self._file.write, format_record(item))
            if self._reopen.is_set():
                self._reopen.clear()
                self._guarded(self._swap_file)
            if self._queue.empty():
                self._guarded(self._file.flush)
                if self.dropped != reported:
                    log.warning("access log: %d record(s) dropped, the writer fell behind",
                                self.dropped - reported)
                    reported = self.dropped
                if self._closing.is_set():
                    break
        if self._file is not sys.stderr:
            self._guarded(self._file.close)

    def _swap_file(self) -> None:
        """Reopen the target; on failure the old file stays in use."""
        self._guarded(self._file.flush)
        if self._file is sys.stderr:
            return
        fresh = self._open()
        old, self._file = self._file, fresh
        self._guarded(old.close)

    def _guarded(self, action: Callable[..., Any], *args: Any) -> None:
        try:
            action(*args)
        except Exception as exc:   # a full disk, a vanished directory: count, tell, go on
            self.errors += 1
            now = time.monotonic()
            if now - self._error_logged >= ERROR_LOG_EVERY:
                self._error_logged = now
                log.error("access log %s: %s (%d error(s) so far; lines are lost meanwhile)",
                          self.target, getattr(exc, "strerror", None) or exc, self.errors)
