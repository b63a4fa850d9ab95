"""The one place that chooses between the compiled hot path and its pure-Python twin.

``fastlb._bridge`` (compiled from ``src/bridge.pyx``) is used when it was built
and ``FASTLB_NO_EXTENSIONS`` is not set to a non-empty value other than ``0``;
otherwise ``fastlb._bridge_py``.  ``IMPLEMENTATION`` says which ("cython" or
"python").  Everything else in fastlb imports the hot path from here.
"""

import os

NO_EXTENSIONS = os.environ.get("FASTLB_NO_EXTENSIONS", "") not in ("", "0")

if NO_EXTENSIONS:
    from fastlb._bridge_py import *  # noqa: F401,F403
    from fastlb._bridge_py import IMPLEMENTATION, __all__  # noqa: F401
else:
    try:
        from fastlb._bridge import *  # noqa: F401,F403
        from fastlb._bridge import IMPLEMENTATION, __all__  # noqa: F401
    except ImportError:
        from fastlb._bridge_py import *  # noqa: F401,F403
        from fastlb._bridge_py import IMPLEMENTATION, __all__  # noqa: F401
