"""Hot-path benchmarks: the compiled twin against the pure-Python one, side by side.

Run with::

    python -m pytest benchmarks/bench_bridge.py --benchmark-only

Every benchmark is parametrized over both twins, so one run measures both on
the same machine state; benchmarks/conftest.py prints the medians and the
compiled/python ratios at the end.

The relays run in this process, in threads, as in fastlb.  The traffic comes
from separate load-generator processes (a client and a backend process per
relayed connection), so that this process's GIL holds nothing but the relays:
that is what makes the GIL release visible.  Besides wall-clock figures, the
relay benchmarks report the CPU time the relay threads used, which is the
relay's own cost and much less sensitive to scheduling noise.

On a noisy machine, sequential benchmarks drift; running this file as a script
interleaves the variants round by round instead::

    PYTHONPATH=. python benchmarks/bench_bridge.py bulk|ping-pong|ping-pong-4 [ROUNDS]
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import threading
import time

import pytest

from fastlb.bridge import NO_EXTENSIONS, Twin

SMALL_MESSAGE = 100            # bytes per request and per response
ROUND_TRIPS = 2000             # request/response pairs per connection per round
BULK_BYTES = 64 * 1024 * 1024  # one bulk transfer, backend -> client
ROUNDS = 9                     # timed rounds per relay benchmark, after one warm-up round
WAIT = 60.0

STATUS_LINE = b"HTTP/1.1 200 OK\r\n"
HEALTH_ANSWER = (b"HTTP/1.1 200 OK\r\nServer: fastlb-backend\r\nContent-Type: text/plain\r\n"
                 b"Content-Length: 8\r\nConnection: close\r\n\r\n12\n3456\n")


def twin(name):
    if name == "cython" and NO_EXTENSIONS:
        pytest.skip("FASTLB_NO_EXTENSIONS is set")
    return Twin(name).bridge


TWINS = ["python", "cython"]
# (twin, splice argument) pairs: the Python twin always copies.
RELAY_MODES = [
    pytest.param("python", None, id="python"),
    pytest.param("cython", None, id="cython-auto"),
    pytest.param("cython", False, id="cython-copy"),
    pytest.param("cython", True, id="cython-splice"),
]


# -- load generator (separate processes) ---------------------------------------

def _recv_exactly(sock, buf, n):
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:n])
        if not k:
            raise EOFError("EOF after %d of %d bytes" % (got, n))
        got += k


def load_generator(role, address, control):
    """One end of one relayed connection: the client ("U") or the backend ("B").

    Each end is its own process, so neither waits for the other's GIL, nor for
    the relays'.  The backend echoes what it receives and sends bulk data on
    command; the client runs request/response exchanges or receives bulk data.
    """
    sock = socket.create_connection(address)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(role)
    buf = bytearray(1 << 20)
    if role == b"B":
        bulk = memoryview(b"HTTP/1.1 200 OK\r\n\r\n" + os.urandom(1 << 20) * (BULK_BYTES >> 20))
        threading.Thread(target=_echo_until_eof, args=(sock, buf), daemon=True).start()
    control.send("ready")
    while True:
        command, count = control.recv()
        if command == "ping-pong":
            message = b"m" * SMALL_MESSAGE
            for _ in range(count):
                sock.sendall(message)
                _recv_exactly(sock, buf, SMALL_MESSAGE)
        elif command == "bulk" and role == b"B":
            sock.sendall(bulk[:count])
        elif command == "bulk":
            _recv_exactly(sock, buf, count) if count <= len(buf) else _drain(sock, buf, count)
        elif command == "close":
            sock.close()
            control.send("closed")
            return
        control.send("done")


def _echo_until_eof(sock, buf):
    """The backend's answer to each request: the same bytes back (runs alone in its thread)."""
    try:
        while True:
            n = sock.recv_into(buf)
            if not n:
                return
            sock.sendall(memoryview(buf)[:n])
    except OSError:
        return


def _drain(sock, buf, count):
    got = 0
    while got < count:
        n = sock.recv_into(buf, min(len(buf), count - got))
        if not n:
            raise EOFError("EOF after %d of %d bytes" % (got, count))
        got += n


class Connections:
    """``count`` relayed connections: relay threads here, client and backend processes elsewhere."""

    def __init__(self, bridge, count, splice=None):
        context = multiprocessing.get_context("spawn")
        listener = socket.create_server(("127.0.0.1", 0), backlog=2 * count)
        listener.settimeout(WAIT)
        self.ends, self.processes, self.relays = [], [], []
        for _ in range(count):
            ends, socks = {}, {}
            for role in (b"U", b"B"):
                parent, child = context.Pipe()
                process = context.Process(target=load_generator,
                                          args=(role, listener.getsockname(), child), daemon=True)
                process.start()
                self.processes.append(process)
                ends[role] = parent
                sock, _ = listener.accept()
                sock.settimeout(WAIT)
                assert sock.recv(1) == role
                sock.settimeout(None)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                socks[role] = sock
                assert parent.poll(WAIT) and parent.recv() == "ready"
            relay = threading.Thread(target=bridge.relay, args=(socks[b"U"], socks[b"B"], WAIT, WAIT),
                                     kwargs={"splice": splice}, daemon=True)
            relay.start()
            self.ends.append(ends)
            self.relays.append((relay, socks))
        listener.close()

    def relay_cpu_seconds(self):
        """CPU time the relay threads have used so far (user + system)."""
        return sum(time.clock_gettime(time.pthread_getcpuclockid(relay.ident))
                   for relay, _ in self.relays)

    def run(self, command, count):
        """Run one command on every connection at once; return when all are done."""
        roles = (b"U", b"B") if command == "bulk" else (b"U",)
        controls = [ends[role] for ends in self.ends for role in roles]
        for control in controls:
            control.send((command, count))
        for control in controls:
            assert control.poll(WAIT), "load generator did not finish %s within %gs" % (command, WAIT)
            assert control.recv() == "done"

    def close(self):
        controls = [control for ends in self.ends for control in ends.values()]
        for control in controls:
            control.send(("close", 0))
        for control in controls:
            control.poll(WAIT) and control.recv()
        for process in self.processes:
            process.join(WAIT)
        for relay, socks in self.relays:
            relay.join(WAIT)
            for sock in socks.values():
                sock.close()


# -- parsers ------------------------------------------------------------------

@pytest.mark.benchmark(group="parse_status_line")
@pytest.mark.parametrize("name", TWINS)
def test_parse_status_line(benchmark, name, report):
    parse = twin(name).parse_status_line
    assert benchmark(parse, STATUS_LINE) == 200
    report("parse_status_line", name, "ns/op", 1e9 * benchmark.stats.stats.median, lower_is_better=True)


@pytest.mark.benchmark(group="parse_health_answer")
@pytest.mark.parametrize("name", TWINS)
def test_parse_health_answer(benchmark, name, report):
    parse = twin(name).parse_health_answer
    assert benchmark(parse, HEALTH_ANSWER, True) == (12, 3456)
    report("parse_health_answer", name, "ns/op", 1e9 * benchmark.stats.stats.median, lower_is_better=True)


# -- relay --------------------------------------------------------------------

def measure_relay(benchmark, connections, command, count):
    """Benchmark one command over all connections; also return the relays' median CPU seconds per round."""
    cpu = []

    def one_round():
        before = connections.relay_cpu_seconds()
        connections.run(command, count)
        cpu.append(connections.relay_cpu_seconds() - before)

    try:
        benchmark.pedantic(one_round, rounds=ROUNDS, warmup_rounds=1)
    finally:
        connections.close()
    cpu = sorted(cpu[1:])  # the first was the warm-up
    return cpu[len(cpu) // 2]


@pytest.mark.benchmark(group="relay 64 MiB")
@pytest.mark.parametrize("name, splice", RELAY_MODES)
def test_relay_bulk_transfer(benchmark, name, splice, report):
    cpu = measure_relay(benchmark, Connections(twin(name), 1, splice), "bulk", BULK_BYTES)
    label = _label(name, splice)
    report("relay 64 MiB", label, "MB/s", BULK_BYTES / 1e6 / benchmark.stats.stats.median)
    report("relay 64 MiB, relay CPU", label, "ms", 1e3 * cpu, lower_is_better=True)


@pytest.mark.benchmark(group="relay round trips, 1 connection")
@pytest.mark.parametrize("name, splice", RELAY_MODES)
def test_relay_small_round_trips(benchmark, name, splice, report):
    cpu = measure_relay(benchmark, Connections(twin(name), 1, splice), "ping-pong", ROUND_TRIPS)
    label = _label(name, splice)
    report("round trips, 1 relay", label, "round trips/s", ROUND_TRIPS / benchmark.stats.stats.median)
    report("1 relay, relay CPU", label, "us/round trip", 1e6 * cpu / ROUND_TRIPS, lower_is_better=True)


@pytest.mark.benchmark(group="relay round trips, 4 connections in 4 threads")
@pytest.mark.parametrize("name", TWINS)
def test_relay_small_round_trips_4_threads(benchmark, name, report):
    cpu = measure_relay(benchmark, Connections(twin(name), 4), "ping-pong", ROUND_TRIPS)
    report("round trips, 4 relays", name, "round trips/s", 4 * ROUND_TRIPS / benchmark.stats.stats.median)
    report("4 relays, relay CPU", name, "us/round trip", 1e6 * cpu / (4 * ROUND_TRIPS),
           lower_is_better=True)


def _label(name, splice):
    if name == "python":
        return "python"
    return "cython-" + {None: "auto", True: "splice", False: "copy"}[splice]


# -- interleaved comparison (python benchmarks/bench_bridge.py ...) ------------

def interleaved(case, rounds):
    """Run every twin/splice variant of one case round-robin; print medians and speed-ups."""
    import statistics

    count = 4 if case == "ping-pong-4" else 1
    command, amount = ("bulk", BULK_BYTES) if case == "bulk" else ("ping-pong", ROUND_TRIPS)
    modules = {name: Twin(name).bridge for name in ("python", "cython")}
    modes = [p.values for p in RELAY_MODES]
    if count > 1:
        modes = [("python", None), ("cython", None)]
    variants = {_label(name, splice): Connections(modules[name], count, splice) for name, splice in modes}
    wall = {label: [] for label in variants}
    cpu = {label: [] for label in variants}
    try:
        for connections in variants.values():
            connections.run(command, amount)  # warm-up
        for _ in range(rounds):
            for label, connections in variants.items():
                before, start = connections.relay_cpu_seconds(), time.perf_counter()
                connections.run(command, amount)
                wall[label].append(time.perf_counter() - start)
                cpu[label].append(connections.relay_cpu_seconds() - before)
    finally:
        for connections in variants.values():
            connections.close()
    units = count * amount
    unit, scale = ("MB/s", 1e6) if case == "bulk" else ("round trips/s", 1.0)
    cpu_unit, cpu_scale = ("relay CPU ms", 1e3) if case == "bulk" else ("relay CPU us/round trip", 1e6 / units)
    base = None
    print("%s, %d interleaved rounds: medians" % (case, rounds))
    for label in variants:
        rate = units / scale / statistics.median(wall[label])
        used = cpu_scale * statistics.median(cpu[label])
        if base is None:
            base = (rate, used)
            ratios = ""
        else:
            ratios = "  (%.2fx, CPU %.2fx)" % (rate / base[0], base[1] / used)
        print("  %-14s %10.1f %s  %8.1f %s%s" % (label, rate, unit, used, cpu_unit, ratios))


if __name__ == "__main__":
    import sys

    interleaved(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 15)
