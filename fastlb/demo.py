"""``fastlb demo``: balancing and fail-over on three built-in backends, in about ten seconds.

Starts three ``fastlb-backend`` processes, each serving a file that names it,
runs a balancer in this process, sends traffic from a few client threads,
kills one backend half-way and prints a live table of what fastlb sees.
"""

from __future__ import annotations

import argparse
import logging
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Optional, Sequence

from fastlb import bridge
from fastlb.balancer import Balancer
from fastlb.settings import Address, Config

LISTEN_RE = re.compile(r"listening on [^:\s]+:(\d+)")


class EventLog(logging.Handler):
    """Keeps the balancer's recent log messages for the table's footer."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append("%s  %s" % (time.strftime("%H:%M:%S"), record.getMessage()))
        del self.lines[:-6]


def start_backend(directory: Path, name: str) -> tuple[subprocess.Popen[str], int]:
    (directory / "who").write_text(name)
    proc = subprocess.Popen([sys.executable, "-m", "fastlb.backend", "0", "--dir", str(directory)],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    assert proc.stderr is not None
    line = proc.stderr.readline()
    match = LISTEN_RE.search(line)
    if not match:
        proc.kill()
        raise RuntimeError("backend %s did not start: %r" % (name, line))
    return proc, int(match.group(1))


def client(port: int, tally: Counter[str], failures: Counter[str], stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.sendall(b"GET /who HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n\r\n")
                answer = b""
                while True:
                    chunk = sock.recv(4096)
                    if not chunk:
                        break
                    answer += chunk
            head, _, body = answer.partition(b"\r\n\r\n")
            if head.startswith(b"HTTP/1.1 200"):
                tally[body.decode()] += 1
            else:
                failures[head.split(b"\r\n")[0].decode(errors="replace") or "empty answer"] += 1
        except OSError as exc:
            failures[type(exc).__name__] += 1
        time.sleep(0.01)


def render(balancer: Balancer, names: dict[str, str], tally: Counter[str], failures: Counter[str],
           events: EventLog,
           elapsed: float, note: str) -> str:
    lines = ["fastlb demo (%s bridge), %4.1fs  %s" % (bridge.IMPLEMENTATION, elapsed, note), "",
             "  %-16s %-6s %8s %8s   %s" % ("backend", "state", "routed", "answers", "last change")]
    for row in balancer.pool.snapshot():
        name = names[row["backend"]]
        lines.append("  %-16s %-6s %8d %8d   %s" % (name, row["state"], row["routed"],
                                                    tally[name], row["reason"]))
    lines.append("")
    lines.append("  answered %d, failed %d%s" % (
        sum(tally.values()), sum(failures.values()),
        "" if not failures else " " + dict(failures).__repr__()))
    lines.append("")
    lines.extend("  " + line for line in events.lines)
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="fastlb demo", description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of traffic (default 10)")
    parser.add_argument("--clients", type=int, default=4, help="client threads (default 4)")
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.clients < 1:
        parser.error("--duration must be positive and --clients at least 1")

    events = EventLog()
    logging.getLogger("fastlb").addHandler(events)
    logging.getLogger("fastlb").setLevel(logging.INFO)
    interactive = sys.stdout.isatty()
    backends: list[subprocess.Popen[str]] = []
    names: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="fastlb-demo-") as tmp:
        try:
            for i in range(3):
                directory = Path(tmp, "backend-%d" % (i + 1))
                directory.mkdir()
                proc, port = start_backend(directory, "backend-%d" % (i + 1))
                backends.append(proc)
                names["127.0.0.1:%d" % port] = "backend-%d" % (i + 1)
            config = Config(port=0, bind="127.0.0.1", requests=5, interval=0.5, probe_timeout=1.0,
                            backends=[Address("127.0.0.1", int(n.split(":")[1]), "127.0.0.1")
                                      for n in names])
            balancer = Balancer(config)
            balancer.bind()
            runner = threading.Thread(target=balancer.run, daemon=True)
            runner.start()

            tally: Counter[str] = Counter()
            failures: Counter[str] = Counter()
            stop = threading.Event()
            clients = [threading.Thread(target=client, args=(balancer.port, tally, failures, stop),
                                        daemon=True) for _ in range(args.clients)]
            for thread in clients:
                thread.start()
            started = time.monotonic()
            killed = False
            note = "three backends sharing the load"
            while (elapsed := time.monotonic() - started) < args.duration:
                if not killed and elapsed >= args.duration / 2:
                    backends[1].send_signal(signal.SIGKILL)
                    killed = True
                    note = "backend-2 was killed: fastlb routes around it"
                frame = render(balancer, names, tally, failures, events, elapsed, note)
                if interactive:
                    print("\x1b[H\x1b[2J" + frame, flush=True)
                elif int(elapsed * 2) % 4 == 0:
                    print(frame + "\n", flush=True)
                time.sleep(0.5)
            stop.set()
            for thread in clients:
                thread.join(10)
            balancer.stop()
            runner.join(10)
            print(render(balancer, names, tally, failures, events, time.monotonic() - started,
                         "done"), flush=True)
            lost = sum(failures.values())
            if not lost:
                print("\nEvery request was answered, before and after the kill.")
            else:
                print("\n%d request(s) failed: a request in flight on a backend killed mid-answer "
                      "is cut, as in any TCP balancer; every other one was answered." % lost)
            # At most one request per client can have been in flight at the kill.
            return 0 if sum(tally.values()) and lost <= args.clients else 1
        finally:
            for proc in backends:
                if proc.poll() is None:
                    proc.terminate()
                    try:
                        proc.wait(5)
                    except subprocess.TimeoutExpired:
                        proc.kill()
