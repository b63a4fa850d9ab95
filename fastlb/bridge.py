"""The one place that chooses between the compiled hot path and its pure-Python twins.

The compiled twins ``fastlb._bridge`` (relay and parsers, from ``src/bridge.pyx``)
and ``fastlb._engine`` (the relay engine, from ``src/engine.pyx``) are used when
they were built and ``FASTLB_NO_EXTENSIONS`` is not set to a non-empty value
other than ``0``; otherwise ``fastlb._bridge_py`` and ``fastlb._engine_py``.
``IMPLEMENTATION`` says which ("cython" or "python").  Everything else in fastlb
imports the hot path from here.
"""

import importlib
import os

NO_EXTENSIONS = os.environ.get("FASTLB_NO_EXTENSIONS", "") not in ("", "0")


def _load(compiled: str, pure: str):
    if not NO_EXTENSIONS:
        try:
            return importlib.import_module(compiled)
        except ImportError:
            pass
    return importlib.import_module(pure)


_relay_twin = _load("fastlb._bridge", "fastlb._bridge_py")
_engine_twin = _load("fastlb._engine", "fastlb._engine_py")
IMPLEMENTATION = _relay_twin.IMPLEMENTATION
ENGINE_IMPLEMENTATION = "cython" if _engine_twin.__name__ == "fastlb._engine" else "python"
__all__ = list(_relay_twin.__all__) + ["Engine", "ENGINE_IMPLEMENTATION"]
globals().update({name: getattr(_relay_twin, name) for name in _relay_twin.__all__})
Engine = _engine_twin.Engine
