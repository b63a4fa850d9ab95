"""Shared fixtures: both bridge twins, and real fastlb / fastlb-backend processes.

Every network wait here has a deadline; nothing sleeps where polling works.
"""

from __future__ import annotations

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

from fastlb.bridge import NO_EXTENSIONS, Twin

ROOT = Path(__file__).resolve().parent.parent
LISTEN_RE = re.compile(rb"listening on [^:\s]+:(\d+)")


def child_env(extra=None) -> dict:
    """The environment for fastlb child processes: this checkout first on the import path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    env.update(extra or {})
    return env


def pytest_addoption(parser):
    parser.addoption("--twin", choices=("both", "python", "cython"), default="both",
                     help="run the tests that run on both twins on this one only")


def pytest_configure(config):
    config.addinivalue_line("markers", "twin(name): run this test on one twin only "
                                       "('python' or 'cython')")


def pytest_collection_modifyitems(config, items):
    """Deselect the twin runs that --twin or a test's twin marker leave out."""
    wanted = config.getoption("--twin")
    kept, dropped = [], []
    for item in items:
        name = item.callspec.params.get("twin") if hasattr(item, "callspec") else None
        marker = item.get_closest_marker("twin")
        if name and (wanted not in ("both", name) or (marker and marker.args[0] != name)):
            dropped.append(item)
        else:
            kept.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


@pytest.fixture(params=["python", "cython"])
def twin(request) -> Twin:
    """The hot path under test: every test using it (or a fixture below) runs once per twin.

    The compiled twin is required unless FASTLB_NO_EXTENSIONS is set; a
    missing build then fails here rather than silently testing Python twice.
    """
    if request.param == "cython" and NO_EXTENSIONS:
        pytest.skip("FASTLB_NO_EXTENSIONS is set: the compiled twin is not under test")
    return Twin(request.param)


@pytest.fixture
def bridge_impl(twin):
    """The relay-and-parsers module of the twin under test."""
    return twin.bridge


@pytest.fixture
def engine_impl(twin):
    """The relay-engine module of the twin under test."""
    return twin.engine


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


@pytest.fixture
def procs(twin, tmp_path):
    """Start processes that are killed (by PID, ours only) when the test ends.

    Every end-to-end test runs twice: fastlb on the compiled twins, then with
    FASTLB_NO_EXTENSIONS=1 on the pure-Python ones.
    """
    twin_env = twin.env
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
