"""What a relay engine may ask of fastlb: the ``Router`` protocol both engine twins call.

``fastlb.balancer.PoolRouter`` implements it over the backend table; tests and
benchmarks implement it over a fixed list of ports.  An engine calls it only
from its own thread (the compiled engine with the GIL held, gathering a loop
turn's calls into one GIL section), and every method must return quickly.  A
method that raises costs that one connection, never the engine's loop.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Protocol, Sequence, Tuple, Union

# A backend to connect to: (token, address family, ip, port, PROXY version or 0).
# ``token`` is the router's own handle for the backend, handed back as is.
Route = Tuple[Any, int, str, int, int]


class Router(Protocol):
    def choose(self, tried: Sequence[Any], ticket: Any, client: Any,
               source: Optional[Tuple[str, int]]) -> Union[Route, None, Literal[False]]:
        """The backend for a connection: a Route, None (nothing usable: the client gets the 500)
        or False (park: ask again when woken or ROUTE_WAIT later).

        ``tried`` holds the tokens already tried for this connection, ``ticket``
        what ``Engine.add`` was given (None once the connection stopped waiting
        for a probe round), ``client`` the record given to ``Engine.add``,
        ``source`` the client's address from an accepted PROXY header.
        """

    def connect_failed(self, token: Any, reason: str) -> None:
        """The connect to ``token`` failed (refused, timed out ...); the engine tries the next."""

    def replayed(self, token: Any, reason: str) -> None:
        """``token`` ended the connection before its first answer byte; it is replayed elsewhere."""

    def finished(self, token: Any, client: Any, bytes_up: int, bytes_down: int, status: int,
                 end: str, duration: float) -> None:
        """The connection is over (exactly once per connection); ``token`` None if never routed."""
