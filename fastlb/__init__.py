"""fastlb: a least-loaded TCP load balancer with a compiled, GIL-free relay."""

__version__ = "0.1.0"
