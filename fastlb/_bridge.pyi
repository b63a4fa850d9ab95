"""Type stub of fastlb._bridge, the compiled twin of fastlb._bridge_py (built from src/bridge.pyx)."""

import socket
from typing import Literal, NamedTuple, Optional, Tuple, Union

__all__ = [
    "IMPLEMENTATION",
    "BUFFER_SIZE",
    "MAX_HEALTH_ANSWER",
    "RelayResult",
    "parse_status_line",
    "parse_health_answer",
    "relay",
]

_BytesLike = Union[bytes, bytearray, memoryview]
_DirectionEnd = Literal["eof", "error", "open"]
_RelayEnd = Literal["done", "server_timeout", "idle_timeout", "client_error", "server_error"]

IMPLEMENTATION: Literal["cython"]
BUFFER_SIZE: int
MAX_HEALTH_ANSWER: int

class RelayResult(NamedTuple):
    """How one relay ended."""

    bytes_up: int
    bytes_down: int
    up_end: _DirectionEnd
    down_end: _DirectionEnd
    end: _RelayEnd
    status: int

def parse_status_line(data: _BytesLike) -> int: ...
def parse_health_answer(data: _BytesLike, at_eof: bool) -> Optional[Tuple[int, int]]: ...
def relay(
    client: socket.socket,
    server: socket.socket,
    server_timeout: float,
    idle_timeout: float,
    splice: Optional[bool] = None,
) -> RelayResult: ...
