"""End to end when the network misbehaves, not a process (issue 11 item 12).

A backend host lives in a network namespace of this test's own (``tests/netns.py``)
and its path is broken under a real fastlb: packets silently dropped, a slow or
lossy link, a partition in the middle of an answer.  The other backend, when
there is one, is a plain ``fastlb.backend`` on 127.0.0.1.  Each test asserts what
a client and an operator would see; the only timings asserted are generous
bounds that prove which mechanism acted (a connect timeout, an idle timeout, a
rate limit).  What these kernels cannot do (netem delay) is in docs/network-faults.md.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time

import pytest

from conftest import body_of, free_port, http_get, status_of, wait_until
from netns import IP, HostNamespace, missing_privilege
from test_e2e import MiB, make_dir, put, sha, who
from test_operations import stats


@pytest.fixture
def netns(tmp_path):
    """Make ``HostNamespace``s that are torn down when the test ends, however it ends."""
    reason = missing_privilege()
    if reason:
        pytest.skip(reason)
    made: list[HostNamespace] = []

    def make() -> HostNamespace:
        host = HostNamespace(tmp_path)
        made.append(host)
        return host

    yield make
    for host in made:
        host.close()


def state_line(name: str, state: str, reason: str = "") -> str:
    return r"backend %s is %s \(was \w+\): [^\n]*%s" % (re.escape(name), state, reason)


def row(admin: int, name: str) -> dict:
    return next(b for b in stats(admin)["backends"] if b["backend"] == name)


def timed_get(port: int, path: str, timeout: float = 60.0) -> tuple[bytes, float]:
    started = time.monotonic()
    response = http_get(port, path, timeout=timeout)
    elapsed = time.monotonic() - started
    assert status_of(response) == 200, response[:200]
    return body_of(response), elapsed


def test_host_namespace_leaves_no_namespace_or_link_behind(netns):
    host = netns()
    assert host.name in subprocess.run([IP, "netns", "list"], capture_output=True, text=True).stdout
    host.close()
    assert host.name not in subprocess.run([IP, "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run([IP, "-o", "link", "show"], capture_output=True, text=True).stdout
    assert host.outer not in links
