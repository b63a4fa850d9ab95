"""Waking a thread that waits in a selector or ``poll``, from any other thread."""

from __future__ import annotations

import socket


class Waker:
    """A socket pair whose read end a waiting thread watches; ``wake`` makes it readable.

    At most one byte is in flight: a ``wake`` before the waiting thread has
    called ``drain`` writes nothing (each write is a system call, and under
    load the callers wake the same thread many times per turn).  The waiting
    thread calls ``drain`` and only then reads whatever flags the wakers set,
    so a ``wake`` that wrote nothing is still seen.  ``fileno`` is the read end
    (what to watch); ``write_fd`` the write end, for ``signal.set_wakeup_fd``.
    """

    def __init__(self) -> None:
        self._reader, self._writer = socket.socketpair()
        self._reader.setblocking(False)
        self._writer.setblocking(False)
        self._pending = False

    def fileno(self) -> int:
        return self._reader.fileno()

    @property
    def write_fd(self) -> int:
        return self._writer.fileno()

    def wake(self) -> None:
        if self._pending:
            return
        self._pending = True
        try:
            self._writer.send(b"\0")
        except OSError:
            pass  # a byte is already waiting, or we are closing

    def drain(self) -> None:
        try:
            while self._reader.recv(4096):
                pass
        except OSError:
            pass
        self._pending = False

    def close(self) -> None:
        self._reader.close()
        self._writer.close()
