"""The one place that chooses between the compiled hot path and its pure-Python twins.

The compiled twins ``fastlb._bridge`` (relay, parsers and the PROXY protocol
codec, from ``src/bridge.pyx``) and ``fastlb._engine`` (the relay engine, from
``src/engine.pyx``) are used when they were built and ``FASTLB_NO_EXTENSIONS``
is not set to a non-empty value other than ``0``; otherwise ``fastlb._bridge_py``
and ``fastlb._engine_py``, both or neither.  ``IMPLEMENTATION`` says which
("cython" or "python").  Everything else in fastlb imports the hot path from
here.  The imports are written out, as in yarl's ``_quoting.py``, so type
checkers and readers see every name; they read the pure twins, the
specification.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from types import ModuleType
from typing import TYPE_CHECKING

# Read here and nowhere else; tests and tools import it from this module.
NO_EXTENSIONS = os.environ.get("FASTLB_NO_EXTENSIONS", "") not in ("", "0")

__all__ = [
    "NO_EXTENSIONS", "IMPLEMENTATION", "BUFFER_SIZE", "MAX_HEALTH_ANSWER", "MAX_PROXY_HEADER",
    "RelayResult", "parse_status_line", "parse_health_answer", "parse_proxy_header",
    "build_proxy_header", "relay", "Engine", "accept_batch", "set_pipe_budget", "pipes_in_use",
    "ROUTE_WAIT", "Twin",
]

if TYPE_CHECKING or NO_EXTENSIONS:
    from fastlb._bridge_py import (BUFFER_SIZE, IMPLEMENTATION, MAX_HEALTH_ANSWER,
                                   MAX_PROXY_HEADER, RelayResult, build_proxy_header,
                                   parse_health_answer, parse_proxy_header, parse_status_line,
                                   relay)
    from fastlb._engine_py import (ROUTE_WAIT, Engine, accept_batch, pipes_in_use,
                                   set_pipe_budget)
else:
    try:
        # Both compiled twins, or (below) both pure ones: never a mix.
        from fastlb._bridge import (BUFFER_SIZE, IMPLEMENTATION, MAX_HEALTH_ANSWER,
                                    MAX_PROXY_HEADER, RelayResult, build_proxy_header,
                                    parse_health_answer, parse_proxy_header, parse_status_line,
                                    relay)
        from fastlb._engine import (ROUTE_WAIT, Engine, accept_batch, pipes_in_use,
                                    set_pipe_budget)
    except ImportError:  # not built: the pure twins, as announced by IMPLEMENTATION
        from fastlb._bridge_py import (BUFFER_SIZE, IMPLEMENTATION, MAX_HEALTH_ANSWER,
                                       MAX_PROXY_HEADER, RelayResult, build_proxy_header,
                                       parse_health_answer, parse_proxy_header, parse_status_line,
                                       relay)
        from fastlb._engine_py import (ROUTE_WAIT, Engine, accept_batch, pipes_in_use,
                                       set_pipe_budget)


@dataclasses.dataclass(frozen=True)
class Twin:
    """One implementation of the hot path by name, for the tests and benchmarks that run on both.

    The one other way in to a twin module than the imports above: ``bridge``
    and ``engine`` are its two modules, ``env`` the environment that makes a
    child fastlb process load it.
    """

    name: str                       # "python" or "cython"

    @property
    def bridge(self) -> ModuleType:
        return importlib.import_module("fastlb._bridge_py" if self.name == "python" else "fastlb._bridge")

    @property
    def engine(self) -> ModuleType:
        return importlib.import_module("fastlb._engine_py" if self.name == "python" else "fastlb._engine")

    @property
    def env(self) -> dict[str, str]:
        return {"FASTLB_NO_EXTENSIONS": "1" if self.name == "python" else ""}
