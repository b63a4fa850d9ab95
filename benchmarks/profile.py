"""Where a proxy spends its time: perf's hottest symbols and strace's system calls per request.

    python benchmarks/profile.py [--scenario close] [--duration 10] [--contender fastlb-cython]

Starts the backends and one contender as ``benchmarks/compare.py`` does (same
configuration, same port handling), drives it with ``wrk`` for the scenario,
and in two separate windows of ``--duration`` seconds each:

1. ``perf record -g`` on the proxy's process: prints the hottest symbols with
   their share of the samples (self time and children, from ``perf report``);
2. ``strace -c -f`` on the proxy's process: prints every system call with its
   count per request (per MiB for bulk) and its share of the time in system
   calls.  strace slows the proxy several-fold, so only the counts mean much.

perf needs Debian's ``linux-perf`` and ``kernel.perf_event_paranoid`` low
enough to attach to a process (it runs as root here); strace needs ``strace``.
Only 127.0.0.1 is used; every load is bounded by ``--duration``.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import compare  # noqa: E402  (benchmarks/ is not a package)


def drive(port: int, scenario: str, duration: float) -> dict:
    """wrk for ``duration`` seconds; its parsed figures (requests, MB/s...)."""
    return compare.run_wrk(port, scenario, duration)


def attach(tool: list, pid: int) -> subprocess.Popen:
    proc = subprocess.Popen(tool + ["-p", str(pid)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    time.sleep(0.5)  # attached before the load starts
    return proc


def detach(proc: subprocess.Popen) -> str:
    proc.send_signal(signal.SIGINT)
    try:
        out, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return out


def perf_top(pid: int, port: int, scenario: str, duration: float, workdir: Path, limit: int) -> str:
    data = workdir / "perf.data"
    perf = attach(["perf", "record", "-g", "-F", "999", "-o", str(data)], pid)
    figures = drive(port, scenario, duration)
    detach(perf)
    report = subprocess.run(["perf", "report", "-i", str(data), "--stdio", "--no-children",
                             "--sort", "dso,symbol", "--percent-limit", "0.8", "-g", "none"],
                            capture_output=True, text=True, timeout=300).stdout
    rows = [line.rstrip(" -") for line in report.splitlines() if re.match(r"\s+\d+\.\d+%", line)]
    by_dso = subprocess.run(["perf", "report", "-i", str(data), "--stdio", "--no-children",
                             "--sort", "dso", "-g", "none"], capture_output=True, text=True, timeout=300).stdout
    dsos = [line.rstrip(" -") for line in by_dso.splitlines() if re.match(r"\s+\d+\.\d+%", line)]
    return "wrk: %s\n\nby object:\n%s\n\nby symbol:\n%s" % (
        summary(figures, scenario), "\n".join(dsos[:8]), "\n".join(rows[:limit]))


def strace_counts(pid: int, port: int, scenario: str, duration: float) -> str:
    strace = attach(["strace", "-c", "-f", "-qq"], pid)
    figures = drive(port, scenario, duration)
    out = detach(strace)
    bulk = compare.SCENARIOS[scenario][4] == "MB/s"
    units = figures["bytes"] / (1 << 20) if bulk else figures["requests"]
    lines = ["wrk under strace: %s" % summary(figures, scenario),
             "%-16s %12s %10s" % ("syscall", "per MiB" if bulk else "per request", "% time")]
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 5 and re.match(r"\d+\.\d+$", parts[0]) and parts[-1] != "total":
            calls = int(parts[3])
            lines.append("%-16s %12.2f %10s" % (parts[-1], calls / max(units, 1), parts[0]))
    return "\n".join(lines)


def summary(figures: dict, scenario: str) -> str:
    if compare.SCENARIOS[scenario][4] == "MB/s":
        return "%.0f MB/s" % figures["mbps"]
    return "%.0f req/s, %d requests" % (figures["rps"], figures["requests"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenario", default="close", choices=sorted(compare.SCENARIOS))
    parser.add_argument("--contender", default="fastlb-cython")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--threads", type=int, default=4, help="fastlb -N (default 4)")
    parser.add_argument("--fastlb-args", default="", help="further fastlb options, e.g. '-R 1000000'")
    parser.add_argument("--top", type=int, default=25, help="symbols to print")
    parser.add_argument("--no-perf", action="store_true")
    parser.add_argument("--no-strace", action="store_true")
    args = parser.parse_args(argv)
    missing = [tool for tool, wanted in (("perf", not args.no_perf), ("strace", not args.no_strace),
                                         ("wrk", True)) if wanted and not shutil.which(tool)]
    if missing:
        print("needs: %s (Debian: linux-perf strace wrk)" % ", ".join(missing), file=sys.stderr)
        return 2
    reason = compare.available(args.contender)
    if reason:
        print("%s: %s" % (args.contender, reason), file=sys.stderr)
        return 2
    compare.raise_fd_limit()
    with tempfile.TemporaryDirectory(prefix="fastlb-profile-") as tmp:
        workdir = Path(tmp)
        backends = compare.Backends(workdir, compare.SCENARIOS[args.scenario][5])
        port = compare.free_port()
        proc = compare.start_contender(args.contender, port, backends.ports, workdir, args.threads,
                                       tuple(args.fastlb_args.split()))
        try:
            compare.wait_port(port)
            time.sleep(1.0)  # start-up probes done
            drive(port, args.scenario, 2.0)  # warm up
            print("# %s %s, scenario %s, %s s per window" % (args.contender, args.fastlb_args, args.scenario,
                                                            args.duration))
            if not args.no_perf:
                print("\n## perf: self time by symbol (samples over all threads)\n")
                print(perf_top(proc.pid, port, args.scenario, args.duration, workdir, args.top))
            if not args.no_strace:
                print("\n## strace -c -f: system calls\n")
                print(strace_counts(proc.pid, port, args.scenario, args.duration))
        finally:
            compare.stop_process(proc, 10)
            backends.stop()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
