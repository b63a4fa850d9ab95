"""Type stub of fastlb._engine, the compiled twin of fastlb._engine_py (built from src/engine.pyx)."""

import socket
from typing import Any, Optional, Protocol, Sequence, Tuple, Union

TICK: float
ROUTE_WAIT: float
READ_SIZE: int
BUFFER_LIMIT: int
LINGER_SECONDS: float
LINGER_BYTES: int
RESPONSE_500: bytes
ACCEPT_BATCH: int

_Route = Tuple[Any, int, str, int, int]  # (token, family, ip, port, send_proxy version or 0)

class _Router(Protocol):
    def choose(self, tried: Sequence[Any], ticket: Any, addr: Any,
               source: Optional[Tuple[str, int]]) -> Union[_Route, None, bool]: ...
    def connect_failed(self, token: Any, reason: str) -> None: ...
    def finished(self, token: Any, addr: Any, bytes_up: int, bytes_down: int, status: int,
                 end: str, duration: float) -> None: ...

def set_pipe_budget(pipes: int) -> None: ...
def pipes_in_use() -> int: ...
def accept_batch(listener: socket.socket, waker: socket.socket,
                 limit: int = ...) -> list[Tuple[int, Any]]: ...

class Engine:
    """An event loop relaying many client/backend pairs without the GIL."""

    router: _Router
    server_timeout: float
    idle_timeout: float
    client_timeout: float
    connect_timeout: float
    accept_proxy: bool

    def __init__(self, router: _Router, server_timeout: float, idle_timeout: float,
                 client_timeout: float, connect_timeout: float,
                 splice: Optional[bool] = None, accept_proxy: bool = False) -> None: ...
    def add(self, client: Union[int, socket.socket], addr: Any = None, ticket: Any = None) -> None: ...
    @property
    def active(self) -> int: ...
    @property
    def pending(self) -> int: ...
    @property
    def added(self) -> int: ...
    @property
    def closed(self) -> int: ...
    def wake(self) -> None: ...
    def stop(self) -> None: ...
    def set_timeouts(self, server_timeout: float, idle_timeout: float, client_timeout: float,
                     connect_timeout: float) -> None: ...
    def run(self) -> None: ...
