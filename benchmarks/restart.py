"""A restart under load: how many client connections are refused, reset or fail while fastlb is replaced.

    python benchmarks/restart.py --mode socket-activation|reuseport|reuseport-migrate
                                 [--clients 8] [--seconds 3] [--restarts 3]

Starts a backend (``fastlb-backend``) and fastlb on a port, drives it with
``--clients`` threads each doing GETs on fresh connections in a loop, and
``--restarts`` times replaces the running fastlb by a new one as an operator
would: start the new process, wait until it routes, SIGTERM the old one, wait
for it to exit.  It prints one JSON line: requests, failures (refused, reset,
no answer, not a 200), and how they ended.

- ``socket-activation``: this script holds the listening socket, as systemd
  does with ``fastlb.socket``, and passes it to each fastlb (``LISTEN_FDS``);
  the socket, and the connections waiting in its queue, outlive every process.
- ``reuseport``: each fastlb binds the port itself with ``--reuseport``; the
  old one takes what waits in its queue before closing, but a connection the
  kernel queues to it in between is reset (``net.ipv4.tcp_migrate_req`` 0).
- ``reuseport-migrate``: the same with ``net.ipv4.tcp_migrate_req=1`` (Linux
  5.14+), which moves a closing listener's queue to another in its group.  The
  sysctl is per network namespace: run this mode inside a namespace of your
  own (``ip netns exec NAME python benchmarks/restart.py ...``; the tests do).

Traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REQUEST = b"GET /who HTTP/1.1\r\nHost: restart\r\nConnection: close\r\n\r\n"
START_TIMEOUT = 20.0


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    return env


def _wait_for(path: Path, text: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if text in path.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            raise SystemExit("a process exited early:\n" + path.read_text(errors="replace"))
        time.sleep(0.02)
    raise SystemExit("timed out waiting for %r in %s" % (text, path))


class Fleet:
    """The backend and the fastlb processes of one run; every one stopped by its PID."""

    def __init__(self, mode: str, workdir: Path):
        self.mode, self.dir = mode, workdir
        self.procs: list[subprocess.Popen] = []
        (workdir / "www").mkdir()
        (workdir / "www" / "who").write_text("ok")
        self.backend_port = self._start_backend()
        self.listener = None
        if mode == "socket-activation":
            self.listener = socket.create_server(("127.0.0.1", 0), backlog=4096)
            self.port = self.listener.getsockname()[1]
        else:
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                self.port = probe.getsockname()[1]
        self.generation = 0

    def _start_backend(self) -> int:
        log = self.dir / "backend.log"
        proc = subprocess.Popen([sys.executable, "-m", "fastlb.backend", "0", "--dir", str(self.dir / "www")],
                                stderr=open(log, "wb"), env=_env())
        self.procs.append(proc)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            text = log.read_text(errors="replace")
            if "listening on" in text:
                return int(text.split("listening on", 1)[1].split(":")[1].split()[0])
            time.sleep(0.02)
        raise SystemExit("the backend did not start:\n" + log.read_text(errors="replace"))

    def start_fastlb(self) -> subprocess.Popen:
        self.generation += 1
        log = self.dir / ("fastlb-%d.log" % self.generation)
        args = [sys.executable, "-m", "fastlb", "--bind", "127.0.0.1", "-R", "1000",
                "--drain-timeout", "10", str(self.port), str(self.backend_port)]
        if self.mode == "socket-activation":
            # As systemd does: the socket at descriptor 3, LISTEN_PID the child's own.
            fd = self.listener.fileno()
            args = ["/bin/sh", "-c", 'LISTEN_PID=$$ LISTEN_FDS=1 exec "$@"', "sh"] + args
            proc = subprocess.Popen(args, stderr=open(log, "wb"), env=_env(), pass_fds=(3,),
                                    preexec_fn=lambda: os.dup2(fd, 3))
        else:
            proc = subprocess.Popen(args[:3] + ["--reuseport"] + args[3:], stderr=open(log, "wb"),
                                    env=_env())
        self.procs.append(proc)
        _wait_for(log, "first health round done", proc)
        return proc

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        if self.listener is not None:
            self.listener.close()


def client(port: int, stop: threading.Event, outcomes: collections.Counter, lock: threading.Lock) -> None:
    while not stop.is_set():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.sendall(REQUEST)
                answer = b""
                while True:
                    chunk = sock.recv(4096)
                    if not chunk:
                        break
                    answer += chunk
            outcome = "ok" if answer.startswith(b"HTTP/1.1 200") else "not 200: %r" % answer[:40]
        except ConnectionRefusedError:
            outcome = "refused"
        except ConnectionResetError:
            outcome = "reset"
        except socket.timeout:
            outcome = "no answer"
        except OSError as exc:
            outcome = "error: %s" % exc
        with lock:
            outcomes[outcome] += 1


def run(mode: str, clients: int, seconds: float, restarts: int) -> dict:
    if mode == "reuseport-migrate":
        Path("/proc/sys/net/ipv4/tcp_migrate_req").write_text("1")
    with tempfile.TemporaryDirectory(prefix="fastlb-restart-") as tmp:
        fleet = Fleet(mode, Path(tmp))
        try:
            current = fleet.start_fastlb()
            outcomes: collections.Counter = collections.Counter()
            lock, stop = threading.Lock(), threading.Event()
            threads = [threading.Thread(target=client, args=(fleet.port, stop, outcomes, lock), daemon=True)
                       for _ in range(clients)]
            for thread in threads:
                thread.start()
            for _ in range(restarts):
                time.sleep(seconds / (restarts + 1))
                successor = fleet.start_fastlb()
                current.send_signal(signal.SIGTERM)
                current.wait(20)
                current = successor
            time.sleep(seconds / (restarts + 1))
            stop.set()
            for thread in threads:
                thread.join(10)
        finally:
            fleet.stop()
    failures = sum(count for outcome, count in outcomes.items() if outcome != "ok")
    return {"mode": mode, "restarts": restarts, "clients": clients, "requests": sum(outcomes.values()),
            "failures": failures, "outcomes": dict(outcomes)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("socket-activation", "reuseport", "reuseport-migrate"),
                        required=True)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--restarts", type=int, default=3)
    args = parser.parse_args(argv)
    print(json.dumps(run(args.mode, args.clients, args.seconds, args.restarts)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
