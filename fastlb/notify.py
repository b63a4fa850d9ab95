"""Telling a service manager how fastlb is doing, and taking a listening socket from it.

- ``notify("READY=1")`` once the first probe round is done and clients are
  routed, ``notify("STOPPING=1")`` when draining starts: the sd_notify
  protocol, a datagram to ``$NOTIFY_SOCKET`` (a path, or ``@name`` in the
  abstract namespace), as systemd's ``Type=notify`` expects.  Without the
  variable it does nothing.
- ``inherited_listener()``: the listening socket a service manager passed
  (systemd socket activation: ``LISTEN_FDS``/``LISTEN_PID``, descriptors from
  3).  With it a restart refuses nobody: the socket, and the connections
  waiting in its queue, outlive the process.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Optional

log = logging.getLogger("fastlb")

# The first descriptor a service manager passes (sd_listen_fds).
LISTEN_FDS_START = 3


def notify(state: str) -> bool:
    """Send ``state`` (``READY=1``, ``STOPPING=1`` ...) to $NOTIFY_SOCKET; False when there is none."""
    target = os.environ.get("NOTIFY_SOCKET", "")
    if not target:
        return False
    address = "\0" + target[1:] if target.startswith("@") else target
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), address)
        return True
    except OSError as exc:
        log.warning("cannot notify the service manager at %s: %s", target, exc.strerror or exc)
        return False


def inherited_listener() -> Optional[socket.socket]:
    """The TCP listening socket passed by a service manager, if any (the first of LISTEN_FDS)."""
    if os.environ.get("LISTEN_PID", "") != str(os.getpid()):
        return None
    try:
        count = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return None
    # Passed once: a child we start must not take them for its own.
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    if count < 1:
        return None
    sock = socket.socket(fileno=LISTEN_FDS_START)
    if sock.type != socket.SOCK_STREAM or not sock.getsockopt(socket.SOL_SOCKET,
                                                              socket.SO_ACCEPTCONN):
        sock.detach()
        raise OSError(0, "the descriptor passed in LISTEN_FDS is not a listening TCP socket")
    return sock
