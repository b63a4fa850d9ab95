"""A backend host in a network namespace of its own, whose path the test can break.

``HostNamespace`` makes a namespace joined to this one by a veth pair on a /30
of 10.251.0.0/16: fastlb and the clients stay here and reach the host at
``inner_ip``; the backend runs inside (``ip netns exec``) and binds that
address.  The faults are applied on the host's end of the link, so they look
to fastlb like a host or a network misbehaving, never like a process:

- ``drop(share)``: a share of the IPv4 packets in both directions vanishes,
  without a reset or an ICMP error (a firewall DROP, a dead route, a lossy
  link).  ARP still passes, so fastlb's kernel never learns the host is gone
  and reports nothing but silence.  ``heal()`` takes the drop away.
- ``limit_rate(rate)``: the host's answers go out no faster than ``rate``.

The kernels these tests run on may lack ``sch_netem`` and ``act_gact`` (the
usual tools for loss and delay), so the drop is a classic BPF program run as a
``cls_bpf`` direct-action filter on a ``clsact`` qdisc: it answers TC_ACT_SHOT
for every packet, or for a random share of them (the ``ld rand`` extension).
The rate limit is a ``tbf`` qdisc.  There is no way to add pure latency
without netem.  Both ends of the link send one TCP segment per packet (no GSO
bursts), so a drop or a rate applies to wire-sized packets.

Every name holds a random tag so parallel runs do not collide; ``close()``
stops the processes started inside and deletes the link and the namespace,
whatever state the test left them in.
"""

from __future__ import annotations

import os
import random
import re
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import Proc

SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
IP = shutil.which("ip", path=SBIN_PATH) or "ip"
TC = shutil.which("tc", path=SBIN_PATH) or "tc"
BACKEND_PORT = 8080  # the namespace is ours: any fixed port is free in it

CAP_NET_ADMIN, CAP_SYS_ADMIN = 12, 21
# Classic BPF, as `tc ... bpf bytecode` takes it: "count,code jt jf k,...".
# Return values are tc actions (direct-action mode): 0 TC_ACT_OK, 2 TC_ACT_SHOT.
TC_ACT_OK, TC_ACT_SHOT = 0, 2
LD_RAND = "32 0 0 %d" % (0xFFFFF000 + 56)  # A = a random u32 (SKF_AD_OFF + SKF_AD_RANDOM)
JGE = "53 %d %d %d"                          # if A >= k go jt ahead, else jf ahead
RET = "6 0 0 %d"


def missing_privilege() -> str:
    """Why this process cannot build namespaces and links, or '' when it can."""
    status = Path("/proc/self/status").read_text()
    caps = int(re.search(r"^CapEff:\s*([0-9a-f]+)", status, re.M).group(1), 16)
    lacking = [name for name, bit in (("CAP_NET_ADMIN", CAP_NET_ADMIN), ("CAP_SYS_ADMIN", CAP_SYS_ADMIN))
               if not caps >> bit & 1]
    if lacking:
        return "needs root with %s to build network namespaces" % " and ".join(lacking)
    return ""


def drop_program(share: float) -> str:
    """The cBPF bytecode that drops ``share`` (0..1] of the packets, chosen at random."""
    if share >= 1.0:
        return "1,%s" % (RET % TC_ACT_SHOT)
    threshold = int((1 << 32) * (1.0 - share))
    return "4,%s,%s,%s,%s" % (LD_RAND, JGE % (0, 1, threshold), RET % TC_ACT_SHOT, RET % TC_ACT_OK)


def run(*argv: str) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    if done.returncode != 0:
        raise RuntimeError("%s failed (%d): %s" % (" ".join(argv), done.returncode, done.stderr.strip()))
    return done.stdout


def _used_addresses() -> str:
    return run(IP, "-4", "-o", "addr", "show")


class HostNamespace:
    """One backend host behind a veth pair; see the module comment."""

    def __init__(self, tmp_path: Path):
        tag = secrets.token_hex(4)
        self.tmp_path = tmp_path
        self.name = "fastlb-test-%s" % tag
        self.outer, self.inner = "nf%so" % tag, "nf%si" % tag   # at most 15 characters
        self.processes: list[Proc] = []
        used = _used_addresses()
        while True:
            subnet = random.randrange(1 << 14) * 4
            self.outer_ip = "10.251.%d.%d" % (subnet >> 8, (subnet & 255) + 1)
            self.inner_ip = "10.251.%d.%d" % (subnet >> 8, (subnet & 255) + 2)
            if " %s/" % self.outer_ip not in used and " %s/" % self.inner_ip not in used:
                break
        try:
            run(IP, "netns", "add", self.name)
            run(IP, "link", "add", self.outer, "type", "veth", "peer", "name", self.inner, "netns", self.name)
            run(IP, "addr", "add", self.outer_ip + "/30", "dev", self.outer)
            # One segment per packet, as on a wire: a drop then loses 1.5 kB, not a 64 kB GSO burst.
            run(IP, "link", "set", self.outer, "gso_max_segs", "1", "up")
            run(IP, "-n", self.name, "addr", "add", self.inner_ip + "/30", "dev", self.inner)
            run(IP, "-n", self.name, "link", "set", self.inner, "gso_max_segs", "1", "up")
            run(IP, "-n", self.name, "link", "set", "lo", "up")
            run(TC, "-n", self.name, "qdisc", "add", "dev", self.inner, "clsact")
        except BaseException:
            self.close()
            raise

    def backend(self, directory: Path, port: int = BACKEND_PORT) -> Proc:
        """``fastlb.backend`` serving ``directory`` inside the namespace at ``inner_ip:port``."""
        proc = Proc([IP, "netns", "exec", self.name, sys.executable, "-m", "fastlb.backend", str(port),
                     "--dir", str(directory), "--host", self.inner_ip], self.tmp_path, "ns-backend")
        self.processes.append(proc)
        proc.port = int(proc.wait_for_log(r"listening on [^:\s]+:(\d+)").group(1))
        proc.name = "%s:%d" % (self.inner_ip, proc.port)
        return proc

    # -- faults ----------------------------------------------------------------------

    def drop(self, share: float = 1.0) -> None:
        """Drop ``share`` of the host's IPv4 packets, both ways, silently (replaces an earlier drop)."""
        program = drop_program(share)
        for direction in ("ingress", "egress"):
            run(TC, "-n", self.name, "filter", "replace", "dev", self.inner, direction, "pref", "1",
                "handle", "1", "protocol", "ip", "bpf", "da", "bytecode", program)

    def heal(self) -> None:
        """Take the drop away: every packet passes again."""
        for direction in ("ingress", "egress"):
            run(TC, "-n", self.name, "filter", "del", "dev", self.inner, direction, "pref", "1")

    def limit_rate(self, rate: str) -> None:
        """Send the host's packets no faster than ``rate`` (tc units: 40mbit ...)."""
        run(TC, "-n", self.name, "qdisc", "replace", "dev", self.inner, "root",
            "tbf", "rate", rate, "burst", "32kb", "latency", "50ms")

    def dropped(self) -> int:
        """Packets the drop has thrown away so far, both ways."""
        out = run(TC, "-s", "-n", self.name, "qdisc", "show", "dev", self.inner)
        match = re.search(r"qdisc clsact .*?\n\s*Sent \d+ bytes \d+ pkt \(dropped (\d+)", out)
        assert match, out
        return int(match.group(1))

    # -- cleanup ---------------------------------------------------------------------

    def close(self) -> None:
        """Stop what runs inside and delete the link and the namespace; never raises."""
        for proc in self.processes:
            try:
                proc.stop()
            except Exception:
                pass
        # Deleting one end deletes the pair; the namespace's end also goes with it.
        for argv in ((IP, "link", "del", self.outer), (IP, "netns", "del", self.name)):
            subprocess.run(argv, capture_output=True, timeout=20)
