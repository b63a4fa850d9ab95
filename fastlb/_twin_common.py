"""What both twins of the hot path share, written once: imported by the pure twins and by the compiled ones.

Like aiohttp's ``_http_parser.pyx``, which imports its shared definitions from
pure modules: a result type, the words fastlb uses for a failed connect, and
the reading of the ``splice`` argument.  The C-level counterparts (the
splice-mode enum, the monotonic clock) are in ``src/twin_common.pxd``.
"""

from __future__ import annotations

import collections
import errno
from typing import Optional

RelayResult = collections.namedtuple(
    "RelayResult", "bytes_up bytes_down up_end down_end end status", module="fastlb.bridge"
)
RelayResult.__doc__ = """How one relay ended.

bytes_up     bytes passed client -> backend
bytes_down   bytes passed backend -> client
up_end       how client -> backend ended: "eof", "error" or "open"
down_end     how backend -> client ended: "eof", "error" or "open"
end          why the relay returned: "done" (both directions reached EOF),
             "server_timeout" (no byte from the backend within server_timeout
             of the last byte sent to it, before any byte reached the client),
             "idle_timeout", "client_error" or "server_error"
status       status code of the first response passed to the client, 0 when
             the backend's first bytes were not an HTTP/1.x status line
"""

# How bulk bytes move (the ``splice`` argument of relay and Engine), with the
# values of src/twin_common.pxd's SpliceMode.
SPLICE_AUTO, SPLICE_ALWAYS, SPLICE_NEVER = 0, 1, 2


def splice_mode(splice: Optional[bool]) -> int:
    """None: automatic (splice(2) once a direction carried 1 MiB in full reads); True: always; False: never."""
    return SPLICE_AUTO if splice is None else SPLICE_ALWAYS if splice else SPLICE_NEVER


def connect_reason(code: int) -> str:
    """Why a connect failed, as the log and the stats page say it."""
    if code == errno.ECONNREFUSED:
        return "connection refused"
    if code == errno.ETIMEDOUT:
        return "connect timeout"
    return "connect failed: %s" % errno.errorcode.get(code, str(code))
