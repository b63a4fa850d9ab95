"""Selection benchmarks: each balancing policy's ``choose`` beside today's ``choose_backend``.

Run with::

    python -m pytest benchmarks/bench_policies.py --benchmark-only

least-loaded runs for every client connection in the default mode, so its
``Policy.choose`` must cost no more than ``fastlb.pool.choose_backend`` did;
the other policies are measured for scale.  The backends are the pool's own
``Backend`` with the attributes the policies read added, so property lookups
(``weight``, ``name``) cost what they cost in fastlb.
"""

from __future__ import annotations

import random

import pytest

from fastlb.policies import POLICIES, Policy
from fastlb.pool import UP, Backend, choose_backend
from fastlb.settings import Address

SIZES = [1, 4, 16]   # backends in the table


class PolicyBackend(Backend):
    """The pool's backend plus the fields the policies read that pool.py does not have yet."""

    __slots__ = ("backup", "rr_current", "reports_load")

    def __init__(self, address: Address, index: int):
        super().__init__(address, index)
        self.backup = False
        self.rr_current = 0
        self.reports_load = True


def table(size: int) -> list:
    rng = random.Random(size)
    backends = [PolicyBackend(Address("10.0.0.%d" % (i + 1), 80, weight=1 + i % 2), i)
                for i in range(size)]
    for backend in backends:
        backend.state = UP
        backend.entries, backend.errors, backend.active = rng.randint(0, 50), rng.randint(0, 2), rng.randint(0, 9)
    return backends


@pytest.mark.parametrize("size", SIZES)
def test_choose_backend_today(benchmark, size):
    benchmark.group = "choose, %d backends" % size
    backends = table(size)
    assert benchmark(choose_backend, backends) is not None


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("name", POLICIES)
def test_policy_choose(benchmark, name, size):
    benchmark.group = "choose, %d backends" % size
    backends = table(size)
    policy = Policy(name, random.Random(1))
    if name == "least-loaded":
        assert policy.choose(backends) is choose_backend(backends)
    assert benchmark(policy.choose, backends, (), "192.0.2.7") is not None
