"""Real servers nobody here wrote, started for the end-to-end tests on free loopback ports.

uvicorn and gunicorn (with the tiny apps in ``tests/apps``), redis-server,
PostgreSQL, nginx, HAProxy and ``websockets`` echo servers.  Each starts in a
session of its own, is waited for until a deadline (ready means: it logged that
it listens, or it accepts a connection), and is stopped by its PID at the end of
the test; its group is swept while the leader's PID is still held, so the
workers it forked go too and no other process can be hit.  Everything a server
prints goes to a log under the test's ``tmp_path``, quoted in failure messages.

A binary that is not installed fails the test with the Debian package to
install (``.ci/run`` installs them all): a skipped test would hide it in CI.
"""

from __future__ import annotations

import glob
import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import pytest

from conftest import child_env, free_port, port_accepts, recv_all, wait_until

APPS = Path(__file__).resolve().parent / "apps"
# Starting a server on a loaded two-core CI machine: PostgreSQL's first start is the slowest.
START_TIMEOUT = 30.0
# A graceful stop; past it the server and its group are killed.
STOP_TIMEOUT = 10.0
# One command that prepares a server (initdb, pgbench -i).
SETUP_TIMEOUT = 120.0
LOG_TAIL = 4000


def require(program: str, package: str) -> str:
    """The path of ``program``; the test fails, naming the Debian package, when it is missing."""
    # Debian puts nginx and haproxy in /usr/sbin, outside a non-root $PATH.
    search = os.pathsep.join([os.environ.get("PATH", os.defpath), "/usr/sbin", "/sbin"])
    path = program if os.path.isabs(program) else shutil.which(program, path=search)
    if not path or not os.access(path, os.X_OK):
        pytest.fail("%s is not installed: install Debian's %s (bash .ci/run does)" % (program, package),
                    pytrace=False)
    return path


def postgres_bin() -> Path:
    """The newest PostgreSQL server's bin directory (Debian keeps it out of $PATH)."""
    found = glob.glob("/usr/lib/postgresql/*/bin/initdb")
    if not found:
        pytest.fail("PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb): "
                    "install Debian's postgresql (bash .ci/run does)", pytrace=False)
    return Path(max(found, key=lambda p: int(Path(p).parent.parent.name))).parent


def http_get_from(source: str, port: int, path: str = "/", timeout: float = 10.0) -> bytes:
    """One GET with Connection: close from the loopback address ``source``: a client on another host."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=(source, 0)) as sock:
        sock.sendall(b"GET %s HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n" % path.encode())
        return recv_all(sock, timeout)


class Server:
    """One server process in a session of its own, its output in ``log_path``."""

    _serial = itertools.count()

    def __init__(self, name: str, args: list, tmp_path: Path, port: int, env: Optional[dict] = None,
                 cwd: Optional[Path] = None, user: Optional[str] = None, stop_signal: int = signal.SIGTERM):
        self.name, self.args, self.port, self.stop_signal = name, [str(a) for a in args], port, stop_signal
        self.log_path = tmp_path / ("%s-%d.log" % (name, next(self._serial)))
        as_user = {"user": user, "group": user, "extra_groups": []} if user else {}
        with open(self.log_path, "wb") as log:
            self.popen = subprocess.Popen(self.args, stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=subprocess.STDOUT, env=child_env(env),
                                          cwd=str(cwd or tmp_path), start_new_session=True, **as_user)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        return self.log_path.read_bytes().decode("utf-8", "replace")

    def describe(self) -> str:
        return "%s (pid %d, port %d, log %s):\n%s" % (self.name, self.pid, self.port, self.log_path,
                                                      self.output()[-LOG_TAIL:])

    def wait_ready(self, ready: Optional[Callable[[], bool]] = None, timeout: float = START_TIMEOUT) -> "Server":
        """Poll ``ready`` (default: the port accepts a connection) until the deadline."""
        ready = ready or (lambda: port_accepts(self.port))

        def check() -> bool:
            if self._exited():
                raise AssertionError("%s exited before it was ready: %s" % (self.name, self.describe()))
            return ready()

        try:
            wait_until(check, timeout, interval=0.05, message="%s to be ready" % self.name)
        except AssertionError as error:
            raise AssertionError("%s\n%s" % (error, self.describe())) from None
        return self

    def wait_for_log(self, text: str, timeout: float = START_TIMEOUT) -> "Server":
        return self.wait_ready(lambda: text in self.output(), timeout)

    def _exited(self) -> bool:
        """Whether the leader has ended, without reaping it (its PID, and so its group's, stays ours)."""
        if self.popen.returncode is not None:
            return True
        try:
            return os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        except ChildProcessError:
            return True

    def _sweep_and_reap(self) -> None:
        if self.popen.returncode is None:
            try:
                os.killpg(self.pid, signal.SIGKILL)  # the group is ours while the leader is unreaped
            except (ProcessLookupError, PermissionError):
                pass
            self.popen.wait(STOP_TIMEOUT)

    def kill(self) -> None:
        """SIGKILL the server and everything it forked, as a crash would; return once it is gone."""
        self._sweep_and_reap()

    def stop(self) -> None:
        """Ask the server to stop (its own stop signal); kill it if it has not within STOP_TIMEOUT."""
        if self.popen.returncode is None and not self._exited():
            os.kill(self.pid, self.stop_signal)
            deadline = time.monotonic() + STOP_TIMEOUT
            while not self._exited() and time.monotonic() < deadline:
                time.sleep(0.02)
        self._sweep_and_reap()


class Nginx(Server):
    """nginx whose access log is kept in the tmp dir: ``requests()`` counts what reached it."""

    access_log: Path

    def requests(self) -> list:
        if not self.access_log.exists():
            return []
        return self.access_log.read_text().splitlines()


class Postgres(Server):
    """A PostgreSQL cluster of its own; ``database`` holds pgbench's tables, ``user`` may connect."""

    data_root: Path
    bin: Path
    database = "bench"
    user = "postgres"


NGINX_CONF = """\
daemon off;
master_process off;     # one process: its PID is the server, SIGKILL leaves no worker behind
worker_processes 1;
pid {dir}/nginx.pid;
error_log stderr notice;
events {{ worker_connections 512; }}
http {{
    log_format proxied '$proxy_protocol_addr $remote_addr "$request" $status';
    access_log {dir}/access.log proxied;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    server {{
        # Every connection must start with a PROXY header (v1 or v2); "/" and
        # "/health" answer the client address that header carried.
        listen 127.0.0.1:{port} proxy_protocol;
        location / {{
            default_type text/plain;
            return 200 "$proxy_protocol_addr\\n";
        }}
    }}
}}
"""

HAPROXY_CONF = """\
global
    nbthread 1
    maxconn 1024
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend front
    bind 127.0.0.1:{port}
    default_backend back
backend back
    server next 127.0.0.1:{target} {server_options}
"""


class Servers:
    """Starts real servers for one test; ``stop_all`` stops every one of them.

    A test module makes it a fixture:
    ``@pytest.fixture`` ``def servers(tmp_path): made = Servers(tmp_path); yield made; made.stop_all()``.
    """

    def __init__(self, tmp_path: Path):
        self.tmp_path = tmp_path
        self.started: list[Server] = []
        self._cleanups: list[Callable[[], None]] = []

    def _start(self, cls, name: str, args: list, port: int, **kwargs) -> Server:
        server = cls(name, args, self.tmp_path, port, **kwargs)
        self.started.append(server)
        return server

    def _dir(self, name: str) -> Path:
        directory = Path(tempfile.mkdtemp(prefix=name + "-", dir=self.tmp_path))
        return directory

    # -- HTTP -----------------------------------------------------------------------

    def uvicorn(self, name: str, health_status: int = 200, wait: bool = True) -> Server:
        """``tests/apps/named_asgi.py`` under uvicorn: ``/`` and ``/who`` say ``name``, ``/health`` gives ``health_status``."""
        port = free_port()
        server = self._start(Server, "uvicorn-" + name,
                             [sys.executable, "-m", "uvicorn", "--app-dir", APPS, "named_asgi:app",
                              "--host", "127.0.0.1", "--port", port, "--log-level", "info"],
                             port, env={"APP_NAME": name, "APP_HEALTH_STATUS": str(health_status)})
        return server.wait_ready() if wait else server

    def gunicorn_proxy(self, mode: str = "v1") -> Server:
        """gunicorn with ``--proxy-protocol MODE`` serving ``REMOTE_ADDR`` (``tests/apps/remote_addr_wsgi.py``)."""
        port = free_port()
        server = self._start(Server, "gunicorn",
                             # The app before the options: "--proxy-protocol" takes an optional value.
                             [sys.executable, "-m", "gunicorn", "remote_addr_wsgi:app",
                              "--bind", "127.0.0.1:%d" % port, "--workers", "1", "--chdir", APPS,
                              "--proxy-protocol", mode, "--proxy-allow-from", "127.0.0.1",
                              "--access-logfile", "-", "--log-level", "info"],
                             port)
        # The master listens before it boots the worker, which then takes the backlog.
        return server.wait_for_log("Booting worker")

    def nginx_proxy(self) -> Nginx:
        """nginx with ``listen ... proxy_protocol`` answering ``$proxy_protocol_addr`` on every path."""
        nginx = require("nginx", "nginx")
        port, directory = free_port(), self._dir("nginx")
        conf = directory / "nginx.conf"
        conf.write_text(NGINX_CONF.format(dir=directory, port=port))
        server = self._start(Nginx, "nginx", [nginx, "-e", "stderr", "-p", "%s/" % directory, "-c", conf],
                             port, cwd=directory)
        server.access_log = directory / "access.log"
        server.wait_ready()
        return server

    def haproxy(self, target_port: int, server_options: str = "send-proxy-v2") -> Server:
        """HAProxy in ``mode tcp`` relaying to 127.0.0.1:``target_port`` with ``server_options``."""
        haproxy = require("haproxy", "haproxy")
        port, directory = free_port(), self._dir("haproxy")
        conf = directory / "haproxy.cfg"
        conf.write_text(HAPROXY_CONF.format(port=port, target=target_port, server_options=server_options))
        check = subprocess.run([haproxy, "-c", "-q", "-f", conf], capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, "haproxy rejects its config:\n%s%s" % (check.stdout, check.stderr)
        return self._start(Server, "haproxy", [haproxy, "-f", conf, "-db"], port, cwd=directory).wait_ready()

    # -- other protocols -------------------------------------------------------------

    def redis(self, replica_of: int = 0) -> Server:
        """redis-server without persistence, its working files in the tmp dir; a replica of the port given."""
        redis = require("redis-server", "redis-server")
        port, directory = free_port(), self._dir("redis")
        replication = ["--replicaof", "127.0.0.1", str(replica_of)] if replica_of else []
        server = self._start(Server, "redis",
                             [redis, "--port", port, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                              "--daemonize", "no", "--dir", directory] + replication,
                             port, cwd=directory)
        return server.wait_for_log("Ready to accept connections")

    def ws_echo(self, name: str, wait: bool = True) -> Server:
        """``tests/apps/ws_echo.py``: a ``websockets`` server answering ``name:message``."""
        port = free_port()
        server = self._start(Server, "ws-" + name, [sys.executable, APPS / "ws_echo.py", name, port], port)
        return server.wait_for_log("listening on") if wait else server

    def postgres(self) -> Postgres:
        """A fresh PostgreSQL cluster on 127.0.0.1 with trust auth, and pgbench's tables in ``bench``.

        PostgreSQL refuses to run as root: as root the cluster belongs to the
        postgres user, in a directory of its own outside tmp_path (pytest keeps
        that private to root); its log still goes to tmp_path.
        """
        bindir = postgres_bin()
        as_root = os.geteuid() == 0
        root = Path(tempfile.mkdtemp(prefix="fastlb-pg-"))
        self._cleanups.append(lambda: shutil.rmtree(root, ignore_errors=True))
        if as_root:
            shutil.chown(root, "postgres", "postgres")
        data, port = root / "data", free_port()
        setup_log = self.tmp_path / "postgres-setup.log"

        def setup(args: list, as_owner: bool) -> None:
            argv = [str(a) for a in args]
            if as_owner and as_root:
                argv = [require("runuser", "util-linux"), "-u", "postgres", "--"] + argv
            done = subprocess.run(argv, capture_output=True, text=True, timeout=SETUP_TIMEOUT, cwd=str(root))
            with open(setup_log, "a") as log:
                log.write("$ %s\n%s%s" % (" ".join(argv), done.stdout, done.stderr))
            assert done.returncode == 0, "%s failed:\n%s%s" % (argv, done.stdout, done.stderr)

        setup([bindir / "initdb", "-D", data, "-U", "postgres", "--auth=trust", "--no-sync",
               "--encoding=UTF8", "--locale=C"], as_owner=True)
        with open(data / "pg_hba.conf", "a") as hba:
            hba.write("host all all 127.0.0.0/8 trust\n")
        server = self._start(Postgres, "postgres",
                             [bindir / "postgres", "-D", data, "-p", port, "-k", root,
                              "-c", "listen_addresses=127.0.0.1", "-c", "max_connections=50",
                              # A throwaway cluster: durability would only cost time.
                              "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"],
                             port, cwd=root, user="postgres" if as_root else None,
                             # Immediate shutdown: the postmaster ends its backends and exits.
                             stop_signal=signal.SIGQUIT)
        server.data_root, server.bin = root, bindir
        server.wait_for_log("database system is ready to accept connections")
        client = ["-h", "127.0.0.1", "-p", port, "-U", server.user]
        setup([bindir / "createdb", *client, server.database], as_owner=False)
        setup([bindir / "pgbench", "-i", "-q", *client, server.database], as_owner=False)
        return server

    def stop_all(self) -> None:
        for server in reversed(self.started):
            server.stop()
        for cleanup in self._cleanups:
            cleanup()
