"""The access log: one line per client connection, written by its own thread.

Workers hand a record to a bounded queue and go on; the writer thread formats
and writes.  A worker never waits for the disk: when the queue is full the
record is dropped and counted, and the count is logged.  ``reopen`` (called on
SIGHUP) lets log rotation move the file away, as with nginx.
"""

from __future__ import annotations

import logging
import queue
import sys
import threading
import time

log = logging.getLogger("fastlb")

# Records waiting for the writer; at ~150 bytes a line this is a few MiB.
QUEUE_LIMIT = 65536


def format_record(record: tuple) -> str:
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
        self._queue: queue.Queue = queue.Queue(QUEUE_LIMIT)
        self.dropped = 0
        self._file = self._open()
        self._reopen = threading.Event()
        self._thread = threading.Thread(target=self._write, name="fastlb-access-log", daemon=True)
        self._thread.start()

    def _open(self):
        if self.target == "-":
            return sys.stderr
        return open(self.target, "a", encoding="utf-8", buffering=1 << 16)

    def record(self, client: str, backend: str, bytes_up: int, bytes_down: int, duration: float,
               status: int, end: str) -> None:
        try:
            self._queue.put_nowait((time.time() - duration, client, backend, bytes_up, bytes_down,
                                    duration, status, end))
        except queue.Full:
            self.dropped += 1

    def reopen(self) -> None:
        self._reopen.set()
        self._queue.put(None)

    def close(self) -> None:
        self._queue.put(False)
        self._thread.join(5)

    def _write(self) -> None:
        reported = 0
        while True:
            item = self._queue.get()
            if item is False:
                break
            if item is not None:
                self._file.write(format_record(item))
            if self._reopen.is_set():
                self._reopen.clear()
                self._file.flush()
                if self._file is not sys.stderr:
                    self._file.close()
                    self._file = self._open()
            if self._queue.empty():
                self._file.flush()
                if self.dropped != reported:
                    log.warning("access log: %d record(s) dropped, the writer fell behind",
                                self.dropped - reported)
                    reported = self.dropped
        self._file.flush()
        if self._file is not sys.stderr:
            self._file.close()
