"""Relay-engine benchmarks: the compiled engine against the pure-Python one, side by side.

Run with::

    python -m pytest benchmarks/bench_engine.py --benchmark-only

Every benchmark is parametrized over both twins (``fastlb._engine`` and
``fastlb._engine_py``), so one run measures both on the same machine state;
benchmarks/conftest.py prints the medians and compiled/python ratios at the end.

The engines run in threads of this process, as in fastlb, fed by an accept
thread that takes clients in batches with the twin's ``accept_batch`` and hands
each to the least busy engine (as the balancer's accept loop does).  Clients and backends are separate load-generator
processes, so this process's GIL holds nothing but the engines and the accept
loop.  Besides wall-clock rates, each case reports the CPU time the engine
threads used (``pthread_getcpuclockid``), which is the engine's own cost and
much less sensitive to scheduling noise than a rate on a shared machine.

Cases:

- keep-alive: 32 connections, each doing request/response round trips of
  100-byte messages (the backend echoes), through one engine, and through
  4 engines in 4 threads;
- connections: connect, send 100 bytes, receive the echo, close; 32 at a
  time, through one engine (the accept thread's CPU is reported apart: its
  ``accept_batch`` is the twin's, the rest the same Python);
- bulk: one 64 MiB download through one engine, per splice mode.

On a noisy machine sequential benchmarks drift; running this file as a script
interleaves the variants round by round instead::

    PYTHONPATH=. python benchmarks/bench_engine.py keep-alive|keep-alive-4|connections|bulk [ROUNDS]
"""

from __future__ import annotations

import multiprocessing
import os
import selectors
import socket
import statistics
import threading
import time

import pytest

from fastlb.bridge import NO_EXTENSIONS, Twin
from fastlb.waker import Waker

MESSAGE = 100                  # bytes per request and per response
CONNECTIONS = 32               # concurrent client connections
CLIENT_PROCESSES = 4           # ... driven by this many processes
BACKEND_PROCESSES = 2          # echo backends, connections alternate between them
ROUND_TRIPS = 250              # per keep-alive connection per round
NEW_CONNECTIONS = 1000         # connect-send-receive-close per round, all clients together
BULK_BYTES = 64 * 1024 * 1024
ROUNDS = 7                     # timed rounds per benchmark, after one warm-up round
WAIT = 60.0

TWINS = ["python", "cython"]
BULK_MODES = [
    pytest.param("python", None, id="python"),
    pytest.param("cython", None, id="cython-auto"),
    pytest.param("cython", False, id="cython-copy"),
    pytest.param("cython", True, id="cython-splice"),
]


def twin(name):
    if name == "cython" and NO_EXTENSIONS:
        pytest.skip("FASTLB_NO_EXTENSIONS is set")
    return Twin(name).engine


# -- load generators (separate processes) ------------------------------------------

def backend_main(control, bulk_bytes):
    """An echo backend (selectors), or with bulk_bytes a backend answering each request with that many bytes."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=1024)
    control.send(listener.getsockname()[1])
    if bulk_bytes:
        body = memoryview(b"HTTP/1.1 200 OK\r\n\r\n" + os.urandom(1 << 20) * (bulk_bytes >> 20))
        while True:
            conn, _ = listener.accept()
            threading.Thread(target=_serve_bulk, args=(conn, body), daemon=True).start()
    listener.setblocking(False)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    while True:
        for key, _ in selector.select():
            sock = key.fileobj
            if sock is listener:
                try:
                    conn, _ = listener.accept()
                except BlockingIOError:
                    continue
                conn.setblocking(False)
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                selector.register(conn, selectors.EVENT_READ)
                continue
            try:
                data = sock.recv(65536)
                if data:
                    sock.sendall(data)  # 100-byte echoes always fit the socket buffer
                    continue
            except OSError:
                pass
            selector.unregister(sock)
            sock.close()


def _serve_bulk(conn, body):
    with conn:
        try:
            while conn.recv(65536):
                conn.sendall(body)
        except OSError:
            pass


def client_main(control, address, count, bulk):
    """``count`` client connections: keep-alive round trips, new connections, or bulk downloads."""
    message = b"m" * MESSAGE
    conns = []
    for _ in range(count):
        sock = socket.create_connection(address)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conns.append(sock)
    for sock in conns if not bulk else ():  # routed and relaying before the first timed round
        sock.sendall(message)
        _recv_exactly(sock, MESSAGE)
    control.send("ready")
    while True:
        command, amount = control.recv()
        if command == "keep-alive":
            _round_trips(conns, message, amount)
        elif command == "connections":
            _new_connections(address, count, message, amount)
        elif command == "bulk":
            conns[0].sendall(b"GET")
            _recv_exactly(conns[0], amount + len(b"HTTP/1.1 200 OK\r\n\r\n"))
        elif command == "close":
            for sock in conns:
                sock.close()
            control.send("closed")
            return
        control.send("done")


def _recv_exactly(sock, n):
    buf = bytearray(min(n, 1 << 20))
    got = 0
    while got < n:
        k = sock.recv_into(buf, min(len(buf), n - got))
        if not k:
            raise EOFError("EOF after %d of %d bytes" % (got, n))
        got += k


def _round_trips(conns, message, per_connection):
    """Every connection sends, waits for its echo, sends again: all in flight at once."""
    selector = selectors.DefaultSelector()
    left = {}
    for sock in conns:
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
        left[sock] = [per_connection, 0]   # round trips to go, bytes of the echo received
        sock.send(message)
    busy = len(conns)
    while busy:
        for key, _ in selector.select():
            sock = key.fileobj
            state = left[sock]
            state[1] += len(sock.recv(65536))
            if state[1] < MESSAGE:
                continue
            state[0] -= 1
            state[1] = 0
            if state[0]:
                sock.send(message)
            else:
                busy -= 1
    for sock in conns:
        selector.unregister(sock)
        sock.setblocking(True)
    selector.close()


def _new_connections(address, slots, message, total):
    """``total`` connect-send-receive-close sequences, ``slots`` of them at a time."""
    selector = selectors.DefaultSelector()
    started = finished = 0

    def start():
        nonlocal started
        sock = socket.socket()
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.connect_ex(address)
        selector.register(sock, selectors.EVENT_WRITE, [0])
        started += 1

    for _ in range(min(slots, total)):
        start()
    while finished < total:
        for key, mask in selector.select():
            sock, got = key.fileobj, key.data
            if mask & selectors.EVENT_WRITE:
                sock.send(message)
                selector.modify(sock, selectors.EVENT_READ, got)
                continue
            data = sock.recv(65536)
            got[0] += len(data)
            if data and got[0] < MESSAGE:
                continue
            if not data:
                raise EOFError("connection closed before the echo")
            selector.unregister(sock)
            sock.close()
            finished += 1
            if started < total:
                start()
    selector.close()


# -- the engines (this process) --------------------------------------------------------

class FixedRouter:
    """Alternates connections between the backends; keeps nothing."""

    def __init__(self, ports):
        self.ports = ports
        self.turn = 0

    def choose(self, tried, ticket, addr=None, source=None):
        if tried:
            return None
        self.turn += 1
        port = self.ports[self.turn % len(self.ports)]
        return port, socket.AF_INET, "127.0.0.1", port, 0

    def connect_failed(self, token, reason):
        raise AssertionError("backend %s: %s" % (token, reason))

    def replayed(self, token, reason):
        raise AssertionError("backend %s: %s" % (token, reason))

    def finished(self, token, addr, bytes_up, bytes_down, status, end, duration):
        pass


class Setup:
    """Engines in threads here, behind one listener; backend and client processes elsewhere."""

    def __init__(self, engine_module, engines=1, splice=None, bulk=False):
        context = multiprocessing.get_context("spawn")
        self.processes, self.controls = [], []
        ports = []
        for _ in range(1 if bulk else BACKEND_PROCESSES):
            port = self._spawn(context, backend_main, BULK_BYTES if bulk else 0)
            ports.append(port)
        options = {} if engine_module.__name__.endswith("_py") else {"splice": splice}
        self.engines = [engine_module.Engine(FixedRouter(ports), WAIT, WAIT, WAIT, WAIT, **options)
                        for _ in range(engines)]
        self.threads = [threading.Thread(target=e.run, daemon=True) for e in self.engines]
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=1024)
        self.listener.setblocking(False)
        self.accept_batch = engine_module.accept_batch
        self.waker = Waker()
        self.stopping = False
        self.acceptor = threading.Thread(target=self._accept, daemon=True)
        for thread in self.threads + [self.acceptor]:
            thread.start()
        self.clients = []
        clients = 1 if bulk else CLIENT_PROCESSES
        for _ in range(clients):
            self.clients.append(self._spawn(context, client_main, self.listener.getsockname(),
                                            CONNECTIONS // clients if not bulk else 1, bulk,
                                            ready="ready"))

    def _spawn(self, context, target, *args, ready=None):
        parent, child = context.Pipe()
        process = context.Process(target=target, args=(child, *args), daemon=True)
        process.start()
        self.processes.append(process)
        assert parent.poll(WAIT), "load generator did not start"
        first = parent.recv()
        assert ready is None or first == ready
        self.controls.append(parent)
        return first if ready is None else parent

    def _accept(self):
        while not self.stopping:
            try:
                batch = self.accept_batch(self.listener, self.waker)
            except OSError:
                return
            for client, addr in batch:
                min(self.engines, key=_active).add(client, addr)

    def cpu_seconds(self):
        """CPU time the engine threads have used so far (user + system)."""
        return sum(time.clock_gettime(time.pthread_getcpuclockid(t.ident)) for t in self.threads)

    def accept_cpu_seconds(self):
        """CPU time the accept thread has used so far."""
        return time.clock_gettime(time.pthread_getcpuclockid(self.acceptor.ident))

    def run(self, command, amount):
        for control in self.clients:
            control.send((command, amount))
        for control in self.clients:
            assert control.poll(WAIT), "clients did not finish %s within %gs" % (command, WAIT)
            assert control.recv() == "done"

    def close(self):
        for control in self.clients:
            control.send(("close", 0))
            control.poll(WAIT) and control.recv()
        self.stopping = True
        self.waker.wake()
        self.acceptor.join(WAIT)
        self.listener.close()
        self.waker.close()
        deadline = time.monotonic() + WAIT
        while sum(e.active for e in self.engines) and time.monotonic() < deadline:
            time.sleep(0.01)
        for engine in self.engines:
            engine.stop()
        for thread in self.threads:
            thread.join(WAIT)
        for process in self.processes:
            process.terminate()
            process.join(WAIT)


def _active(engine):
    return engine.active


CASES = {
    # case: (command, amount per round, units per round, engines)
    "keep-alive": ("keep-alive", ROUND_TRIPS, ROUND_TRIPS * CONNECTIONS, 1),
    "keep-alive-4": ("keep-alive", ROUND_TRIPS, ROUND_TRIPS * CONNECTIONS, 4),
    "connections": ("connections", NEW_CONNECTIONS // CLIENT_PROCESSES, NEW_CONNECTIONS, 1),
    "bulk": ("bulk", BULK_BYTES, BULK_BYTES, 1),
}


def measure(benchmark, setup, case):
    """Benchmark one case; return the median CPU seconds the engines used per round."""
    command, amount, _, _ = CASES[case]
    cpu, accept_cpu = [], []

    def one_round():
        before, accept_before = setup.cpu_seconds(), setup.accept_cpu_seconds()
        setup.run(command, amount)
        cpu.append(setup.cpu_seconds() - before)
        accept_cpu.append(setup.accept_cpu_seconds() - accept_before)

    try:
        benchmark.pedantic(one_round, rounds=ROUNDS, warmup_rounds=1)
    finally:
        setup.close()
    # The first round was the warm-up.
    return statistics.median(cpu[1:]), statistics.median(accept_cpu[1:])


# -- pytest-benchmark --------------------------------------------------------------------

@pytest.mark.benchmark(group="engine keep-alive, 32 connections, 1 engine")
@pytest.mark.parametrize("name", TWINS)
def test_engine_keep_alive_round_trips(benchmark, name, report):
    cpu, _ = measure(benchmark, Setup(twin(name), engines=1), "keep-alive")
    units = CASES["keep-alive"][2]
    report("keep-alive, 1 engine", name, "round trips/s", units / benchmark.stats.stats.median)
    report("1 engine, CPU", name, "us/round trip", 1e6 * cpu / units, lower_is_better=True)


@pytest.mark.benchmark(group="engine keep-alive, 32 connections, 4 engines")
@pytest.mark.parametrize("name", TWINS)
def test_engine_keep_alive_round_trips_4_engines(benchmark, name, report):
    cpu, _ = measure(benchmark, Setup(twin(name), engines=4), "keep-alive-4")
    units = CASES["keep-alive-4"][2]
    report("keep-alive, 4 engines", name, "round trips/s", units / benchmark.stats.stats.median)
    report("4 engines, CPU", name, "us/round trip", 1e6 * cpu / units, lower_is_better=True)


@pytest.mark.benchmark(group="engine new connections, 32 at a time")
@pytest.mark.parametrize("name", TWINS)
def test_engine_connections_per_second(benchmark, name, report):
    cpu, accept_cpu = measure(benchmark, Setup(twin(name), engines=1), "connections")
    units = CASES["connections"][2]
    report("new connections", name, "connections/s", units / benchmark.stats.stats.median)
    report("new connections, CPU", name, "us/connection", 1e6 * cpu / units, lower_is_better=True)
    report("... accept thread CPU", name, "us/connection", 1e6 * accept_cpu / units,
           lower_is_better=True)


@pytest.mark.benchmark(group="engine 64 MiB download")
@pytest.mark.parametrize("name, splice", BULK_MODES)
def test_engine_bulk_download(benchmark, name, splice, report):
    cpu, _ = measure(benchmark, Setup(twin(name), splice=splice, bulk=True), "bulk")
    label = _label(name, splice)
    report("engine 64 MiB", label, "MB/s", BULK_BYTES / 1e6 / benchmark.stats.stats.median)
    report("engine 64 MiB, CPU", label, "ms", 1e3 * cpu, lower_is_better=True)


def _label(name, splice):
    if name == "python":
        return "python"
    return "cython-" + {None: "auto", True: "splice", False: "copy"}[splice]


# -- interleaved comparison (python benchmarks/bench_engine.py CASE [ROUNDS]) -----------

def interleaved(case, rounds):
    """Run every twin (and, for bulk, splice mode) of one case round-robin; print medians and ratios."""
    command, amount, units, engines = CASES[case]
    modules = {name: Twin(name).engine for name in ("python", "cython")}
    modes = [p.values for p in BULK_MODES] if case == "bulk" else [("python", None), ("cython", None)]
    variants = {_label(name, splice): Setup(modules[name], engines, splice, bulk=case == "bulk")
                for name, splice in modes}
    wall = {label: [] for label in variants}
    cpu = {label: [] for label in variants}
    accept_cpu = {label: [] for label in variants}
    try:
        for setup in variants.values():
            setup.run(command, amount)  # warm-up
        for _ in range(rounds):
            for label, setup in variants.items():
                before, start = setup.cpu_seconds(), time.perf_counter()
                accept_before = setup.accept_cpu_seconds()
                setup.run(command, amount)
                wall[label].append(time.perf_counter() - start)
                cpu[label].append(setup.cpu_seconds() - before)
                accept_cpu[label].append(setup.accept_cpu_seconds() - accept_before)
    finally:
        for setup in variants.values():
            setup.close()
    unit, scale = {"keep-alive": ("round trips/s", 1.0), "connections": ("connections/s", 1.0),
                   "bulk": ("MB/s", 1e6)}[command]
    cpu_unit, cpu_scale = (("engine CPU ms", 1e3) if command == "bulk"
                           else ("engine CPU us/" + unit.split("/")[0][:-1], 1e6 / units))
    print("%s, %d interleaved rounds: medians" % (case, rounds))
    base = None
    for label in variants:
        rate = units / scale / statistics.median(wall[label])
        used = cpu_scale * statistics.median(cpu[label])
        ratios = "" if base is None else "  (%.2fx, CPU %.2fx)" % (rate / base[0], base[1] / used)
        base = base or (rate, used)
        extra = ""
        if command == "connections":
            extra = "  [accept thread %.1f us]" % (cpu_scale * statistics.median(accept_cpu[label]))
        print("  %-14s %10.1f %s  %8.1f %s%s%s" % (label, rate, unit, used, cpu_unit, ratios, extra))


if __name__ == "__main__":
    import sys

    interleaved(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 15)
