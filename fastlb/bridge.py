"""The one place that chooses between the compiled hot path and its pure-Python twins.

The compiled twins ``fastlb._bridge`` (relay and parsers, from ``src/bridge.pyx``)
and ``fastlb._engine`` (the relay engine, from ``src/engine.pyx``) are used when
they were built and ``FASTLB_NO_EXTENSIONS`` is not set to a non-empty value
other than ``0``; otherwise ``fastlb._bridge_py`` and ``fastlb._engine_py``.
``IMPLEMENTATION`` says which ("cython" or "python").  Everything else in fastlb
imports the hot path from here.
"""

import os

NO_EXTENSIONS = os.environ.get("FASTLB_NO_EXTENSIONS", "") not in ("", "0")


def _load_twins():
    """Both compiled twins, or both pure ones: never a mix."""
    if not NO_EXTENSIONS:
        try:
            from fastlb import _bridge, _engine

            return _bridge, _engine
        except ImportError:
            pass
    from fastlb import _bridge_py, _engine_py

    return _bridge_py, _engine_py


_relay_twin, _engine_twin = _load_twins()
IMPLEMENTATION = _relay_twin.IMPLEMENTATION
__all__ = list(_relay_twin.__all__) + ["Engine", "accept_batch", "set_pipe_budget", "pipes_in_use",
                                       "ROUTE_WAIT"]
globals().update({name: getattr(_relay_twin, name) for name in _relay_twin.__all__})
Engine = _engine_twin.Engine
accept_batch = _engine_twin.accept_batch
set_pipe_budget = _engine_twin.set_pipe_budget
pipes_in_use = _engine_twin.pipes_in_use
ROUTE_WAIT = _engine_twin.ROUTE_WAIT
