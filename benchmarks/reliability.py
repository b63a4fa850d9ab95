"""fastlb under faults and abuse, on both twins: the figures of docs/reliability.md.

    python benchmarks/reliability.py chaos     [--duration 60] [--clients 8] [--rounds 1] [--timeline]
    python benchmarks/reliability.py soak      [--connections 1000000]
    python benchmarks/reliability.py slowloris [--slow 2000] [--requests 3000] [--rounds 3]
    python benchmarks/reliability.py fdlimit   [--nofile 256] [--clients 2000]

Every part runs once per twin (``--twins cython,python``), prints one line per
run while it goes, then a Markdown table and the command line that made it.

chaos      8 client threads GET a 1 KiB file through fastlb on a fresh connection
           each, for 60 s, over three backends: A (``fastlb-backend``) is
           SIGKILLed every 10 s and restarted 1 s later; B answers requests but
           its probes hang for 10 s out of every 20 (``tests/faults.py``'s
           FaultServer in a helper process); C (``fastlb-backend``) stays.
           fastlb reads a ``--config`` file whose weight for C is flipped
           before each SIGHUP (every 5 s), so every reload applies a change.
           A request is lost when the client does not get the whole 200.
soak       ``wrk`` with ``Connection: close`` (a new connection per request)
           over two nginx backends (``fastlb-backend`` without nginx), 94 %
           100-byte files, 3 % 64 KiB, 2 % 256 KiB, 1 % 1 MiB, until fastlb has
           accepted ``--connections``; fastlb's descriptors and RSS before, at
           every tenth of the way, and after the load stopped.
slowloris  ``--slow`` clients each send a partial request one byte a second (and
           reconnect when closed); meanwhile one client times ``--requests``
           sequential GETs, each on a fresh connection, as ``idle.py`` does.
           The same is timed without them; fastlb's CPU in each window.
fdlimit    fastlb under ``prlimit --nofile=256:256`` and two ``fastlb-backend``
           while ``--clients`` keep-alive clients each send a GET every second
           (reconnecting when closed): once with the default
           ``--max-connections`` (derived from the limit) and once with
           ``--max-connections 2000``, which the limit cannot hold, so that
           ``accept`` fails with EMFILE.  While saturated: fastlb's CPU over
           10 s while a scraper reads /stats.json every second; a backend
           SIGKILLed (how long until fastlb marks it down) and restarted (how
           long until a probe marks it up); then the clients leave: how long
           until a request succeeds again, and how many of the next 100 do.

Only 127.0.0.1 is used; every load is bounded in time and count; only the
processes started here are stopped, by their PID.  Nothing is installed:
``wrk`` and ``nginx`` are Debian packages (``apt-get install wrk nginx``).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import re
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import compare  # noqa: E402  (ports, nginx backends, /proc CPU, wrk output)

ROOT = HERE.parent
TWINS = "cython,python"


# -- processes and what /proc says about them ----------------------------------------

def fd_count(pid: int) -> int:
    return len(os.listdir("/proc/%d/fd" % pid))


def fd_kinds(pid: int) -> dict:
    """The process's descriptors by kind: socket, pipe, anon_inode:[eventpoll], file ..."""
    kinds: dict = {}
    for name in os.listdir("/proc/%d/fd" % pid):
        try:
            target = os.readlink("/proc/%d/fd/%s" % (pid, name))
        except OSError:
            continue
        kind = target.split(":[", 1)[0] if ":[" in target else (
            target if target.startswith("anon_inode:") else "file")
        kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


def settled_fds(pid: int, samples: int = 5, every: float = 0.4) -> int:
    """The fewest descriptors over two seconds: a probe or an admin answer in flight is not a leak."""
    counts = []
    for index in range(samples):
        if index:
            time.sleep(every)
        counts.append(fd_count(pid))
    return min(counts)


def fd_difference(before: dict, after: dict) -> str:
    """What changed between two ``fd_kinds``, e.g. 'socket +1'; '' when nothing did."""
    return ", ".join("%s %+d" % (kind, after.get(kind, 0) - before.get(kind, 0))
                     for kind in sorted(set(before) | set(after))
                     if after.get(kind, 0) != before.get(kind, 0))


def rss_mib(pid: int) -> float:
    for line in Path("/proc/%d/status" % pid).read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process so far (every thread), from /proc."""
    return compare.cpu_seconds([pid])


def alive(proc: subprocess.Popen) -> bool:
    return proc.poll() is None


stop = compare.stop_process


def start_fastlb(twin: str, args: list, log: Path, prefix: tuple = ()) -> subprocess.Popen:
    env = compare._env({"FASTLB_NO_EXTENSIONS": "1" if twin == "python" else ""})
    with open(log, "ab") as stderr:
        return subprocess.Popen(list(prefix) + [sys.executable, "-m", "fastlb"] + args,
                                env=env, stderr=stderr, stdout=subprocess.DEVNULL)


def start_file_backend(port: int, www: Path, log: Path) -> subprocess.Popen:
    with open(log, "ab") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "fastlb.backend", str(port), "--dir", str(www)],
                                env=compare._env(), stderr=stderr)
    compare.wait_port(port)
    return proc


def helper(name: str, *options: str, log: Path) -> subprocess.Popen:
    """This script in a process of its own (the load and fault generators)."""
    with open(log, "ab") as stderr:
        return subprocess.Popen([sys.executable, str(Path(__file__).resolve()), name] + list(options),
                                env=compare._env(), stdout=subprocess.PIPE, stderr=stderr, text=True)


def stats(admin_port: int, timeout: float = 2.0) -> dict:
    """fastlb's /stats.json, or {} when the admin endpoint does not answer."""
    try:
        with socket.create_connection(("127.0.0.1", admin_port), timeout=timeout) as sock:
            sock.sendall(b"GET /stats.json HTTP/1.1\r\nHost: r\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        return json.loads(data.split(b"\r\n\r\n", 1)[1])
    except (OSError, ValueError, IndexError):
        return {}


def wait_for(predicate, timeout: float, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()


def log_lines(log: Path, pattern: str) -> list[str]:
    return [line for line in log.read_text(errors="replace").splitlines() if re.search(pattern, line)]


def seconds(value) -> str:
    return "never" if value is None else "%.2f s" % value


def percentile(samples: list, fraction: float) -> float:
    ordered = sorted(samples)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


# -- one HTTP request, and whether it was answered whole ---------------------------------

def fetch(port: int, path: str, timeout: float = 10.0) -> tuple[str, float]:
    """GET ``path`` on a fresh connection: ('ok' or why not, seconds)."""
    started = time.perf_counter()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(b"GET %s HTTP/1.1\r\nHost: reliability\r\nConnection: close\r\n\r\n"
                         % path.encode())
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
    except socket.timeout:
        return "timeout", time.perf_counter() - started
    except ConnectionRefusedError:
        return "refused", time.perf_counter() - started
    except ConnectionResetError:
        return "reset", time.perf_counter() - started
    except OSError as exc:
        return "error %s" % errno.errorcode.get(exc.errno, exc.errno), time.perf_counter() - started
    elapsed = time.perf_counter() - started
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return "no answer" if not data else "truncated head", elapsed
    status = head.split(b" ", 2)[1:2]
    if status != [b"200"]:
        return "status %s" % b"".join(status).decode("latin-1"), elapsed
    match = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
    if not match or int(match.group(1)) != len(body):
        return "short body", elapsed
    return "ok", elapsed


# == chaos ==================================================================================

CHAOS_CONFIG = """\
listen = "127.0.0.1:%(port)d"
backends = ["127.0.0.1:%(a)d", "127.0.0.1:%(b)d", { address = "127.0.0.1:%(c)d", weight = %(weight)d }]
"""


def chaos_run(twin: str, args, workdir: Path, round_number: int) -> dict:
    www = workdir / "www"
    port, admin, pa, pb, pc = (compare.free_port() for _ in range(5))
    config = workdir / ("chaos-%s.toml" % twin)
    weight = [1]

    def write_config() -> None:
        config.write_text(CHAOS_CONFIG % {"port": port, "a": pa, "b": pb, "c": pc, "weight": weight[0]})

    write_config()
    log = workdir / ("chaos-%s-%d.log" % (twin, round_number))
    backend_log = workdir / "backends.log"
    a = [start_file_backend(pa, www, backend_log)]
    c = start_file_backend(pc, www, backend_log)
    b = helper("hung-backend", "--port", str(pb), "--period", str(args.hang_period),
               "--lifetime", str(args.duration + 120), log=backend_log)
    compare.wait_port(pb)
    lb = start_fastlb(twin, ["--config", str(config), "--admin", str(admin)], log)
    events = {"kills": 0, "reloads": 0}
    results: list = []
    lock = threading.Lock()
    stop_load = threading.Event()
    try:
        compare.wait_port(port)
        if not wait_for(lambda: fetch(port, "/1k")[0] == "ok", 15, 0.1):
            raise RuntimeError("fastlb (%s) does not serve" % twin)
        time.sleep(1)
        start = {"fds": settled_fds(lb.pid), "rss": rss_mib(lb.pid), "kinds": fd_kinds(lb.pid)}
        peak = dict(start)
        budget = [args.max_requests]
        began = time.monotonic()

        def client() -> None:
            while not stop_load.is_set():
                with lock:
                    if budget[0] <= 0:
                        return
                    budget[0] -= 1
                sent_at = time.monotonic() - began
                outcome, seconds = fetch(port, "/1k")
                with lock:
                    results.append((outcome, seconds, sent_at))

        def chaos() -> None:
            next_kill, next_hup = began + args.kill_every, began + args.hup_every
            while not stop_load.wait(0.05):
                now = time.monotonic()
                if now - began >= args.duration:
                    return
                if now >= next_kill:
                    next_kill += args.kill_every
                    a[0].kill()
                    a[0].wait()
                    events["kills"] += 1
                    events.setdefault("log", []).append((now - began, "A killed"))
                    if stop_load.wait(args.down_for):
                        return
                    a[0] = start_file_backend(pa, www, backend_log)
                if now >= next_hup:
                    next_hup += args.hup_every
                    weight[0] = 3 - weight[0]
                    write_config()
                    lb.send_signal(signal.SIGHUP)
                    events["reloads"] += 1
                    events.setdefault("log", []).append((now - began, "SIGHUP"))

        threads = [threading.Thread(target=client) for _ in range(args.clients)]
        agent = threading.Thread(target=chaos)
        for thread in threads + [agent]:
            thread.start()
        while time.monotonic() - began < args.duration and any(t.is_alive() for t in threads):
            time.sleep(1)
            if alive(lb):
                peak["fds"] = max(peak["fds"], fd_count(lb.pid))
                peak["rss"] = max(peak["rss"], rss_mib(lb.pid))
        stop_load.set()
        for thread in threads + [agent]:
            thread.join(30)
        elapsed = time.monotonic() - began
        crashed = not alive(lb)
        final = stats(admin) if not crashed else {}
        # The end figures: B answers its probes again, so none hangs open
        # (a hung probe holds a descriptor until its 5 s deadline).
        b.send_signal(signal.SIGUSR1)
        wait_for(lambda: stats(admin).get("inflight", 1) == 0, 15, 0.2)
        time.sleep(6)
        end = {"fds": settled_fds(lb.pid), "rss": rss_mib(lb.pid), "kinds": fd_kinds(lb.pid)} \
            if not crashed else {}
    finally:
        stop_load.set()
        stop(lb)
        for proc in (a[0], c, b):
            stop(proc)
    lost = [o for o, _, _ in results if o != "ok"]
    causes: dict = {}
    for outcome in lost:
        causes[outcome] = causes.get(outcome, 0) + 1
    latencies = [s for o, s, _ in results if o == "ok"]
    timeline = []
    for window in range(0, int(elapsed + 0.999), 5):
        inside = [r for r in results if window <= r[2] < window + 5]
        ok = [s for o, s, _ in inside if o == "ok"]
        timeline.append((window, len(inside), len(inside) - len(ok), percentile(ok, 0.5),
                         percentile(ok, 0.99),
                         ", ".join("%s at %.1f s" % (what, t) for t, what in events.get("log", [])
                                   if window <= t < window + 5)))
    totals = final.get("totals", {})
    return {
        "twin": twin, "sent": len(results), "lost": len(lost), "causes": causes,
        "seconds": elapsed, "p50": percentile(latencies, 0.5), "p99": percentile(latencies, 0.99),
        "max": max(latencies or [float("nan")]), "start": start, "peak": peak, "end": end,
        "crashed": crashed, "kills": events["kills"], "sighups": events["reloads"],
        "reloads_logged": len(log_lines(log, r"reload: \d+ backend")),
        "downs_logged": len(log_lines(log, r"is down \(was")),
        "replays": totals.get("replays", 0), "no_backend": final.get("no_backend", 0),
        "internal_errors": final.get("internal_errors", 0),
        "tracebacks": len(log_lines(log, r"Traceback")),
        "timeline": timeline, "log_excerpt": log_lines(log, r"is (up|down) \(was"),
    }


def chaos(args) -> int:
    rows = []
    with tempfile.TemporaryDirectory(prefix="fastlb-chaos-") as tmp:
        workdir = Path(tmp)
        (workdir / "www").mkdir()
        (workdir / "www" / "1k").write_bytes(b"c" * 1023 + b"\n")
        for round_number in range(1, args.rounds + 1):
            for twin in args.twins:
                row = chaos_run(twin, args, workdir, round_number)
                row["round"] = round_number
                rows.append(row)
                print("round %d %-7s %6d requests in %.0f s, %d lost %s, p50 %.2f ms p99 %.2f ms, "
                      "fds %d -> %s, RSS %.1f -> %s MiB, %d kills, %d SIGHUPs (%d reloads logged), "
                      "%d replays, %d downs logged, internal errors %d%s"
                      % (round_number, twin, row["sent"], row["seconds"], row["lost"],
                         row["causes"] or "", row["p50"] * 1e3, row["p99"] * 1e3,
                         row["start"]["fds"], row["end"].get("fds", "crashed"), row["start"]["rss"],
                         "%.1f" % row["end"]["rss"] if row["end"] else "crashed", row["kills"],
                         row["sighups"], row["reloads_logged"], row["replays"], row["downs_logged"],
                         row["internal_errors"], ", CRASHED" if row["crashed"] else ""), flush=True)
                if row["end"] and row["end"]["fds"] != row["start"]["fds"]:
                    print("    descriptors by kind, end against start: %s"
                          % fd_difference(row["start"]["kinds"], row["end"]["kinds"]))
                if args.timeline:
                    for window, sent, lost, p50, p99, what in row["timeline"]:
                        print("    %3d-%3d s  %6d requests  %d lost  p50 %7.2f ms  p99 %7.2f ms  %s"
                              % (window, window + 5, sent, lost, p50 * 1e3, p99 * 1e3, what))
                    for line in row["log_excerpt"]:
                        print("    " + line.split(" ", 2)[-1])
                if args.keep_logs:
                    for log in workdir.glob("*.log"):
                        shutil.copy(log, Path(args.keep_logs) / log.name)
    print()
    print("| twin | round | requests | lost | p50 | p99 | slowest | fds start → end (peak) | "
          "RSS start → end (peak) | SIGKILLs | SIGHUPs / reloads | replays |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in sorted(rows, key=lambda r: (args.twins.index(r["twin"]), r["round"])):
        print("| %s | %d | %d | %d%s | %.2f ms | %.2f ms | %.0f ms | %d → %s (%d) | %.1f → %s (%.1f) MiB "
              "| %d | %d / %d | %d |"
              % (row["twin"], row["round"], row["sent"], row["lost"],
                 " (%s)" % ", ".join("%s %d" % kv for kv in row["causes"].items()) if row["causes"] else "",
                 row["p50"] * 1e3, row["p99"] * 1e3, row["max"] * 1e3, row["start"]["fds"],
                 row["end"].get("fds", "crashed"), row["peak"]["fds"], row["start"]["rss"],
                 "%.1f" % row["end"]["rss"] if row["end"] else "crashed", row["peak"]["rss"],
                 row["kills"], row["sighups"], row["reloads_logged"], row["replays"]))
    print()
    print("Command: python benchmarks/reliability.py chaos --duration %g --clients %d --rounds %d "
          "--twins %s" % (args.duration, args.clients, args.rounds, ",".join(args.twins)))
    return 1 if any(r["crashed"] for r in rows) else 0


def hung_backend(args) -> int:
    """A backend that answers requests, and whose probes hang every other ``--period``."""
    sys.path.insert(0, str(ROOT / "tests"))
    from faults import OK, SILENT, FaultServer

    stopped, healed = threading.Event(), threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    signal.signal(signal.SIGUSR1, lambda *_: healed.set())    # answer every probe from now on
    server = FaultServer(probe=OK, port=args.port, name="hung-probes")
    try:
        began = time.monotonic()
        hung, toggle_at = False, began + args.period
        while not stopped.wait(0.05) and time.monotonic() - began < args.lifetime:
            if time.monotonic() >= toggle_at:
                toggle_at += args.period
                hung = not hung
            server.probe_mode = SILENT if hung and not healed.is_set() else OK
    finally:
        server.stop()
    return 0


# == soak ===================================================================================

SOAK_MIX = [("/100b", 940), ("/64k", 30), ("/256k", 20), ("/1m", 10)]
SOAK_LUA = """
local paths = {}
for _, entry in ipairs({%s}) do
  for _ = 1, entry[2] do paths[#paths + 1] = entry[1] end
end
local counter = 0
function setup(thread) counter = counter + 1; thread:set("id", counter) end
function init(args) math.randomseed(1000 + id) end
function request() return wrk.format(nil, paths[math.random(#paths)]) end
"""


def soak_run(twin: str, args, backends, workdir: Path, lua: Path) -> dict:
    port, admin = compare.free_port(), compare.free_port()
    log = workdir / ("soak-%s.log" % twin)
    lb = start_fastlb(twin, ["--bind", "127.0.0.1", "--admin", str(admin), str(port)]
                      + [str(p) for p in backends.ports], log)
    samples = []
    try:
        compare.wait_port(port)
        if not wait_for(lambda: fetch(port, "/100b")[0] == "ok", 15, 0.1):
            raise RuntimeError("fastlb (%s) does not serve" % twin)
        time.sleep(1)

        def sample(label: str, began: float) -> dict:
            figures = stats(admin)
            row = {"label": label, "seconds": time.monotonic() - began,
                   "accepted": figures.get("accepted", -1), "inflight": figures.get("inflight", -1),
                   "fds": settled_fds(lb.pid) if label in ("start", "end") else fd_count(lb.pid),
                   "rss": rss_mib(lb.pid)}
            samples.append(row)
            print("  %-7s %-6s %7.0f s  accepted %8d  in flight %4d  fds %5d  RSS %6.1f MiB"
                  % (twin, label, row["seconds"], row["accepted"], row["inflight"], row["fds"],
                     row["rss"]), flush=True)
            return row

        began = time.monotonic()
        first = sample("start", began)
        target = first["accepted"] + args.connections
        cpu_before = cpu_seconds(lb.pid)
        with open(workdir / ("wrk-%s.out" % twin), "w+") as out:
            wrk = subprocess.Popen(
                ["wrk", "-t2", "-c%d" % args.concurrency, "-d%ds" % args.max_seconds, "--timeout", "10s",
                 "-H", "Connection: close", "-s", str(lua), "http://127.0.0.1:%d/" % port],
                stdout=out, stderr=subprocess.STDOUT)
            milestone = 1
            while wrk.poll() is None:
                time.sleep(0.5)
                accepted = stats(admin).get("accepted", 0)
                if accepted >= first["accepted"] + args.connections * milestone / 10:
                    sample("%d%%" % (milestone * 10), began)
                    milestone = accepted * 10 // args.connections + 1 if accepted < target else 11
                if accepted >= target:
                    wrk.send_signal(signal.SIGINT)
                    wrk.wait(60)
                if not alive(lb):
                    wrk.kill()
                    wrk.wait()
                    break
            load_seconds = time.monotonic() - began
            out.seek(0)
            wrk_text = out.read()
        crashed = not alive(lb)
        cpu = cpu_seconds(lb.pid) - cpu_before if not crashed else float("nan")
        if not crashed:
            wait_for(lambda: stats(admin).get("inflight", 1) == 0, 30, 0.2)
            time.sleep(2)
            last = sample("end", began)
        final = stats(admin)
    finally:
        stop(lb)
    figures = compare.parse_wrk(wrk_text)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", wrk_text)
    return {
        "twin": twin, "samples": samples, "connections": (final.get("accepted", 0) - first["accepted"]),
        "seconds": load_seconds, "cpu": cpu, "wrk_requests": figures["requests"],
        "wrk_errors": errors.groups() if errors else ("0", "0", "0", "0"),
        "non2xx": figures["non2xx"], "no_backend": final.get("no_backend", 0),
        "queue_full": final.get("queue_full", 0), "internal_errors": final.get("internal_errors", 0),
        "crashed": crashed, "end": last if not crashed else None,
        "bytes": final.get("totals", {}).get("bytes_down", 0),
        "tracebacks": len(log_lines(log, r"Traceback")),
    }


def soak(args) -> int:
    if not shutil.which("wrk"):
        print("soak needs wrk: apt-get install wrk", file=sys.stderr)
        return 2
    compare.raise_fd_limit()
    rows = []
    with tempfile.TemporaryDirectory(prefix="fastlb-soak-") as tmp:
        workdir = Path(tmp)
        backends = compare.Backends(workdir)
        for name, size in (("64k", 64 << 10), ("256k", 256 << 10), ("1m", 1 << 20)):
            (backends.dir / name).write_bytes(b"s" * size)
            os.chmod(backends.dir / name, 0o644)
        lua = workdir / "mix.lua"
        lua.write_text(SOAK_LUA % ", ".join('{"%s", %d}' % entry for entry in SOAK_MIX))
        print("backends: %s on %s; %d connections per twin, %d at a time" % (
            backends.kind, backends.ports, args.connections, args.concurrency), flush=True)
        try:
            for twin in args.twins:
                row = soak_run(twin, args, backends, workdir, lua)
                rows.append(row)
                print("%s: %d connections in %.0f s (%.0f/s), %.1f GB down, wrk: %d requests, socket "
                      "errors connect/read/write/timeout %s, non-2xx %d; fastlb: no backend %d, "
                      "queue full %d, internal errors %d%s"
                      % (twin, row["connections"], row["seconds"], row["connections"] / row["seconds"],
                         row["bytes"] / 1e9, row["wrk_requests"], "/".join(row["wrk_errors"]),
                         row["non2xx"], row["no_backend"], row["queue_full"], row["internal_errors"],
                         ", CRASHED" if row["crashed"] else ""), flush=True)
                if args.keep_logs:
                    for log in workdir.glob("*-%s.*" % twin):
                        shutil.copy(log, Path(args.keep_logs) / log.name)
        finally:
            backends.stop()
    print()
    print("| twin | connections | time | fds start / 10 %…100 % (max) / end | "
          "RSS start / 10 % / 50 % / 100 % / end | errors (wrk socket, non-2xx; fastlb 500/503) |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        during = [s for s in row["samples"] if s["label"].endswith("%")]
        by_label = {s["label"]: s for s in row["samples"]}
        rss = " / ".join("%.1f" % by_label[k]["rss"] if k in by_label else "-"
                         for k in ("start", "10%", "50%", "100%", "end"))
        print("| %s | %d | %.0f s (%.0f/s) | %d / %s (%d) / %s | %s MiB | %d, %d; %d, %d |"
              % (row["twin"], row["connections"], row["seconds"], row["connections"] / row["seconds"],
                 by_label["start"]["fds"], "–".join(str(f) for f in sorted({min(s["fds"] for s in during),
                                                                          max(s["fds"] for s in during)}))
                 if during else "-", max([s["fds"] for s in during] or [0]),
                 row["end"]["fds"] if row["end"] else "crashed", rss,
                 sum(int(e) for e in row["wrk_errors"]), row["non2xx"], row["no_backend"],
                 row["queue_full"]))
    print()
    print("Command: python benchmarks/reliability.py soak --connections %d --concurrency %d --twins %s"
          % (args.connections, args.concurrency, ",".join(args.twins)))
    return 1 if any(r["crashed"] for r in rows) else 0


# == slowloris ==============================================================================

def slowloris_run(twin: str, args, backends, workdir: Path) -> dict:
    port, admin = compare.free_port(), compare.free_port()
    log = workdir / ("slowloris-%s.log" % twin)
    lb = start_fastlb(twin, ["--bind", "127.0.0.1", "--admin", str(admin), str(port)]
                      + [str(p) for p in backends.ports], log)
    slow = None
    try:
        compare.wait_port(port)
        if not wait_for(lambda: fetch(port, "/100b")[0] == "ok", 15, 0.1):
            raise RuntimeError("fastlb (%s) does not serve" % twin)

        def window(label: str) -> dict:
            before, started = cpu_seconds(lb.pid), time.monotonic()
            samples = []
            failures = 0
            for _ in range(args.requests):
                outcome, seconds = fetch(port, "/100b")
                if outcome == "ok":
                    samples.append(seconds)
                else:
                    failures += 1
            wall = time.monotonic() - started
            return {"label": label, "p50": percentile(samples, 0.5), "p99": percentile(samples, 0.99),
                    "failures": failures, "cpu": (cpu_seconds(lb.pid) - before) / wall,
                    "held": stats(admin).get("inflight", -1)}

        def idle_cpu(seconds: float) -> float:
            before = cpu_seconds(lb.pid)
            time.sleep(seconds)
            return (cpu_seconds(lb.pid) - before) / seconds

        quiet_cpu = idle_cpu(args.cpu_window)
        without = window("without")
        slow = helper("slow-clients", "--port", str(port), "--clients", str(args.slow),
                      "--lifetime", str(args.slow_lifetime), log=workdir / "helpers.log")
        if not wait_for(lambda: stats(admin).get("inflight", 0) >= args.slow, 60, 0.2):
            raise RuntimeError("fastlb does not hold %d slow clients" % args.slow)
        trickle_cpu = idle_cpu(args.cpu_window)
        with_slow = window("with")
        slow.send_signal(signal.SIGTERM)
        report = json.loads(slow.communicate(timeout=30)[0] or "{}")
        crashed = not alive(lb)
    finally:
        if slow is not None and alive(slow):
            slow.kill()
            slow.wait()
        stop(lb)
    return {"twin": twin, "without": without, "with": with_slow, "quiet_cpu": quiet_cpu,
            "trickle_cpu": trickle_cpu, "slow": report, "crashed": crashed}


def slowloris(args) -> int:
    compare.raise_fd_limit()
    rows = []
    with tempfile.TemporaryDirectory(prefix="fastlb-slowloris-") as tmp:
        workdir = Path(tmp)
        backends = compare.Backends(workdir)
        print("backends: %s on %s; %d slow clients; %d sequential requests per window" % (
            backends.kind, backends.ports, args.slow, args.requests), flush=True)
        try:
            for round_number in range(1, args.rounds + 1):
                for twin in args.twins:
                    row = slowloris_run(twin, args, backends, workdir)
                    rows.append(row)
                    print("round %d %-7s without: p50 %.2f ms p99 %.2f ms CPU %.0f %% | %d slow held, "
                          "alone CPU %.1f %% | with: p50 %.2f ms p99 %.2f ms CPU %.0f %% | failures %d/%d "
                          "| slow clients: %s"
                          % (round_number, twin, row["without"]["p50"] * 1e3, row["without"]["p99"] * 1e3,
                             row["without"]["cpu"] * 100, row["with"]["held"], row["trickle_cpu"] * 100,
                             row["with"]["p50"] * 1e3, row["with"]["p99"] * 1e3, row["with"]["cpu"] * 100,
                             row["without"]["failures"], row["with"]["failures"], row["slow"]),
                          flush=True)
        finally:
            backends.stop()
    print()
    print("| twin | slow clients | p50 | p99 | fastlb CPU while timed | fastlb CPU, slow clients alone |")
    print("|---|---|---|---|---|---|")
    for twin in args.twins:
        runs = [r for r in rows if r["twin"] == twin]
        for key, label in (("without", "0"), ("with", str(args.slow))):
            med = lambda f: statistics.median(f(r) for r in runs)  # noqa: E731
            print("| %s | %s | %.2f ms | %.2f ms | %.0f %% | %s |"
                  % (twin, label, med(lambda r: r[key]["p50"]) * 1e3, med(lambda r: r[key]["p99"]) * 1e3,
                     med(lambda r: r[key]["cpu"]) * 100,
                     "%.1f %% (idle: %.1f %%)" % (med(lambda r: r["trickle_cpu"]) * 100,
                                                  med(lambda r: r["quiet_cpu"]) * 100)
                     if key == "with" else "-"))
    print()
    print("Command: python benchmarks/reliability.py slowloris --slow %d --requests %d --rounds %d --twins %s%s"
          % (args.slow, args.requests, args.rounds, ",".join(args.twins),
             " --cpu-window %g" % args.cpu_window if args.cpu_window != 10.0 else ""))
    return 1 if any(r["crashed"] for r in rows) else 0


def slow_clients(args) -> int:
    """``--clients`` connections each sending a request head one byte a second, never finishing it."""
    head = b"GET /100b HTTP/1.1\r\nHost: slowloris\r\n"
    filler = b"X-Slow: a\r\n"
    stopped = []
    signal.signal(signal.SIGTERM, lambda *_: stopped.append(1))
    selector = selectors.DefaultSelector()
    conns: dict = {}                       # socket -> bytes sent
    counts = {"connected": 0, "closed_by_peer": 0, "connect_errors": 0, "bytes": 0}

    def connect() -> None:
        try:
            sock = socket.create_connection(("127.0.0.1", args.port), timeout=5)
        except OSError:
            counts["connect_errors"] += 1
            return
        sock.setblocking(False)
        conns[sock] = 0
        selector.register(sock, selectors.EVENT_READ)
        counts["connected"] += 1

    def drop(sock) -> None:
        selector.unregister(sock)
        del conns[sock]
        sock.close()

    began = time.monotonic()
    while len(conns) < args.clients and not stopped and time.monotonic() - began < 60:
        connect()
    tick = 0
    while not stopped and time.monotonic() - began < args.lifetime:
        # Each tick sends a byte on a tenth of the connections: each gets one a second.
        for key, _ in selector.select(0.1):
            sock = key.fileobj
            try:
                data = sock.recv(65536)
            except OSError:
                data = b""
            if not data:
                counts["closed_by_peer"] += 1
                drop(sock)
        for index, sock in enumerate(list(conns)):
            if index % 10 != tick % 10:
                continue
            sent = conns[sock]
            byte = head[sent:sent + 1] if sent < len(head) else filler[(sent - len(head)) % len(filler):][:1]
            try:
                sock.send(byte)
                conns[sock] = sent + 1
                counts["bytes"] += 1
            except OSError:
                counts["closed_by_peer"] += 1
                drop(sock)
        tick += 1
        for _ in range(min(100, args.clients - len(conns))):   # at most 100 reconnects a tick
            connect()
    for sock in list(conns):
        drop(sock)
    print(json.dumps(counts), flush=True)
    return 0


# == descriptor exhaustion =====================================================================

def fdlimit_run(twin: str, variant: str, args, workdir: Path) -> dict:
    www = workdir / "www"
    port, admin, p1, p2 = (compare.free_port() for _ in range(4))
    log = workdir / ("fdlimit-%s-%s.log" % (variant, twin))
    backend_log = workdir / "backends.log"
    b1, b2 = start_file_backend(p1, www, backend_log), start_file_backend(p2, www, backend_log)
    options = ["--bind", "127.0.0.1", "--admin", str(admin)]
    if variant == "over":
        options += ["--max-connections", str(args.clients)]
    lb = start_fastlb(twin, options + [str(port), str(p1), str(p2)], log,
                      prefix=("prlimit", "--nofile=%d:%d" % (args.nofile, args.nofile), "--"))
    clients = None
    row: dict = {"twin": twin, "variant": variant}
    try:
        compare.wait_port(port)
        if not wait_for(lambda: fetch(port, "/100b")[0] == "ok", 15, 0.1):
            raise RuntimeError("fastlb (%s) does not serve" % twin)
        first = stats(admin)
        row["max_connections"] = first.get("max_connections", -1)
        row["fds_start"], row["kinds_start"] = settled_fds(lb.pid), fd_kinds(lb.pid)
        clients = helper("busy-clients", "--port", str(port), "--clients", str(args.clients),
                         "--lifetime", str(args.saturate + 120), log=workdir / "helpers.log")
        # Saturated: every slot fastlb may use is held, the rest wait.  A
        # scraper reads /stats.json every second meanwhile, as Prometheus would.
        time.sleep(args.ramp)
        scraped: list = []
        done = threading.Event()

        def scrape() -> None:
            while not done.wait(1.0):
                scraped.append(stats(admin, timeout=2))

        scraper = threading.Thread(target=scrape)
        scraper.start()
        try:
            before, started = cpu_seconds(lb.pid), time.monotonic()
            time.sleep(args.saturate)
            row["cpu_saturated"] = (cpu_seconds(lb.pid) - before) / (time.monotonic() - started)
        finally:
            done.set()
            scraper.join(10)
        answered = [one for one in scraped if one]
        row["admin_answered"] = "%d/%d" % (len(answered), len(scraped))
        row["inflight"] = answered[-1]["inflight"] if answered else -1
        row["at_capacity"] = answered[-1]["at_capacity"] if answered else None
        row["fds_saturated"] = fd_count(lb.pid)
        # A backend dies while fastlb has no descriptor to spare, and comes
        # back: only a probe can mark it up again.
        name = re.escape("127.0.0.1:%d" % p2)
        killed_at = time.monotonic()
        b2.kill()
        b2.wait()
        marked = wait_for(lambda: log_lines(log, r"backend %s is down" % name), 30, 0.1)
        row["down_after"] = time.monotonic() - killed_at if marked else None
        row["down_reason"] = marked[0].split(": ", 1)[-1] if marked else ""
        restarted_at = time.monotonic()
        b2 = start_file_backend(p2, www, backend_log)
        back = wait_for(lambda: log_lines(log, r"backend %s is up \(was down\)" % name), 30, 0.1)
        row["up_after"] = time.monotonic() - restarted_at if back else None
        # The load drops: the clients leave.
        clients.send_signal(signal.SIGTERM)
        report = clients.communicate(timeout=60)[0]
        row["clients"] = json.loads(report or "{}")
        left_at = time.monotonic()
        recovered = wait_for(lambda: fetch(port, "/100b", timeout=2)[0] == "ok", 60, 0.1)
        row["recovered_after"] = time.monotonic() - left_at if recovered else None
        outcomes = [fetch(port, "/100b")[0] for _ in range(100)]
        row["after_ok"] = outcomes.count("ok")
        row["crashed"] = not alive(lb)
        wait_for(lambda: stats(admin).get("inflight", 1) == 0, 15, 0.2)
        row["fds_end"] = settled_fds(lb.pid) if not row["crashed"] else -1
        row["fd_change"] = fd_difference(row["kinds_start"], fd_kinds(lb.pid)) if not row["crashed"] else ""
        row["internal_errors"] = stats(admin).get("internal_errors", -1)
        row["tracebacks"] = len(log_lines(log, "Traceback"))
        row["accept_failed_logged"] = len(log_lines(log, "accept failed"))
    finally:
        if clients is not None and alive(clients):
            clients.kill()
            clients.wait()
        stop(lb)
        for proc in (b1, b2):
            stop(proc)
    row.setdefault("crashed", not alive(lb) and lb.returncode not in (0, -signal.SIGTERM))
    return row


def fdlimit(args) -> int:
    compare.raise_fd_limit()
    rows = []
    with tempfile.TemporaryDirectory(prefix="fastlb-fdlimit-") as tmp:
        workdir = Path(tmp)
        (workdir / "www").mkdir()
        (workdir / "www" / "100b").write_bytes(b"x" * 99 + b"\n")
        for variant in args.variants:
            for twin in args.twins:
                row = fdlimit_run(twin, variant, args, workdir)
                rows.append(row)
                print("%-7s %-7s cap %s: saturated CPU %.1f %%, %s in flight, admin answered %s, "
                      "fds %d -> %d -> %d, 'accept failed' logged %d, killed backend down after %s (%s), "
                      "restarted one up after %s, recovered %s after the clients left, %d/100 ok after, "
                      "clients %s, internal errors %s%s"
                      % (twin, variant, row["max_connections"], row["cpu_saturated"] * 100,
                         row["inflight"], row["admin_answered"], row["fds_start"],
                         row["fds_saturated"], row["fds_end"], row["accept_failed_logged"],
                         seconds(row["down_after"]), row["down_reason"], seconds(row["up_after"]),
                         seconds(row["recovered_after"]), row["after_ok"],
                         row["clients"], row["internal_errors"], ", CRASHED" if row["crashed"] else ""),
                      flush=True)
                if row.get("fd_change"):
                    print("    descriptors by kind, end against start: %s" % row["fd_change"])
                if args.keep_logs:
                    for log in workdir.glob("*.log"):
                        shutil.copy(log, Path(args.keep_logs) / log.name)
    print()
    print("| twin | --max-connections | fastlb CPU saturated | held | /stats.json answered | "
          "killed backend down | restarted backend up | first success after the load left | "
          "ok of 100 after | fds start → saturated → end | crashed |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print("| %s | %s%s | %.1f %% | %s | %s | %s | %s | %s | %d | %d → %d → %d | %s |"
              % (row["twin"], row["max_connections"], " (default)" if row["variant"] == "default" else "",
                 row["cpu_saturated"] * 100, row["inflight"] if row["inflight"] >= 0 else "-",
                 row["admin_answered"], seconds(row["down_after"]), seconds(row["up_after"]),
                 seconds(row["recovered_after"]), row["after_ok"], row["fds_start"],
                 row["fds_saturated"], row["fds_end"], "yes" if row["crashed"] else "no"))
    print()
    print("Command: python benchmarks/reliability.py fdlimit --nofile %d --clients %d --variants %s --twins %s"
          % (args.nofile, args.clients, ",".join(args.variants), ",".join(args.twins)))
    return 1 if any(r["crashed"] for r in rows) else 0


def busy_clients(args) -> int:
    """``--clients`` keep-alive connections, each sending a GET every second; reconnect when closed."""
    request = b"GET /100b HTTP/1.1\r\nHost: busy\r\n\r\n"
    stopped = []
    signal.signal(signal.SIGTERM, lambda *_: stopped.append(1))
    selector = selectors.DefaultSelector()
    counts = {"ok": 0, "other_status": 0, "closed": 0, "connect_errors": 0, "max_connected": 0}
    conns: dict = {}          # socket -> [connected?, bytes received, next send time, awaiting?]
    retry_at: list = []       # times at which a lost connection is made again

    def connect() -> None:
        sock = socket.socket()
        sock.setblocking(False)
        code = sock.connect_ex(("127.0.0.1", args.port))
        if code not in (0, errno.EINPROGRESS):
            counts["connect_errors"] += 1
            sock.close()
            retry_at.append(time.monotonic() + 1)
            return
        conns[sock] = [False, b"", 0.0, False]
        selector.register(sock, selectors.EVENT_WRITE)

    def drop(sock, why: str) -> None:
        counts[why] += 1
        selector.unregister(sock)
        del conns[sock]
        sock.close()
        retry_at.append(time.monotonic() + 1)

    began = time.monotonic()
    for _ in range(args.clients):
        connect()
    while not stopped and time.monotonic() - began < args.lifetime:
        now = time.monotonic()
        for key, events in selector.select(0.05):
            sock = key.fileobj
            state = conns[sock]
            if not state[0]:
                if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                    drop(sock, "connect_errors")
                    continue
                state[0] = True
                selector.modify(sock, selectors.EVENT_READ)
                continue
            try:
                data = sock.recv(65536)
            except OSError:
                data = b""
            if not data:
                drop(sock, "closed")
                continue
            state[1] += data
            while b"\r\n\r\n" in state[1]:
                head, _, rest = state[1].partition(b"\r\n\r\n")
                match = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
                length = int(match.group(1)) if match else 0
                if len(rest) < length:
                    break
                counts["ok" if head.startswith(b"HTTP/1.1 200") else "other_status"] += 1
                state[1] = rest[length:]
                state[3] = False
                state[2] = now + 1
        for sock, state in list(conns.items()):
            if state[0] and not state[3] and state[2] <= now:
                try:
                    sock.send(request)
                    state[3] = True
                except OSError:
                    drop(sock, "closed")
        counts["max_connected"] = max(counts["max_connected"], sum(1 for s in conns.values() if s[0]))
        while retry_at and retry_at[0] <= now and not stopped:
            retry_at.pop(0)
            connect()
    for sock in list(conns):
        sock.close()
    print(json.dumps(counts), flush=True)
    return 0


# -- command line -------------------------------------------------------------------------------

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="part", required=True)

    def part(name: str, **defaults):
        command = sub.add_parser(name)
        command.add_argument("--twins", default=TWINS, type=lambda s: [t for t in s.split(",") if t])
        command.add_argument("--keep-logs", default="", metavar="DIR",
                             help="copy fastlb's and the backends' logs there")
        return command

    command = part("chaos")
    command.add_argument("--duration", type=float, default=60.0)
    command.add_argument("--clients", type=int, default=8)
    command.add_argument("--rounds", type=int, default=1)
    command.add_argument("--max-requests", type=int, default=2_000_000, help="bound on the requests sent")
    command.add_argument("--kill-every", type=float, default=10.0)
    command.add_argument("--down-for", type=float, default=1.0)
    command.add_argument("--hup-every", type=float, default=5.0)
    command.add_argument("--hang-period", type=float, default=10.0)
    command.add_argument("--timeline", action="store_true",
                         help="also print every 5 s window and fastlb's backend state changes")

    command = part("soak")
    command.add_argument("--connections", type=int, default=1_000_000)
    command.add_argument("--concurrency", type=int, default=32)
    command.add_argument("--max-seconds", type=int, default=3600, help="bound on each twin's load")

    command = part("slowloris")
    command.add_argument("--slow", type=int, default=2000)
    command.add_argument("--requests", type=int, default=3000)
    command.add_argument("--rounds", type=int, default=3)
    command.add_argument("--cpu-window", type=float, default=10.0)
    command.add_argument("--slow-lifetime", type=float, default=600.0)

    command = part("fdlimit")
    command.add_argument("--nofile", type=int, default=256)
    command.add_argument("--clients", type=int, default=2000)
    command.add_argument("--variants", default="default,over", type=lambda s: [v for v in s.split(",") if v])
    command.add_argument("--ramp", type=float, default=5.0, help="seconds for the clients to pile up")
    command.add_argument("--saturate", type=float, default=10.0, help="seconds of each saturated window")

    command = sub.add_parser("hung-backend", help="(helper) a backend whose probes hang by turns")
    command.add_argument("--port", type=int, required=True)
    command.add_argument("--period", type=float, default=10.0)
    command.add_argument("--lifetime", type=float, default=600.0)
    for name in ("slow-clients", "busy-clients"):
        command = sub.add_parser(name, help="(helper) load for slowloris / fdlimit")
        command.add_argument("--port", type=int, required=True)
        command.add_argument("--clients", type=int, default=2000)
        command.add_argument("--lifetime", type=float, default=600.0)

    args = parser.parse_args(argv)
    if getattr(args, "keep_logs", ""):
        os.makedirs(args.keep_logs, exist_ok=True)
    return {"chaos": chaos, "soak": soak, "slowloris": slowloris, "fdlimit": fdlimit,
            "hung-backend": hung_backend, "slow-clients": slow_clients,
            "busy-clients": busy_clients}[args.part](args)


if __name__ == "__main__":
    raise SystemExit(main())
