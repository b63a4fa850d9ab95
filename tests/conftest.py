"""Shared fixtures: both bridge twins, and real fastlb / fastlb-backend processes.

Every network wait here has a deadline; nothing sleeps where polling works.
"""

from __future__ import annotations

import importlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from faults import FaultServer

ROOT = Path(__file__).resolve().parent.parent
LISTEN_RE = re.compile(rb"listening on [^:\s]+:(\d+)")


def child_env(extra=None) -> dict:
    """The environment for fastlb child processes: this checkout first on the import path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    env.update(extra or {})
    return env


def _twins():
    twins = [pytest.param("python", id="python")]
    twins.append(pytest.param("cython", id="cython"))
    return twins


@pytest.fixture(params=_twins())
def bridge_impl(request):
    """The hot-path module under test: each test using it runs once per twin.

    The compiled twin is required unless FASTLB_NO_EXTENSIONS is set; a
    missing build then fails here rather than silently testing Python twice.
    """
    if request.param == "python":
        return importlib.import_module("fastlb._bridge_py")
    if os.environ.get("FASTLB_NO_EXTENSIONS", "") not in ("", "0"):
        pytest.skip("FASTLB_NO_EXTENSIONS is set: the compiled twin is not under test")
    return importlib.import_module("fastlb._bridge")


@pytest.fixture(params=_twins())
def engine_impl(request):
    """The relay-engine module under test: each test using it runs once per twin."""
    if request.param == "python":
        return importlib.import_module("fastlb._engine_py")
    if os.environ.get("FASTLB_NO_EXTENSIONS", "") not in ("", "0"):
        pytest.skip("FASTLB_NO_EXTENSIONS is set: the compiled twin is not under test")
    return importlib.import_module("fastlb._engine")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.02, message: str = "condition"):
    """Poll ``predicate`` until it returns a truthy value or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError("timed out after %gs waiting for %s" % (timeout, message))
        time.sleep(interval)


def port_accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class Proc:
    """A child process whose stderr is collected into a file we can read any time."""

    def __init__(self, args, tmp_path: Path, name: str, env=None):
        self.args = args
        self.log_path = tmp_path / ("%s-%d.log" % (name, time.monotonic_ns()))
        self._log = open(self.log_path, "wb")
        self.popen = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, env=child_env(env),
                                      cwd=str(tmp_path))
        self.port = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        return self.log_path.read_bytes().decode("utf-8", "replace")

    def wait_for_log(self, pattern: str, timeout: float = 10.0) -> re.Match:
        regex = re.compile(pattern)

        def found():
            if self.popen.poll() is not None:
                match = regex.search(self.output())
                if match:
                    return match
                raise AssertionError("%s exited (%s) before logging %r:\n%s"
                                     % (self.args, self.popen.returncode, pattern, self.output()))
            return regex.search(self.output())

        return wait_until(found, timeout, message="log line %r" % pattern)

    def signal(self, signum=signal.SIGTERM) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signum)

    def wait(self, timeout: float = 10.0) -> int:
        return self.popen.wait(timeout)

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(10)
        self._log.close()


@pytest.fixture(params=_twins())
def procs(request, tmp_path):
    """Start processes that are killed (by PID, ours only) when the test ends.

    Every end-to-end test runs twice: fastlb on the compiled twins, then with
    FASTLB_NO_EXTENSIONS=1 on the pure-Python ones.
    """
    if request.param == "cython" and os.environ.get("FASTLB_NO_EXTENSIONS", "") not in ("", "0"):
        pytest.skip("FASTLB_NO_EXTENSIONS is set: the compiled twin is not under test")
    twin_env = {"FASTLB_NO_EXTENSIONS": "1" if request.param == "python" else ""}
    started: list[Proc] = []

    class Factory:
        def backend(self, directory: Path | None = None, name: str = "backend") -> Proc:
            directory = directory or tmp_path
            proc = Proc([sys.executable, "-m", "fastlb.backend", "0", "--dir", str(directory)],
                        tmp_path, name)
            started.append(proc)
            match = proc.wait_for_log(r"listening on [^:\s]+:(\d+)")
            proc.port = int(match.group(1))
            return proc

        def fastlb(self, *args, port: int | None = None, env=None, wait: bool = True,
                   prefix: tuple = ()) -> Proc:
            """fastlb on ``port`` (a free one by default); ``prefix`` runs it through a command (prlimit ...)."""
            port = port or free_port()
            argv = [*prefix, sys.executable, "-m", "fastlb", "--bind", "127.0.0.1", str(port)] + [str(a) for a in args]
            proc = Proc(argv, tmp_path, "fastlb", env=dict(twin_env, **(env or {})))
            proc.port = port
            started.append(proc)
            if wait:
                # Started once the first probe round has been applied.
                proc.wait_for_log(r"first health round done")
                wait_until(lambda: port_accepts(port), 10, message="fastlb to accept")
            return proc

        def run(self, *args, env=None, timeout: float = 20.0) -> subprocess.CompletedProcess:
            return subprocess.run([sys.executable, "-m", "fastlb"] + [str(a) for a in args],
                                  capture_output=True, text=True, timeout=timeout,
                                  env=child_env(dict(twin_env, **(env or {}))))

    yield Factory()
    for proc in started:
        proc.stop()


def http_get(port: int, path: str = "/", timeout: float = 10.0, extra: bytes = b"") -> bytes:
    """One GET over a fresh connection with Connection: close; returns the raw response."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(b"GET %s HTTP/1.1\r\nHost: test\r\nConnection: close\r\n%s\r\n"
                     % (path.encode(), extra))
        return recv_all(sock, timeout)


def recv_all(sock: socket.socket, timeout: float = 10.0) -> bytes:
    """Read until EOF, failing if the deadline passes first."""
    deadline = time.monotonic() + timeout
    chunks = []
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError("no EOF within %gs (got %r...)" % (timeout, b"".join(chunks)[:200]))
        sock.settimeout(remaining)
        chunk = sock.recv(1 << 16)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def body_of(response: bytes) -> bytes:
    head, sep, body = response.partition(b"\r\n\r\n")
    assert sep, "no end of head in %r" % response[:200]
    return body


def status_of(response: bytes) -> int:
    assert response.startswith(b"HTTP/1."), response[:100]
    return int(response[9:12])


@pytest.fixture
def faults():
    """Make FaultServers (tests/faults.py) that are stopped when the test ends."""
    made: list[FaultServer] = []

    def make(*args, **kwargs) -> FaultServer:
        server = FaultServer(*args, **kwargs)
        made.append(server)
        return server

    yield make
    for server in made:
        server.stop()
