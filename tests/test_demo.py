"""`fastlb demo`, the README's run command: balancing and fail-over in a few seconds."""

from __future__ import annotations

import re
import subprocess
import sys

from conftest import child_env


def test_demo_balances_then_routes_around_the_killed_backend():
    result = subprocess.run([sys.executable, "-m", "fastlb", "demo", "--duration", "4"],
                            capture_output=True, text=True, timeout=60, env=child_env())
    assert result.returncode == 0, result.stdout + result.stderr
    final = re.split(r"s  done\n", result.stdout)[-1]  # the last frame, after the traffic
    rows = dict(re.findall(r"^\s+(backend-\d)\s+(up|down)\b", final, re.M))
    assert rows == {"backend-1": "up", "backend-2": "down", "backend-3": "up"}
    routed = {name: int(n) for name, n in re.findall(r"^\s+(backend-\d)\s+\w+\s+(\d+)", final, re.M)}
    # All three shared the load before the kill; the survivors carried it after.
    assert min(routed.values()) > 0
    assert routed["backend-1"] > routed["backend-2"] and routed["backend-3"] > routed["backend-2"]
    answered = int(re.search(r"answered (\d+), failed (\d+)", final).group(1))
    assert answered > 100
