"""Type stub of fastlb._bridge, the compiled twin of fastlb._bridge_py (built from src/bridge.pyx)."""

import socket
from typing import Literal, NamedTuple, Optional, Tuple, Union

__all__ = [
    "IMPLEMENTATION",
    "BUFFER_SIZE",
    "MAX_HEALTH_ANSWER",
    "MAX_PROXY_HEADER",
    "RelayResult",
    "parse_status_line",
    "parse_health_answer",
    "parse_proxy_header",
    "build_proxy_header",
    "relay",
]

_BytesLike = Union[bytes, bytearray, memoryview]
_DirectionEnd = Literal["eof", "error", "open"]
_RelayEnd = Literal["done", "server_timeout", "idle_timeout", "client_error", "server_error"]
_Endpoint = Tuple[str, int]

IMPLEMENTATION: Literal["cython"]
BUFFER_SIZE: int
MAX_HEALTH_ANSWER: int
MAX_PROXY_HEADER: int

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
def parse_proxy_header(
    data: _BytesLike,
) -> Optional[Tuple[int, Optional[_Endpoint], Optional[_Endpoint]]]: ...
def build_proxy_header(
    version: int, source: Optional[_Endpoint], destination: Optional[_Endpoint]
) -> bytes: ...
def relay(
    client: socket.socket,
    server: socket.socket,
    server_timeout: float,
    idle_timeout: float,
    splice: Optional[bool] = None,
) -> RelayResult: ...
