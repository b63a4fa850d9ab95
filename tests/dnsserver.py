"""A real DNS server for the discovery tests: dnsmasq on a loopback port, its records ours to rewrite.

A records come from a hosts file that ``set_hosts`` rewrites and dnsmasq
re-reads on SIGHUP (as an operator's record change would reach it); SRV
records live in its configuration, which dnsmasq reads only when it starts, so
``set_srv`` restarts it on the same port.  Names under ``.test`` are answered
locally (``local=/test/``): an unknown one is NXDOMAIN, not a question sent on.
The server is stopped by its PID.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
from pathlib import Path

from conftest import wait_until

DNSMASQ = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"


def free_udp_and_tcp_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1 (dnsmasq listens on both)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port = udp.getsockname()[1]
            with socket.socket() as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                    return port
                except OSError:
                    continue


class DnsServer:
    def __init__(self, directory: Path):
        if not os.path.exists(DNSMASQ):
            raise AssertionError("dnsmasq is missing: apt-get install dnsmasq-base (.ci/run does)")
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.hosts = self.dir / "hosts"
        self.conf = self.dir / "dnsmasq.conf"
        self.log = self.dir / "dnsmasq.log"
        self.port = free_udp_and_tcp_port()
        self.srv: list[tuple] = []
        self.proc = None
        self.hosts.write_text("")
        self._write_conf()
        self.start()

    @property
    def address(self) -> str:
        return "127.0.0.1:%d" % self.port

    def _write_conf(self) -> None:
        lines = ["local=/test/"]
        lines += ["srv-host=%s,%s,%d,%d,%d" % record for record in self.srv]
        self.conf.write_text("\n".join(lines) + "\n")

    def start(self) -> None:
        args = [DNSMASQ, "--keep-in-foreground", "--port=%d" % self.port,
                "--listen-address=127.0.0.1", "--bind-interfaces", "--no-resolv", "--no-hosts",
                "--addn-hosts=%s" % self.hosts, "--conf-file=%s" % self.conf,
                "--pid-file=", "--log-facility=%s" % self.log, "--cache-size=0"]
        if os.geteuid() == 0:
            args.append("--user=root")   # it may read the test's private directory
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        wait_until(self._answers, 10, message="dnsmasq to answer")

    def _answers(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError("dnsmasq exited: %s" % self.log.read_text(errors="replace"))
        with socket.socket() as sock:
            sock.settimeout(0.5)
            return sock.connect_ex(("127.0.0.1", self.port)) == 0

    def set_hosts(self, records: dict) -> None:
        """``{name: [ip, ...]}``: the A records, re-read by dnsmasq at once (SIGHUP)."""
        self.hosts.write_text("".join("%s %s\n" % (ip, name)
                                      for name, ips in records.items() for ip in ips))
        self.proc.send_signal(signal.SIGHUP)

    def set_srv(self, records: list) -> None:
        """``[(service, target, port, priority, weight), ...]``: the SRV records (dnsmasq restarts)."""
        self.srv = list(records)
        self._write_conf()
        self.stop()
        self.start()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
