"""How evenly two fastlb instances spread load over the same backends (the herd).

    python benchmarks/herd.py [--rounds 5] [--duration 10] [--policies least-loaded,p2c,leastconn]
                              [--connections 10] [--hold 0.02] [--slots 8] [--single]
                              [--fastlb-args '-R 50']

Several balancers in front of the same backends may all send their next
clients to the one backend that looked least loaded at the last probe: each
adds its own connections to its estimate, but none sees the others' until the
next probe.  This measures how much that matters, on a small simulated network
that the script builds and deletes (network namespaces joined by veth pairs
to a bridge in a namespace of its own; the machine's own namespace is left
alone, and no packet leaves the namespaces)::

    client ──┐                      ┌── be1  10.253.N.21:8080
    lb1 ─────┤  br0 (namespace sw)  ├── be2  10.253.N.22:8080
    lb2 ─────┘                      └── be3  10.253.N.23:8080

``lb1`` and ``lb2`` each run fastlb (``-N 4 -R 5 --interval 2``, the defaults)
over the three backends; in ``client`` two ``wrk`` processes drive both at once
for ``--duration`` seconds, ``--connections`` each, with a new connection per
request (``Connection: close``: fastlb chooses a backend per connection).

A backend (``herd.py serve``) holds every request ``--hold`` seconds (20 ms)
in one of ``--slots`` workers (8); a request that finds every worker busy
waits for one, as with a gunicorn of 8 sync workers, so a backend sent more
than its share makes its clients wait.  It answers fastlb's ``GET
/healthcheck`` at once with ``0\\n<requests in progress>``: its load as it is
now, the figure ``--balance least-loaded`` (the default with load reports)
compares.  It counts, per round, the requests it served, the most it had in
progress at once (peak), the share of requests that had to wait for a worker,
and the number in progress each request found on arrival; the script reads
them over a Unix socket (the file system is shared across namespaces).

Rounds interleave the policies (each round runs every policy once, in an order
rotated from round to round, with fresh fastlb processes and zeroed
counters); the report gives, per policy, medians
over the rounds of each backend's share of the requests and its peak, the
99th percentile of requests in progress found on arrival (over all backends),
the share of requests that queued, and the clients' rate and latency (the two
wrk runs summed and their percentiles averaged).  Backends are listed in
command-line order: least-loaded sends ties to the first.  With ``--single``
every policy also runs as ``POLICY x1``: the same two wrk runs, both at
``lb1``, with ``lb2`` stopped; the same load without a second balancer, so the
difference between the two rows is what the second instance costs.

Needs root with CAP_NET_ADMIN and CAP_SYS_ADMIN (``ip netns``), ``ip`` from
iproute2 and ``wrk``; without them it says why and exits 0 having done nothing.
Every load is bounded by ``--duration`` and every wait by a timeout; only the
processes it started are stopped, by PID.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import compare  # noqa: E402  (wrk output parsing, the child environment)

SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
IP = shutil.which("ip", path=SBIN_PATH) or "ip"
BACKEND_PORT = 8080
LB_PORT = 8000
POLICIES = ("least-loaded", "p2c", "leastconn")
CAP_NET_ADMIN, CAP_SYS_ADMIN = 12, 21
# Host addresses on the simulated LAN, the last byte of 10.253.N.x.
HOSTS = {"client": 2, "lb1": 11, "lb2": 12, "be1": 21, "be2": 22, "be3": 23}
BACKENDS = ("be1", "be2", "be3")


# -- the backend -------------------------------------------------------------------

class HoldServer:
    """An HTTP/1.1 server that holds each request in one of a few workers and reports its load.

    Everything runs on one asyncio loop, so the counters need no lock.
    """

    def __init__(self, hold: float, slots: int):
        self.hold = hold
        self.slot_count = slots
        self.slots = asyncio.Semaphore(slots)
        self.active = 0
        self.reset()

    def reset(self) -> None:
        self.requests = 0
        self.queued = 0
        self.peak = self.active
        self.on_arrival: collections.Counter = collections.Counter()

    def stats(self) -> dict:
        return {"requests": self.requests, "queued": self.queued, "peak": self.peak,
                "on_arrival": dict(self.on_arrival)}

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            target = head.split(b" ", 2)[1] if head.count(b" ") >= 2 else b""
            if target == b"/healthcheck":
                # The load as it is now: requests in progress, waiting or served.
                body = b"0\n%d\n" % self.active
            else:
                self.active += 1
                self.on_arrival[self.active] += 1
                self.peak = max(self.peak, self.active)
                if self.active > self.slot_count:
                    self.queued += 1
                try:
                    async with self.slots:
                        await asyncio.sleep(self.hold)
                finally:
                    self.active -= 1
                self.requests += 1
                body = b"held\n"
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                         % (len(body), body))
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError):
            pass
        finally:
            writer.close()

    async def control(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """``stats`` or ``reset`` on the Unix socket: the counters as JSON (zeroed after ``reset``)."""
        command = (await reader.readline()).strip()
        answer = self.stats()
        if command == b"reset":
            self.reset()
        writer.write(json.dumps(answer).encode() + b"\n")
        await writer.drain()
        writer.close()


async def serve(args) -> None:
    server = HoldServer(args.hold, args.slots)
    tcp = await asyncio.start_server(server.handle, args.host, args.port, backlog=4096)
    unix = await asyncio.start_unix_server(server.control, args.control)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print("herd backend listening on %s:%d" % (args.host, args.port), file=sys.stderr, flush=True)
    async with tcp, unix:
        await stop.wait()


def ask(control: Path, command: str) -> dict:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(control))
        sock.sendall(command.encode() + b"\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return json.loads(data)


# -- the simulated network -----------------------------------------------------------

def missing_privilege() -> str:
    """Why this process cannot build namespaces, or '' when it can."""
    status = Path("/proc/self/status").read_text()
    caps = int(re.search(r"^CapEff:\s*([0-9a-f]+)", status, re.M).group(1), 16)
    lacking = [name for name, bit in (("CAP_NET_ADMIN", CAP_NET_ADMIN), ("CAP_SYS_ADMIN", CAP_SYS_ADMIN))
               if not caps >> bit & 1]
    return "needs root with %s to build network namespaces" % " and ".join(lacking) if lacking else ""


def run(*argv: str) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    if done.returncode != 0:
        raise RuntimeError("%s failed (%d): %s" % (" ".join(argv), done.returncode, done.stderr.strip()))
    return done.stdout


class Lan:
    """Hosts in namespaces of their own, each with an ``eth0`` on one bridge; see the module comment."""

    def __init__(self):
        tag = secrets.token_hex(3)
        self.subnet = "10.253.%d" % random.randrange(256)
        self.switch = "herd-%s-sw" % tag
        self.namespaces = {host: "herd-%s-%s" % (tag, host) for host in HOSTS}
        self.made: list[str] = []
        try:
            for name in [self.switch, *self.namespaces.values()]:
                run(IP, "netns", "add", name)
                self.made.append(name)
            run(IP, "-n", self.switch, "link", "add", "br0", "type", "bridge")
            run(IP, "-n", self.switch, "link", "set", "br0", "up")
            for host, namespace in self.namespaces.items():
                port = "p-" + host
                run(IP, "-n", self.switch, "link", "add", port, "type", "veth", "peer", "name", "eth0",
                    "netns", namespace)
                run(IP, "-n", self.switch, "link", "set", port, "master", "br0", "up")
                run(IP, "-n", namespace, "addr", "add", "%s/24" % self.ip(host), "dev", "eth0")
                run(IP, "-n", namespace, "link", "set", "eth0", "up")
                run(IP, "-n", namespace, "link", "set", "lo", "up")
                # Every request is a new connection: at ~800 a second the
                # default 28,000 ephemeral ports, each held 60 s in
                # TIME_WAIT, run out within a minute and connects stall.
                # These sysctls belong to the namespace alone.
                run(IP, "netns", "exec", namespace, "sysctl", "-q", "-w",
                    "net.ipv4.ip_local_port_range=1024 65535", "net.ipv4.tcp_tw_reuse=1")
        except BaseException:
            self.close()
            raise

    def ip(self, host: str) -> str:
        return "%s.%d" % (self.subnet, HOSTS[host])

    def command(self, host: str, *argv: str) -> list:
        """``argv`` run inside ``host``'s namespace (``ip netns exec`` execs it: the PID is the program's)."""
        return [IP, "netns", "exec", self.namespaces[host], *argv]

    def close(self) -> None:
        """Delete the namespaces; their links go with them.  Never raises."""
        for name in reversed(self.made):
            subprocess.run([IP, "netns", "del", name], capture_output=True, timeout=20)
        self.made.clear()


# -- processes -------------------------------------------------------------------------

class Child:
    """A process started here, its stderr in a file; stopped by its own PID only."""

    def __init__(self, argv: list, log: Path, env=None):
        self.log = log
        self._handle = open(log, "wb")
        self.popen = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=self._handle, env=env)

    def wait_for(self, pattern: str, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.log.read_text(errors="replace")):
            if self.popen.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("%s: no %r within %gs:\n%s" % (self.popen.args, pattern, timeout,
                                                                 self.log.read_text(errors="replace")))
            time.sleep(0.05)

    def stop(self, timeout: float = 40.0) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)
        self._handle.close()


def start_backends(lan: Lan, workdir: Path, args) -> dict:
    backends = {}
    for host in BACKENDS:
        control = workdir / ("%s.sock" % host)
        child = Child(lan.command(host, sys.executable, str(Path(__file__).resolve()), "serve",
                                  "--host", lan.ip(host), "--port", str(BACKEND_PORT),
                                  "--hold", str(args.hold), "--slots", str(args.slots),
                                  "--control", str(control)),
                      workdir / ("%s.log" % host))
        backends[host] = (child, control)
    for child, _ in backends.values():
        child.wait_for(r"herd backend listening")
    return backends


def start_balancers(lan: Lan, workdir: Path, policy: str, hosts: tuple, args) -> list:
    env = compare._env()
    balancers = []
    for host in hosts:
        argv = [sys.executable, "-m", "fastlb", "--bind", lan.ip(host), "--balance", policy,
                *args.fastlb_args.split(), str(LB_PORT),
                *("%s:%d" % (lan.ip(b), BACKEND_PORT) for b in BACKENDS)]
        balancers.append(Child(lan.command(host, *argv), workdir / ("%s-%s.log" % (host, policy)), env))
    for child in balancers:
        # The first round's probes have been applied: every backend is routable.
        child.wait_for(r"first health round done: 3 of 3")
    return balancers


def drive(lan: Lan, targets: tuple, args) -> list:
    """Both wrk runs at once, one per target balancer; their parsed figures."""
    runs = [subprocess.Popen(
        lan.command("client", "wrk", "-t1", "-c%d" % args.connections, "-d%gs" % args.duration,
                    "--latency", "--timeout", "5s", "-H", "Connection: close",
                    "http://%s:%d/" % (lan.ip(host), LB_PORT)),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for host in targets]
    figures = []
    for proc in runs:
        out, _ = proc.communicate(timeout=args.duration + 60)
        figures.append(compare.parse_wrk(out))
    return figures


def percentile(histogram: dict, share: float) -> int:
    """The smallest value at or below which ``share`` of the observations fall."""
    total = sum(histogram.values())
    if not total:
        return 0
    seen = 0
    for value in sorted(histogram):
        seen += histogram[value]
        if seen >= share * total:
            return value
    return max(histogram)


def measure(lan: Lan, backends: dict, workdir: Path, layout: str, args) -> dict:
    """One measurement of ``layout``: a policy, or ``POLICY x1`` for one balancer taking both wrk runs."""
    policy, _, single = layout.partition(" ")
    hosts = ("lb1",) if single else ("lb1", "lb2")
    balancers = start_balancers(lan, workdir, policy, hosts, args)
    try:
        for _, control in backends.values():
            ask(control, "reset")
        clients = drive(lan, ("lb1", "lb1") if single else hosts, args)
        counts = {host: ask(control, "stats") for host, (_, control) in backends.items()}
    finally:
        for child in balancers:
            child.stop()
    total = sum(c["requests"] for c in counts.values()) or 1
    arrivals: collections.Counter = collections.Counter()
    for c in counts.values():
        arrivals.update({int(k): v for k, v in c["on_arrival"].items()})
    return {
        "share": {h: counts[h]["requests"] / total for h in BACKENDS},
        "peak": {h: counts[h]["peak"] for h in BACKENDS},
        "p99_on_arrival": percentile(arrivals, 0.99),
        "queued": sum(c["queued"] for c in counts.values()) / total,
        "rps": sum(c["rps"] for c in clients),
        "p50": statistics.mean(c["p50"] for c in clients),
        "p99": statistics.mean(c["p99"] for c in clients),
        "errors": sum(c["errors"] + c["non2xx"] for c in clients),
    }


def report(results: dict, args) -> str:
    lines = ["| policy | share be1 / be2 / be3 | peak be1 / be2 / be3 | in progress on arrival, p99 "
             "| queued for a worker | req/s | p50 | p99 | errors |",
             "|---|---|---|---|---|---|---|---|---|"]
    for policy, rounds in results.items():
        def med(key, host=None):
            return statistics.median(r[key][host] if host else r[key] for r in rounds)
        lines.append("| %s | %s | %s | %g | %.1f %% | %.0f | %s | %s | %d |" % (
            policy, " / ".join("%.1f %%" % (100 * med("share", h)) for h in BACKENDS),
            " / ".join("%g" % med("peak", h) for h in BACKENDS), med("p99_on_arrival"),
            100 * med("queued"), med("rps"), compare.fmt_latency(med("p50")),
            compare.fmt_latency(med("p99")), sum(r["errors"] for r in rounds)))
    lines.append("")
    lines.append("Medians of %d round(s) of %gs; %d connection(s) per balancer, a request held %g s in "
                 "one of %d workers per backend; fastlb %s."
                 % (args.rounds, args.duration, args.connections, args.hold, args.slots,
                    args.fastlb_args or "with its defaults"))
    command = ("python benchmarks/herd.py --rounds %d --duration %g --connections %d --hold %g --slots %d "
               "--policies %s" % (args.rounds, args.duration, args.connections, args.hold, args.slots,
                                  ",".join(p for p in results if " " not in p)))
    if args.single:
        command += " --single"
    if args.fastlb_args:
        command += " --fastlb-args='%s'" % args.fastlb_args
    lines.append("Command: " + command)
    return "\n".join(lines)


def unavailable() -> str:
    """Why the measurement cannot run here, or ''."""
    reason = missing_privilege()
    if reason:
        return reason
    if not Path(IP).exists() and not shutil.which(IP):
        return "needs ip from the Debian package iproute2"
    if not shutil.which("wrk"):
        return "needs wrk (Debian package wrk)"
    probe = subprocess.run([sys.executable, "-c", "import fastlb._engine"], env=compare._env(),
                           capture_output=True)
    if probe.returncode != 0:
        return "the compiled engine is not built (pip install -e .)"
    return ""


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:
        parser = argparse.ArgumentParser(prog="herd.py serve", description="the holding backend")
        parser.add_argument("--host", required=True)
        parser.add_argument("--port", type=int, default=BACKEND_PORT)
        parser.add_argument("--hold", type=float, default=0.02)
        parser.add_argument("--slots", type=int, default=8)
        parser.add_argument("--control", required=True, help="Unix socket for stats and reset")
        asyncio.run(serve(parser.parse_args(argv[1:])))
        return 0

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of load per measurement")
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--connections", type=int, default=10, help="wrk connections per balancer")
    parser.add_argument("--hold", type=float, default=0.02, help="seconds a backend holds a request")
    parser.add_argument("--slots", type=int, default=8, help="requests a backend works on at once")
    parser.add_argument("--fastlb-args", default="", help="more fastlb options, e.g. '-R 50'")
    parser.add_argument("--single", action="store_true",
                        help="also run each policy with one balancer taking both wrk runs (POLICY x1): "
                             "the same load without a second instance, the reference for the herd")
    args = parser.parse_args(argv)
    policies = [p for p in args.policies.split(",") if p]
    unknown = set(policies) - set(POLICIES)
    if unknown:
        parser.error("unknown policy: %s" % ", ".join(sorted(unknown)))
    if args.single:
        policies += ["%s x1" % p for p in policies]
    if not 1 <= args.duration <= 600 or not 1 <= args.rounds <= 50:
        parser.error("--duration must be 1..600 s and --rounds 1..50")
    reason = unavailable()
    if reason:
        print("herd.py: skipped: %s" % reason, file=sys.stderr)
        return 0

    results: dict = {p: [] for p in policies}
    with tempfile.TemporaryDirectory(prefix="fastlb-herd-") as tmp:
        workdir = Path(tmp)
        lan = Lan()
        backends = {}
        try:
            backends = start_backends(lan, workdir, args)
            print("LAN %s.0/24 in namespaces %s-*; %d cores" % (lan.subnet, lan.switch[:-3], os.cpu_count()),
                  flush=True)
            for number in range(1, args.rounds + 1):
                # Each round starts with another policy: none always runs first or last.
                shift = (number - 1) % len(policies)
                for policy in policies[shift:] + policies[:shift]:
                    figures = measure(lan, backends, workdir, policy, args)
                    results[policy].append(figures)
                    print("round %d %-12s shares %s peaks %s p99 on arrival %d queued %.1f %% "
                          "%.0f req/s p99 %s errors %d"
                          % (number, policy,
                             "/".join("%.1f" % (100 * figures["share"][h]) for h in BACKENDS),
                             "/".join(str(figures["peak"][h]) for h in BACKENDS),
                             figures["p99_on_arrival"], 100 * figures["queued"], figures["rps"],
                             compare.fmt_latency(figures["p99"]), figures["errors"]), flush=True)
        finally:
            for child, _ in backends.values():
                child.stop()
            lan.close()
    print()
    print(report(results, args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
