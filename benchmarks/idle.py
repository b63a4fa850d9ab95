"""Normal requests through fastlb while thousands of idle clients hold connections open.

    python benchmarks/idle.py [--idle 10000] [--requests 500] [--rounds 3] [--twins cython,python]

The relay-engine issue asks that 10,000 idle connections held open never delay a
normal request by more than a few milliseconds.  This starts two backends (nginx
when installed, else ``fastlb-backend``, as ``compare.py`` does) and fastlb in front
of them; then, in each round and for each twin, it times ``--requests`` sequential
requests (a new connection each, ``Connection: close``: the path that goes through
the accept loop and an engine's pick-up every time) with no idle client, opens
``--idle`` client connections that send nothing, checks on the admin endpoint that
fastlb holds them all, times the same requests again, and closes the idle clients.
It prints the medians over the rounds of p50, p99 and the slowest request, with and
without the idle clients, and the difference.

An idle client costs fastlb one descriptor (it never reaches a backend: SPEC §4's
first-byte rule), so fastlb runs with ``--max-connections`` above the idle count
and ``--client-timeout`` long enough to keep them through a round.  Only
127.0.0.1 is used; nothing is installed.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import compare  # noqa: E402  (the backends, ports and HTTP helpers)


def request(port: int) -> float:
    """One GET /100b on a fresh connection; its latency in seconds."""
    started = time.perf_counter()
    data = compare.get(port, "/100b")
    if not data.startswith(b"HTTP/1.1 200"):
        raise RuntimeError("unexpected answer: %r" % data[:80])
    return time.perf_counter() - started


def timings(port: int, count: int) -> dict:
    samples = sorted(request(port) for _ in range(count))
    return {"p50": samples[len(samples) // 2],
            "p99": samples[min(len(samples) - 1, int(len(samples) * 0.99))], "max": samples[-1]}


def open_idle(port: int, count: int) -> list:
    """``count`` connected clients that send nothing."""
    return [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(count)]


def inflight(admin_port: int) -> int:
    data = compare.get(admin_port, "/stats.json")
    return json.loads(data.split(b"\r\n\r\n", 1)[1])["inflight"]


def wait_inflight(admin_port: int, at_least: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while inflight(admin_port) < at_least:
        if time.monotonic() > deadline:
            raise RuntimeError("fastlb did not take %d idle clients within %gs" % (at_least, timeout))
        time.sleep(0.05)


def start_fastlb(twin: str, port: int, admin_port: int, backends, idle: int) -> subprocess.Popen:
    env = compare._env({"FASTLB_NO_EXTENSIONS": "1" if twin == "python" else ""})
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastlb", "--bind", "127.0.0.1", "--log-level", "warning",
         "--admin", str(admin_port), "--max-connections", str(idle + 1000),
         "--client-timeout", "600", str(port)] + [str(p) for p in backends.ports],
        env=env, stderr=subprocess.DEVNULL)
    compare.wait_port(port)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            request(port)
            return proc
        except (OSError, RuntimeError):
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("fastlb (%s) did not serve within 15 s" % twin)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--idle", type=int, default=10000)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--twins", default="cython,python")
    args = parser.parse_args(argv)
    limit = compare.raise_fd_limit()
    if limit < args.idle + 200:
        print("the open-file limit (%d) is too low for %d idle clients" % (limit, args.idle),
              file=sys.stderr)
        return 2
    twins = [t for t in args.twins.split(",") if t]
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="fastlb-idle-") as tmp:
        backends = compare.Backends(Path(tmp))
        print("backends: %s on %s; %d idle clients; %d requests per measurement; %d round(s)"
              % (backends.kind, backends.ports, args.idle, args.requests, args.rounds), flush=True)
        try:
            for round_number in range(1, args.rounds + 1):
                for twin in twins:
                    port, admin_port = compare.free_port(), compare.free_port()
                    proc = start_fastlb(twin, port, admin_port, backends, args.idle)
                    try:
                        quiet = timings(port, args.requests)
                        clients = open_idle(port, args.idle)
                        try:
                            wait_inflight(admin_port, args.idle)
                            busy = timings(port, args.requests)
                            held = inflight(admin_port)
                        finally:
                            for sock in clients:
                                sock.close()
                    finally:
                        compare.stop_process(proc)
                    results.setdefault(twin, []).append((quiet, busy))
                    print("round %d %-7s  no idle: p50 %.2f ms p99 %.2f ms max %.2f ms   "
                          "%d idle held: p50 %.2f ms p99 %.2f ms max %.2f ms"
                          % (round_number, twin, quiet["p50"] * 1e3, quiet["p99"] * 1e3,
                             quiet["max"] * 1e3, held, busy["p50"] * 1e3, busy["p99"] * 1e3,
                             busy["max"] * 1e3), flush=True)
        finally:
            backends.stop()
    print()
    print("| twin | idle clients | p50 | p99 | slowest | p50 added | p99 added |")
    print("|---|---|---|---|---|---|---|")
    for twin in twins:
        runs = results[twin]
        for label, index in (("0", 0), ("%d" % args.idle, 1)):
            med = {k: statistics.median(r[index][k] for r in runs) * 1e3 for k in ("p50", "p99", "max")}
            if index == 0:
                base = med
                added = ("", "")
            else:
                added = ("%+.2f ms" % (med["p50"] - base["p50"]), "%+.2f ms" % (med["p99"] - base["p99"]))
            print("| %s | %s | %.2f ms | %.2f ms | %.2f ms | %s | %s |"
                  % (twin, label, med["p50"], med["p99"], med["max"], added[0], added[1]))
    print()
    print("Command: python benchmarks/idle.py --idle %d --requests %d --rounds %d --twins %s"
          % (args.idle, args.requests, args.rounds, ",".join(twins)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
