"""fastlb: a TCP load balancer with health checks, balancing policies and a compiled, GIL-free relay.

``fastlb.serve(backends, ...)`` starts one inside a Python program (``fastlb.embed``).
"""

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    # Lazily: importing fastlb (for its settings, say) must not start loading the hot path.
    if name in ("serve", "Served"):
        from fastlb import embed

        return getattr(embed, name)
    raise AttributeError("module 'fastlb' has no attribute %r" % name)
