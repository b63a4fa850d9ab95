"""fastlb side by side with HAProxy and nginx, on the same port, backends and load.

    python benchmarks/compare.py [--rounds 4] [--duration 5] [--scenarios keepalive,close,...]

Starts the backends (nginx serving static files on as many ports as the
scenarios need when it is installed, else ``fastlb-backend``), then, in
interleaved rounds, runs each contender on the same port in front of them and
drives it with ``wrk``:

  fastlb-cython   the compiled bridge (default ``-N 4``); fastlb-cython-N1,
                  fastlb-cython-N2 ... with that many threads
  fastlb-python   FASTLB_NO_EXTENSIONS=1
  haproxy         mode tcp, balance leastconn, option httpchk, nbthread 1;
                  haproxy-nbthread2 ... with that many threads
  haproxy-splice  the same with option splice-auto
  haproxy-forced-splice
                  the same with option splice-request and splice-response:
                  HAProxy as an operator tunes it for bulk, the baseline of
                  the bulk scenario when it runs
  nginx-stream    nginx ``stream`` proxy, least_conn, one worker
  direct          no proxy: wrk straight at the first backend (not in the
                  default list).  The ceiling for every proxy on this
                  machine, where wrk, the backends and the proxy share the cores.
  fastlb-cython@TREE, fastlb-python@TREE
                  fastlb from another checkout with its extensions built in
                  place (``git worktree add /tmp/base REV && cd /tmp/base &&
                  python setup.py build_ext --inplace``): a change measured
                  against its base in one run (not in the default list).

Scenarios: ``keepalive`` (100-byte responses, 32 keep-alive connections),
``close`` (100-byte responses, ``Connection: close``, 32 connections; with
``close-b10`` and ``close-b50`` over 10 and 50 backends), ``bulk``
(64 MiB downloads over 4 connections), ``c1000``, ``c9000`` and ``c10000``
(100-byte responses over 1,000, 9,000 and 10,000 keep-alive connections;
9,000 is the most that every proxy can hold under a hard limit of 20,000 open
files, two per relayed connection, so it is the one where p99 compares
proxies that all serve every client).

For each contender and scenario it prints the median over the rounds of
requests/s (MB/s for bulk), p50 and p99 latency, the proxy's CPU time per
request, or per gigabyte for bulk (user + system, from /proc), errors (wrk counts a connection left
without an answer for 2 s as a timeout, so a starved client shows here), and
every ratio to HAProxy from the same run (throughput and CPU), and
fastlb-cython's ratios to fastlb-python when both ran; ``--chart PNG`` draws
the ratios (matplotlib, ``pip install '.[bench]'``).
It installs nothing: missing programs are named with their Debian packages
(``haproxy nginx libnginx-mod-stream wrk``) and those contenders are skipped.
Only 127.0.0.1 is used.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SCENARIOS = {
    # name: (path, connections, wrk threads, extra wrk args, unit, backends)
    "keepalive": ("/100b", 32, 2, [], "req/s", 2),
    "close": ("/100b", 32, 2, ["-H", "Connection: close"], "req/s", 2),
    "close-b10": ("/100b", 32, 2, ["-H", "Connection: close"], "req/s", 10),
    "close-b50": ("/100b", 32, 2, ["-H", "Connection: close"], "req/s", 50),
    "bulk": ("/64m", 4, 2, [], "MB/s", 2),
    "c1000": ("/100b", 1000, 2, [], "req/s", 2),
    "c9000": ("/100b", 9000, 2, [], "req/s", 2),
    "c10000": ("/100b", 10000, 2, [], "req/s", 2),
}
# fastlb-cython-N2: fastlb with -N 2; haproxy-nbthread2: HAProxy with nbthread 2 (matched threads).
CONTENDERS = ["fastlb-cython", "fastlb-python", "haproxy", "haproxy-forced-splice", "nginx-stream"]
# Descriptors wanted for every process we start (raising the hard limit needs root).
FD_TARGET = 100_000


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("nothing listens on 127.0.0.1:%d after %gs" % (port, timeout))


def wait_closed(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.socket() as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(("127.0.0.1", port))
                return
        except OSError:
            time.sleep(0.05)


def get(port: int, path: str) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET %s HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n" % path.encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
        return data


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU of processes so far, from /proc (children included via threads)."""
    total = 0
    for pid in pids:
        try:
            fields = Path("/proc/%d/stat" % pid).read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError):
            pass
    return total / os.sysconf("SC_CLK_TCK")


def process_tree(pid: int) -> list[int]:
    pids = [pid]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    pids.append(int(entry.name))
            except (OSError, IndexError):
                pass
    return pids


def stop_process(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    """SIGTERM one process we started, SIGKILL it if it lingers."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


class Backends:
    """``count`` backends (one nginx listening on that many ports) serving /100b, /64m and /healthcheck."""

    def __init__(self, workdir: Path, count: int = 2):
        # nginx workers run as www-data: the files must be readable by anyone.
        os.chmod(workdir, 0o755)
        self.dir = workdir / "www"
        self.dir.mkdir(mode=0o755)
        (self.dir / "100b").write_bytes(b"x" * 99 + b"\n")
        with open(self.dir / "64m", "wb") as handle:
            handle.truncate(64 << 20)
        (self.dir / "healthcheck").write_bytes(b"0\n0\n")
        for path in self.dir.iterdir():
            os.chmod(path, 0o644)
        self.ports = []
        while len(self.ports) < count:
            port = free_port()
            if port not in self.ports:
                self.ports.append(port)
        self.procs: list[subprocess.Popen] = []
        if shutil.which("nginx"):
            self.kind = "nginx"
            conf = workdir / "backends.conf"
            servers = "\n".join("    server { listen 127.0.0.1:%d backlog=65535; root %s; }" % (port, self.dir)
                                 for port in self.ports)
            conf.write_text(NGINX_BACKENDS % {"servers": servers, "tmp": workdir})
            self.procs.append(subprocess.Popen(["nginx", "-c", str(conf), "-g", "daemon off;"],
                                               stderr=subprocess.DEVNULL))
        else:
            self.kind = "fastlb-backend"
            for port in self.ports:
                self.procs.append(subprocess.Popen(
                    # c10000 puts ~5,000 keep-alive connections on each backend.
                    [sys.executable, "-m", "fastlb.backend", str(port), "--dir", str(self.dir),
                     "--max-connections", "6000"],
                    stderr=subprocess.DEVNULL, env=_env()))
        for port in self.ports:
            wait_port(port)

    def stop(self) -> None:
        for proc in self.procs:
            stop_process(proc, 10)


NGINX_BACKENDS = """
worker_processes 1;
worker_rlimit_nofile 40000;
pid %(tmp)s/backends.pid;
error_log /dev/null;
events { worker_connections 30000; }
http {
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
    keepalive_timeout 120s;
    client_body_temp_path %(tmp)s/body;
    proxy_temp_path %(tmp)s/proxy;
    fastcgi_temp_path %(tmp)s/fastcgi;
    uwsgi_temp_path %(tmp)s/uwsgi;
    scgi_temp_path %(tmp)s/scgi;
%(servers)s
}
"""

HAPROXY = """
global
    nbthread %(nbthread)d
    maxconn %(maxconn)d
    # Pipes for splice-auto; the default (maxconn/4) would not fit the open-file limit.
    maxpipes 512
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
listen lb
    bind 127.0.0.1:%(port)d
    balance leastconn
    option httpchk GET /healthcheck
    %(splice)s
%(servers)s
"""

# HAProxy's splice settings per contender: none, automatic (it splices when it
# guesses a transfer is large), and forced both ways, as an operator tuning
# HAProxy for bulk would configure it.
HAPROXY_SPLICE = {"haproxy": "", "haproxy-splice": "option splice-auto",
                  "haproxy-forced-splice": "option splice-request\n    option splice-response"}

NGINX_STREAM = """
load_module /usr/lib/nginx/modules/ngx_stream_module.so;
worker_processes 1;
worker_rlimit_nofile 40000;
pid %(tmp)s/stream.pid;
error_log /dev/null;
events { worker_connections 30000; }
stream {
    upstream backends { least_conn; %(servers)s }
    server { listen 127.0.0.1:%(port)d backlog=65535; proxy_pass backends; }
}
"""


def _env(extra: dict | None = None, tree: Path = ROOT) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tree), env.get("PYTHONPATH", "")]))
    env.update(extra or {})
    return env


def _fastlb_tree(name: str) -> Path:
    """The checkout a fastlb contender runs from: this one, or TREE in ``fastlb-cython@TREE``."""
    return Path(name.split("@", 1)[1]) if "@" in name else ROOT


def _threads_in(name: str, default: int) -> int:
    """The thread count a contender name asks for (fastlb-cython-N2, haproxy-nbthread2), else default."""
    match = re.search(r"-(?:N|nbthread)(\d+)(?:@|$)", name)
    return int(match.group(1)) if match else default


def _base(name: str) -> str:
    """fastlb-cython-N2@TREE -> fastlb-cython; haproxy-nbthread2 -> haproxy."""
    return re.sub(r"-(?:N|nbthread)\d+$", "", name.split("@", 1)[0])


def start_contender(name: str, port: int, ports: list, workdir: Path, threads: int, extra: tuple = ()):
    """Start one contender; ``extra`` are further fastlb options (profile.py's --fastlb-args)."""
    base = _base(name)
    if base.startswith("fastlb"):
        env = _env({"FASTLB_NO_EXTENSIONS": "1" if base == "fastlb-python" else ""}, _fastlb_tree(name))
        return subprocess.Popen(
            # The same connection cap as HAProxy's maxconn: fastlb's default
            # keeps room for a splice pipe per four connections, as HAProxy's
            # own default does, which would cap the c9000 run below 9,000.
            [sys.executable, "-m", "fastlb", "-N", str(_threads_in(name, threads)), "--bind",
             "127.0.0.1", "--log-level", "warning", "--max-connections", str(max_connections()),
             str(port), *extra] + [str(p) for p in ports], env=env,
            # ``python -m`` puts the working directory first on sys.path,
            # before PYTHONPATH: run in the tree, or this checkout's fastlb
            # would be measured under another tree's name.
            cwd=str(_fastlb_tree(name)), stderr=subprocess.DEVNULL)
    if base.startswith("haproxy"):
        conf = workdir / ("%s.cfg" % name)
        servers = "\n".join("    server b%d 127.0.0.1:%d check inter 2s" % (i, p) for i, p in enumerate(ports))
        conf.write_text(HAPROXY % {"port": port, "servers": servers, "maxconn": max_connections(),
                                   "nbthread": _threads_in(name, 1), "splice": HAPROXY_SPLICE[base]})
        return subprocess.Popen(["haproxy", "-db", "-f", str(conf)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    conf = workdir / "stream.conf"
    conf.write_text(NGINX_STREAM % {"port": port, "tmp": workdir,
                                    "servers": " ".join("server 127.0.0.1:%d;" % p for p in ports)})
    return subprocess.Popen(["nginx", "-c", str(conf), "-g", "daemon off;"],
                            stderr=subprocess.DEVNULL)


def available(name: str) -> str:
    """'' when the contender can run, else the reason it cannot."""
    if name == "direct":
        return ""
    if _base(name) == "fastlb-cython":
        probe = subprocess.run([sys.executable, "-c", "import fastlb._bridge, fastlb._engine"],
                               env=_env(tree=_fastlb_tree(name)), capture_output=True,
                               cwd=str(_fastlb_tree(name)))
        return "" if probe.returncode == 0 else "compiled bridge not built (pip install -e .)"
    if _base(name) not in HAPROXY_SPLICE and name.startswith("haproxy"):
        return "unknown HAProxy contender (haproxy, haproxy-splice, haproxy-forced-splice, -nbthreadN)"
    if name.startswith("haproxy") and not shutil.which("haproxy"):
        return "needs the Debian package: haproxy"
    if name == "nginx-stream":
        if not shutil.which("nginx"):
            return "needs the Debian packages: nginx libnginx-mod-stream"
        if not Path("/usr/lib/nginx/modules/ngx_stream_module.so").exists():
            return "needs the Debian package: libnginx-mod-stream"
    return ""


UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}
SIZE = {"B": 1, "KB": 1024, "MB": 1024 ** 2, "GB": 1024 ** 3}


def raise_fd_limit() -> int:
    """10,000 connections need ~20,000 descriptors in the proxy: raise the limit for our children."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for target in (FD_TARGET, hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, max(target, hard)))
            return target
        except (ValueError, OSError):
            continue
    return soft


def max_connections() -> int:
    """Client connections a proxy can hold: two descriptors each, and some to spare."""
    return (resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 1200) // 2


def parse_wrk(text: str) -> dict:
    def latency(label: str) -> float:
        match = re.search(r"^\s*%s\s+([\d.]+)(us|ms|s)\s*$" % label, text, re.M)
        return float(match.group(1)) * UNITS[match.group(2)] if match else float("nan")

    requests = re.search(r"(\d+) requests in", text)
    total = re.search(r"requests in [\d.]+\w+, ([\d.]+)(B|KB|MB|GB) read", text)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    transfer = re.search(r"Transfer/sec:\s+([\d.]+)(B|KB|MB|GB)", text)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    return {
        "requests": int(requests.group(1)) if requests else 0,
        "rps": float(rps.group(1)) if rps else 0.0,
        "mbps": float(transfer.group(1)) * SIZE[transfer.group(2)] / 1e6 if transfer else 0.0,
        "bytes": float(total.group(1)) * SIZE[total.group(2)] if total else 0.0,
        "p50": latency("50%"), "p99": latency("99%"),
        "errors": sum(int(g) for g in errors.groups()) if errors else 0,
        "non2xx": int(non2xx.group(1)) if non2xx else 0,
    }


def run_wrk(port: int, scenario: str, duration: float) -> dict:
    path, conns, threads, extra, _, _ = SCENARIOS[scenario]
    # A connection with no answer for 2 s counts as a wrk timeout error: a
    # starved client shows up in the errors column.
    timeout = "2s" if scenario != "bulk" else "60s"
    cmd = ["wrk", "-t%d" % threads, "-c%d" % conns, "-d%gs" % duration, "--latency",
           "--timeout", timeout] + extra + ["http://127.0.0.1:%d%s" % (port, path)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 120)
    return parse_wrk(result.stdout)


def measure(name: str, scenario: str, args, backends: Backends, workdir: Path) -> dict:
    if name == "direct":
        figures = run_wrk(backends.ports[0], scenario, args.duration)
        figures["cpu_per_unit"] = float("nan")
        return figures
    port = args.port
    wait_closed(port)
    proc = start_contender(name, port, backends.ports[:SCENARIOS[scenario][5]], workdir, args.threads)
    try:
        wait_port(port)
        # Warm up and make sure the proxy routes (HAProxy's first check, fastlb's first round).
        deadline = time.monotonic() + 15
        while not get(port, "/100b").startswith(b"HTTP/1.1 200") and time.monotonic() < deadline:
            time.sleep(0.1)
        pids = process_tree(proc.pid)
        before = cpu_seconds(pids)
        figures = run_wrk(port, scenario, args.duration)
        figures["cpu"] = cpu_seconds(pids) - before
    finally:
        stop_process(proc)
    if SCENARIOS[scenario][4] == "MB/s":
        figures["cpu_per_unit"] = figures["cpu"] / ((figures["bytes"] or 1) / 1e9)
    else:
        figures["cpu_per_unit"] = figures["cpu"] / (figures["requests"] or 1) * 1e6
    return figures


def cpu_text(scenario: str, value: float) -> str:
    """CPU per request (µs) or per gigabyte relayed (s), as the scenario counts."""
    if value != value:
        return "-"
    return "%.2f s/GB" % value if SCENARIOS[scenario][4] == "MB/s" else "%.0f µs/req" % value


def fmt_latency(seconds: float) -> str:
    if seconds != seconds:
        return "-"
    return "%.2fms" % (seconds * 1e3) if seconds < 1 else "%.2fs" % seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds of wrk per measurement")
    parser.add_argument("--scenarios", default="keepalive,close,bulk,c1000,c9000,c10000")
    parser.add_argument("--contenders", default=",".join(CONTENDERS))
    parser.add_argument("--threads", type=int, default=4, help="fastlb -N (default 4)")
    parser.add_argument("--port", type=int, default=0, help="the proxies' port (default: a free one)")
    parser.add_argument("--chart", default="", help="also draw the ratios to HAProxy into this PNG "
                        "(needs matplotlib: pip install '.[bench]')")
    args = parser.parse_args(argv)
    args.port = args.port or free_port()
    scenarios = [s for s in args.scenarios.split(",") if s]
    unknown = set(scenarios) - set(SCENARIOS)
    if unknown:
        parser.error("unknown scenario(s): %s" % ", ".join(sorted(unknown)))
    if not shutil.which("wrk"):
        print("compare.py needs wrk: apt-get install wrk", file=sys.stderr)
        return 2
    raise_fd_limit()

    contenders = []
    for name in args.contenders.split(","):
        reason = available(name)
        if reason:
            print("skipping %s: %s" % (name, reason), file=sys.stderr)
        else:
            contenders.append(name)

    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="fastlb-compare-") as tmp:
        workdir = Path(tmp)
        backends = Backends(workdir, max(SCENARIOS[s][5] for s in scenarios))
        print("backends: %s on %s; proxies on 127.0.0.1:%d; %d round(s) of %gs; %d cores; "
              "open-file limit %d, so at most %d connections per proxy"
              % (backends.kind, backends.ports, args.port, args.rounds, args.duration,
                 os.cpu_count(), resource.getrlimit(resource.RLIMIT_NOFILE)[0],
                 max_connections()), flush=True)
        try:
            for round_number in range(1, args.rounds + 1):
                for scenario in scenarios:
                    for name in contenders:
                        figures = measure(name, scenario, args, backends, workdir)
                        results.setdefault((scenario, name), []).append(figures)
                        unit = SCENARIOS[scenario][4]
                        value = figures["mbps"] if unit == "MB/s" else figures["rps"]
                        print("round %d %-9s %-15s %10.1f %s  p99 %s  errors %d"
                              % (round_number, scenario, name, value, unit,
                                 fmt_latency(figures["p99"]), figures["errors"] + figures["non2xx"]),
                              flush=True)
        finally:
            backends.stop()
    print()
    print(report(results, scenarios, contenders, args))
    if args.chart:
        chart(results, scenarios, contenders, args.chart,
              "fastlb against HAProxy on %d cores, medians of %d interleaved rounds"
              % (os.cpu_count(), args.rounds))
        print("chart: %s" % args.chart)
    return 0


def baseline(scenario: str, results: dict) -> str:
    """The HAProxy a scenario is compared with: forced splice for bulk (how an expert configures it)."""
    if SCENARIOS[scenario][4] == "MB/s" and results.get((scenario, "haproxy-forced-splice")):
        return "haproxy-forced-splice"
    return "haproxy"


def summary(results: dict, scenarios: list, contenders: list) -> list[dict]:
    """One row per scenario and contender: medians, and ratios to the scenario's HAProxy."""
    rows = []
    for scenario in scenarios:
        key = "mbps" if SCENARIOS[scenario][4] == "MB/s" else "rps"
        base_runs = results.get((scenario, baseline(scenario, results)))
        base = statistics.median(r[key] for r in base_runs) if base_runs else None
        base_cpu = statistics.median(r["cpu_per_unit"] for r in base_runs) if base_runs else None
        for name in contenders:
            runs = results.get((scenario, name))
            if not runs:
                continue
            value = statistics.median(r[key] for r in runs)
            cpu = statistics.median(r["cpu_per_unit"] for r in runs)
            rows.append({
                "scenario": scenario, "contender": name, "value": value,
                "unit": SCENARIOS[scenario][4],
                "p50": statistics.median(r["p50"] for r in runs),
                "p99": statistics.median(r["p99"] for r in runs),
                "cpu": cpu, "errors": sum(r["errors"] + r["non2xx"] for r in runs),
                "ratio": value / base if base else float("nan"),
                "cpu_ratio": cpu / base_cpu if base_cpu and cpu == cpu else float("nan"),
                "baseline": baseline(scenario, results),
            })
    return rows


def report(results: dict, scenarios: list, contenders: list, args) -> str:
    lines = ["| scenario | contender | median | p50 | p99 | CPU | errors | vs HAProxy | CPU vs HAProxy |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in summary(results, scenarios, contenders):
        lines.append("| %s | %s | %.0f %s | %s | %s | %s | %d | %s | %s |" % (
            row["scenario"], row["contender"], row["value"], row["unit"], fmt_latency(row["p50"]),
            fmt_latency(row["p99"]), cpu_text(row["scenario"], row["cpu"]), row["errors"],
            "%.2fx" % row["ratio"] if row["ratio"] == row["ratio"] else "-",
            "%.2fx" % row["cpu_ratio"] if row["cpu_ratio"] == row["cpu_ratio"] else "-"))
    lines.append("")
    lines.append("Ratios are to HAProxy `nbthread 1`, and for bulk to HAProxy with forced splice "
                 "(`option splice-request` + `option splice-response`) when it ran.")
    for scenario in scenarios:
        compiled = results.get((scenario, "fastlb-cython"))
        python = results.get((scenario, "fastlb-python"))
        if compiled and python:
            key = "mbps" if SCENARIOS[scenario][4] == "MB/s" else "rps"
            lines.append("%s: fastlb-cython / fastlb-python = %.2fx throughput, %.2fx less CPU" % (
                scenario,
                statistics.median(r[key] for r in compiled) / statistics.median(r[key] for r in python),
                statistics.median(r["cpu_per_unit"] for r in python)
                / statistics.median(r["cpu_per_unit"] for r in compiled)))
    lines.append("")
    command = ("python benchmarks/compare.py --rounds %d --duration %g --scenarios %s --threads %d"
               % (args.rounds, args.duration, ",".join(scenarios), args.threads))
    if contenders != CONTENDERS:
        command += " --contenders %s" % ",".join(contenders)
    if args.chart:
        command += " --chart %s" % args.chart
    lines.append("Command: " + command)
    return "\n".join(lines)


def chart(results: dict, scenarios: list, contenders: list, path: str, title: str) -> None:
    """Throughput and CPU as ratios to HAProxy, per scenario and contender, as a PNG (matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in summary(results, scenarios, contenders) if r["ratio"] == r["ratio"]]
    shown = [c for c in contenders if any(r["contender"] == c for r in rows)]
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 0.55 * len(scenarios) * len(shown) + 1.5),
                                         sharey=True)
    height = 0.8 / max(1, len(shown))
    for i, name in enumerate(shown):
        ys, ratios, cpus = [], [], []
        for j, scenario in enumerate(scenarios):
            row = next((r for r in rows if r["contender"] == name and r["scenario"] == scenario), None)
            if row is None:
                continue
            ys.append(j + i * height)
            ratios.append(row["ratio"])
            cpus.append(row["cpu_ratio"] if row["cpu_ratio"] == row["cpu_ratio"] else 0)
        left.barh(ys, ratios, height=height, label=name)
        right.barh(ys, cpus, height=height, label=name)
    for axis, label in ((left, "throughput / HAProxy's (higher is better)"),
                        (right, "CPU per request or GB / HAProxy's (lower is better)")):
        axis.axvline(1.0, color="black", linewidth=0.8)
        axis.set_xlabel(label)
    left.set_yticks([j + 0.4 - height / 2 for j in range(len(scenarios))])
    left.set_yticklabels(scenarios)
    left.invert_yaxis()
    left.legend(loc="lower right", fontsize="small")
    figure.suptitle(title, fontsize="medium")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
