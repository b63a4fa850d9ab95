"""Every fastlb setting, declared once: name, type, default, help and validation.

The command line (``fastlb.cli``) and the option reference in the docs are both
generated from ``SETTINGS``; add a setting here and it appears in both.
"""

from __future__ import annotations

import dataclasses
import re
import socket
from typing import Any, Callable

from fastlb.policies import POLICIES


class SettingError(ValueError):
    """A setting's value is invalid; the message is one line meant for the user."""


@dataclasses.dataclass(frozen=True)
class Setting:
    name: str                       # attribute name on Config
    flags: tuple[str, ...]          # command-line spellings
    parse: Callable[[str], Any]     # str -> value, raising SettingError
    default: Any
    help: str
    metavar: str = ""
    flag: bool = False              # an on/off switch: takes no value on the command line
    per_backend: bool = False       # a backend table in the config file may set its own
    restart: bool = False           # a reload (SIGHUP) cannot apply it: it needs a restart

    @property
    def shown_default(self) -> str:
        """The default as --help and the docs show it."""
        return "off" if self.flag or self.default == "" else str(self.default)


CHECK_KINDS = ("load", "http", "tcp", "none")
# A backend "srv:NAME" stands for the targets of NAME's SRV records (fastlb.discovery).
SRV_PREFIX = "srv:"


@dataclasses.dataclass(frozen=True)
class Check:
    """How one backend is probed (``--check`` and the ``--check-*`` options)."""

    kind: str = "load"
    path: str = "/healthcheck"
    status: tuple[tuple[int, int], ...] = ((200, 399),)   # http: accepted status ranges
    send: bytes = b""               # tcp: sent after connecting
    expect: bytes = b""             # tcp: in the answer; http: in the body
    port: int = 0                   # probe this port instead of the traffic port (0: the same)

    def accepts(self, status: int) -> bool:
        return any(low <= status <= high for low, high in self.status)


@dataclasses.dataclass(frozen=True)
class Address:
    """A backend as given on the command line or in the config file, resolved at start-up."""

    host: str
    port: int
    ip: str = ""
    family: int = socket.AF_INET
    weight: int = 1                 # share of the load relative to the others (config file)
    backup: bool = False            # used only while no other backend is up (config file)
    check: Check = Check()
    send_proxy: int = 0             # PROXY protocol version sent before the client's bytes (0: none)
    # Per-backend settings from the config file, applied over the global ones
    # by ``with_settings``: ((setting name, value), ...).
    overrides: tuple[tuple[str, Any], ...] = ()
    # For a backend found through DNS, the name of what it was found from
    # (``HOST:PORT`` or ``srv:NAME``); empty for one given as an address.
    origin: str = ""

    @property
    def name(self) -> str:
        if self.host.startswith(SRV_PREFIX):
            return self.host
        name = "%s:%d" % (self.host, self.port)
        # One name, several addresses: each backend is named by both.
        return "%s@%s" % (name, self.ip) if self.origin else name

    def with_settings(self, values: dict[str, Any]) -> "Address":
        """This backend with its check and PROXY settings: its own overrides, else the global ones."""
        merged = dict(values)
        own = dict(self.overrides)
        if own.get("check", merged.get("check")) != merged.get("check"):
            # The global exchange belongs to the global kind: a backend with a
            # kind of its own does not inherit it.
            merged.pop("check_send", None)
            merged.pop("check_expect", None)
        merged.update(own)
        return dataclasses.replace(self, check=make_check(merged),
                                   send_proxy=proxy_version_number(merged.get("send_proxy", "")))


def _integer(text: str, low: int, high: int | None = None) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise SettingError("not a whole number: %r" % text) from None
    if value < low:
        raise SettingError("must be at least %d (got %d)" % (low, value))
    if high is not None and value > high:
        raise SettingError("must be at most %d (got %d)" % (high, value))
    return value


# Upper bounds: far beyond any real use, low enough that every later
# computation (C ints, timestamps, sleeps) stays valid.
MAX_COUNT = 1_000_000_000
MAX_THREADS = 1024
MAX_CONNECTIONS = 10_000_000
# 2**31 - 1 milliseconds, HAProxy's limit for a timeout: about 24.8 days.
MAX_SECONDS = 2_147_483.647


def at_least_one(text: str) -> int:
    return _integer(text, 1, MAX_COUNT)


def thread_count(text: str) -> int:
    return _integer(text, 1, MAX_THREADS)


def connection_count(text: str) -> int:
    return _integer(text, 0, MAX_CONNECTIONS)


def port(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise SettingError("not a port number: %r" % text) from None
    if not 1 <= value <= 65535:
        raise SettingError("port out of range 1..65535: %d" % value)
    return value


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise SettingError("not a number of seconds: %r" % text) from None
    if not value > 0 or value != value or value == float("inf"):
        raise SettingError("must be a positive number of seconds (got %s)" % text)
    if value > MAX_SECONDS:
        raise SettingError("must be at most %g seconds, about 24.8 days (got %s)" % (MAX_SECONDS, text))
    return value


def backend(text: str) -> Address:
    """``PORT`` (meaning 127.0.0.1:PORT), ``HOST:PORT`` (``[V6ADDR]:PORT`` for IPv6) or ``srv:NAME``."""
    if text.startswith(SRV_PREFIX):
        name = text[len(SRV_PREFIX):]
        if not name or any(c <= " " for c in name):
            raise SettingError("backend %r: srv: needs a DNS name (srv:_http._tcp.example.com)" % text)
        return Address(text, 0)
    host, sep, port_text = text.rpartition(":")
    if not sep:
        return Address("127.0.0.1", port(text))
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host:
        raise SettingError("backend %r has no host before ':'" % text)
    valid_host(host, "backend %r" % text)
    try:
        return Address(host, port(port_text))
    except SettingError as exc:
        raise SettingError("backend %r: %s" % (text, exc)) from None


def valid_host(host: str, what: str) -> None:
    """A host name DNS could know (labels of at most 63 characters), or an IP address."""
    if ":" in host:
        return                    # an IPv6 address; getaddrinfo judges it
    try:
        host.encode("idna")
    except UnicodeError:
        raise SettingError("%s: not a valid host name" % what) from None


def choice(*allowed: str, what: str) -> Callable[[str], str]:
    """A validator accepting one of ``allowed``."""
    listed = "%s or %s" % (", ".join(allowed[:-1]), allowed[-1])

    def parse(text: str) -> str:
        if text not in allowed:
            raise SettingError("%s must be %s (got %r)" % (what, listed, text))
        return text

    parse.__name__ = what.replace(" ", "_")
    return parse


check_kind = choice(*CHECK_KINDS, what="check kind")
balance_policy = choice(*POLICIES, what="balance policy")
proxy_version = choice("v1", "v2", what="PROXY protocol version")
retry_policy = choice("idempotent", "always", "never", what="retry-on-empty")


def proxy_version_number(text: str) -> int:
    return {"": 0, "v1": 1, "v2": 2}[text]


def check_path(text: str) -> str:
    """An HTTP request target: starts with '/', no spaces or control characters."""
    if not text.startswith("/"):
        raise SettingError("check path must start with '/' (got %r)" % text)
    if any(c <= " " or c == "\x7f" for c in text):
        raise SettingError("check path may not hold spaces or control characters (got %r)" % text)
    return text


def status_ranges(text: str) -> str:
    """``200``, ``200,204``, ``200-299`` ...: validated here, read by ``parse_status_ranges``."""
    parse_status_ranges(text)
    return text


def parse_status_ranges(text: str) -> tuple[tuple[int, int], ...]:
    ranges = []
    for part in text.split(","):
        low_text, dash, high_text = part.strip().partition("-")
        try:
            low = int(low_text.strip(), 10)
            high = int(high_text.strip(), 10) if dash else low
        except ValueError:
            raise SettingError("status ranges are codes and ranges such as 200,204 or 200-299 "
                               "(got %r)" % text) from None
        if not (100 <= low <= high <= 599):
            raise SettingError("status range %r is not within 100-599, low to high" % part.strip())
        ranges.append((low, high))
    return tuple(ranges)


_ESCAPES = {"r": b"\r", "n": b"\n", "t": b"\t", "\\": b"\\"}


def unescape(text: str) -> bytes:
    """The bytes of ``text`` with the escapes \\r \\n \\t \\\\ and \\xHH (others UTF-8)."""
    out = bytearray()
    i = 0
    while i < len(text):
        c = text[i]
        if c != "\\":
            out += c.encode("utf-8")
            i += 1
            continue
        code = text[i + 1:i + 2]
        if code in _ESCAPES:
            out += _ESCAPES[code]
            i += 2
        elif code == "x" and re.fullmatch(r"[0-9A-Fa-f]{2}", text[i + 2:i + 4]):
            out.append(int(text[i + 2:i + 4], 16))
            i += 4
        else:
            raise SettingError("unknown escape %s in '%s' (known: \\r \\n \\t \\\\ \\xHH)"
                               % (text[i:i + 4] if code == "x" else text[i:i + 2], text))
    return bytes(out)


def escaped_text(text: str) -> str:
    unescape(text)
    return text


def port_or_zero(text: str) -> int:
    """A port, or 0 (meaning: the default one, or a free one, as the option says)."""
    return 0 if text.strip() == "0" else port(text)


def argparse_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """A settings validator as an argparse type, whose errors read as one clear line."""
    import argparse

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except SettingError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = parse.__name__
    return convert


def switch(text: str) -> bool:
    """An on/off setting: the command line gives no value; the config file gives true or false."""
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    raise SettingError("expected true or false (got %r)" % text)


def make_check(values: dict[str, Any]) -> Check:
    """The Check for a backend from its settings; SettingError for options its kind cannot use."""
    kind = values.get("check", "load")
    send, expect = values.get("check_send", ""), values.get("check_expect", "")
    if send and kind != "tcp":
        raise SettingError("--check-send needs --check tcp (the check is %s)" % kind)
    if expect and kind not in ("tcp", "http"):
        raise SettingError("--check-expect needs --check tcp or http (the check is %s)" % kind)
    return Check(kind=kind, path=values.get("check_path", "/healthcheck"),
                 status=parse_status_ranges(values.get("check_status", "200-399")),
                 send=unescape(send), expect=unescape(expect), port=values.get("check_port", 0))


def parse_resolvers(text: str) -> list[tuple[str, int]]:
    """``IP[:PORT],...`` (port 53 by default; ``[V6ADDR]:PORT`` for IPv6 with a port) as a list."""
    import ipaddress

    servers = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        if item.startswith("["):
            host, _, port_text = item[1:].partition("]")
            port_text = port_text.lstrip(":") or "53"
        elif item.count(":") == 1:
            host, _, port_text = item.partition(":")
        else:
            host, port_text = item, "53"
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise SettingError("a resolver is an IP address with an optional :PORT (got %r)" % item) from None
        try:
            servers.append((host, port(port_text)))
        except SettingError as exc:
            raise SettingError("resolver %r: %s" % (item, exc)) from None
    return servers


def resolver_list(text: str) -> str:
    parse_resolvers(text)
    return text


def seconds_or_zero(text: str) -> float:
    return 0.0 if text.strip() in ("0", "0.0") else seconds(text)


def log_level(text: str) -> str:
    level = text.upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise SettingError("log level must be debug, info, warning or error (got %r)" % text)
    return level


def admin_address(text: str) -> str:
    """``PORT`` (bound on 127.0.0.1 only) or ``ADDR:PORT``; returned as ``ADDR:PORT``."""
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host = "127.0.0.1"
    elif host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host:
        raise SettingError("admin address %r has no host before ':'" % text)
    return "%s:%d" % (host, port(port_text))


def optional_path(text: str) -> str:
    if not text:
        raise SettingError("empty file name")
    return text


def bind_address(text: str) -> str:
    if not text:
        raise SettingError("empty listen address")
    return text


SETTINGS: tuple[Setting, ...] = (
    Setting("threads", ("-N", "--threads"), thread_count, 4,
            "worker threads relaying client connections", "N", restart=True),
    Setting("requests", ("-R", "--requests"), at_least_one, 5,
            "accepted client connections between two count-triggered health-check rounds", "R"),
    Setting("interval", ("--interval",), seconds, 2.0,
            "seconds between timed health-check rounds, with or without traffic", "SECONDS"),
    Setting("probe_timeout", ("--probe-timeout",), seconds, 5.0,
            "seconds a health probe may take before the backend is marked down", "SECONDS"),
    Setting("connect_timeout", ("--connect-timeout",), seconds, 3.0,
            "seconds to establish a backend connection before trying the next backend", "SECONDS"),
    Setting("server_timeout", ("--server-timeout",), seconds, 10.0,
            "seconds a backend may stay silent after the client's last byte before its first "
            "answer byte (the client then gets a 500; the timeout is counted for the backend but "
            "does not mark it down); keep it "
            "well above 1 s, curl pauses 1 s before large PUT bodies", "SECONDS"),
    Setting("idle_timeout", ("--idle-timeout",), seconds, 60.0,
            "seconds a relay may stay idle in both directions before it is closed", "SECONDS"),
    Setting("client_timeout", ("--client-timeout",), seconds, 10.0,
            "seconds a new client may take to send its first byte before it is closed "
            "without touching a backend", "SECONDS"),
    Setting("max_queue", ("--max-queue",), at_least_one, 1024,
            "accepted connections handed to a worker and not yet taken up by it; beyond it "
            "new clients get a 503", "N", restart=True),
    Setting("max_connections", ("--max-connections",), connection_count, 0,
            "client connections open at once; at the limit fastlb stops accepting and new "
            "clients wait in the listen backlog, as with HAProxy's maxconn (0: as many as the "
            "open-file limit allows: two descriptors each, plus a splice pipe per four "
            "connections, after fastlb's own, probes and the admin endpoint)", "N", restart=True),
    Setting("drain_timeout", ("--drain-timeout",), seconds, 30.0,
            "seconds in-flight connections may take to finish after SIGTERM/SIGINT", "SECONDS"),
    Setting("bind", ("--bind",), bind_address, "0.0.0.0",
            "address to listen on (0.0.0.0 means every IPv4 interface, like the classic "
            "balancer; use 127.0.0.1 to accept local clients only)", "ADDR", restart=True),
    Setting("rise", ("--rise",), at_least_one, 1,
            "consecutive healthy probes before a down backend is used again", "N"),
    Setting("fall", ("--fall",), at_least_one, 1,
            "consecutive failed probes before a backend is marked down (a refused connect "
            "during traffic still marks it down at once)", "N"),
    Setting("check", ("--check",), check_kind, "load",
            "how backends are probed: load (GET the check path, expect 200 with the body "
            "'<errors>\\n<entries>'), http (GET the check path, expect a status in --check-status), "
            "tcp (connect; with --check-send/--check-expect, a send/expect exchange) or none "
            "(no probes)", "KIND", per_backend=True),
    Setting("check_path", ("--check-path",), check_path, "/healthcheck",
            "path requested by the load and http checks", "PATH", per_backend=True),
    Setting("check_status", ("--check-status",), status_ranges, "200-399",
            "statuses an http check counts as healthy: codes and ranges such as 200,204 or 200-299",
            "RANGES", per_backend=True),
    Setting("check_send", ("--check-send",), escaped_text, "",
            "tcp check: bytes sent after connecting (escapes \\r \\n \\t \\\\ \\xHH)", "TEXT",
            per_backend=True),
    Setting("check_expect", ("--check-expect",), escaped_text, "",
            "tcp check: text that must appear in the answer; http check: in the body (same escapes)",
            "TEXT", per_backend=True),
    Setting("check_port", ("--check-port",), port_or_zero, 0,
            "probe this port instead of the traffic port (0: the traffic port)", "PORT",
            per_backend=True),
    Setting("balance", ("--balance",), balance_policy, "",
            "how a backend is chosen: least-loaded, leastconn, roundrobin, source or p2c "
            "(empty: least-loaded with --check load, leastconn otherwise)", "POLICY"),
    Setting("send_proxy", ("--send-proxy",), proxy_version, "",
            "send a PROXY protocol header (v1 or v2) with the client's address before its bytes; "
            "probes to the traffic port then start with one too; off when empty", "VERSION",
            per_backend=True),
    Setting("accept_proxy", ("--accept-proxy",), switch, False,
            "every client connection must start with a PROXY protocol header (v1 or v2), whose "
            "address is then the client's", flag=True, restart=True),
    Setting("retry_on_empty", ("--retry-on-empty",), retry_policy, "idempotent",
            "replay a connection whose backend closes or resets before its first answer byte on "
            "the next backend: idempotent (when the client's bytes, at most 64 KiB so far, start "
            "with GET, HEAD, OPTIONS, TRACE, PUT or DELETE), always, or never", "WHEN", restart=True),
    Setting("resolve_interval", ("--resolve-interval",), seconds_or_zero, 30.0,
            "seconds between two lookups of the backends given by name (HOST:PORT, srv:NAME): "
            "one backend per address, new ones probed before they get traffic, vanished ones "
            "drained; 0 resolves once at start-up (an unresolvable name is then an error)",
            "SECONDS"),
    Setting("resolvers", ("--resolvers",), resolver_list, "",
            "DNS servers to ask, as IP[:PORT],... instead of the system's resolver", "IP:PORT,..."),
    Setting("reuseport", ("--reuseport",), switch, False,
            "listen with SO_REUSEPORT, so several fastlb processes share the port (a restart "
            "starts the new one before stopping the old; see docs/deploy.md)", flag=True,
            restart=True),
    Setting("admin", ("--admin",), admin_address, "",
            "serve the stats page, /stats.json, /metrics and /healthz on [ADDR:]PORT; a bare PORT "
            "binds 127.0.0.1 only; off when empty", "[ADDR:]PORT", restart=True),
    Setting("admin_token_file", ("--admin-token-file",), optional_path, "",
            "turn on the admin API (/api/ on the --admin endpoint: add, remove, drain and weigh "
            "backends at run time) for requests bearing the secret this file holds "
            "(Authorization: Bearer SECRET); off when empty", "FILE", restart=True),
    Setting("access_log", ("--access-log",), optional_path, "",
            "write one line per connection to FILE ('-' for stderr); off when empty", "FILE", restart=True),
    Setting("log_level", ("--log-level",), log_level, "INFO",
            "least severe log messages shown on stderr: debug, info, warning or error", "LEVEL"),
)


# A complete, validated configuration: the listen port, the backends, and one
# field per setting above with that setting's default.
@dataclasses.dataclass
class Config:
    """A complete, validated fastlb configuration: the listen port, the backends, one field per setting.

    Written out for readers and type checkers; a test holds the fields, their
    order and their defaults equal to ``SETTINGS``.
    """

    port: int
    backends: list[Address]
    threads: int = 4
    requests: int = 5
    interval: float = 2.0
    probe_timeout: float = 5.0
    connect_timeout: float = 3.0
    server_timeout: float = 10.0
    idle_timeout: float = 60.0
    client_timeout: float = 10.0
    max_queue: int = 1024
    max_connections: int = 0
    drain_timeout: float = 30.0
    bind: str = "0.0.0.0"
    rise: int = 1
    fall: int = 1
    check: str = "load"
    check_path: str = "/healthcheck"
    check_status: str = "200-399"
    check_send: str = ""
    check_expect: str = ""
    check_port: int = 0
    balance: str = ""
    send_proxy: str = ""
    accept_proxy: bool = False
    retry_on_empty: str = "idempotent"
    resolve_interval: float = 30.0
    resolvers: str = ""
    reuseport: bool = False
    admin: str = ""
    admin_token_file: str = ""
    access_log: str = ""
    log_level: str = "INFO"


def default_balance(check: str) -> str:
    """The policy when --balance is not given: backends that report load are compared by it."""
    return "least-loaded" if check == "load" else "leastconn"


def literal(address: Address) -> Address:
    """A backend given as an IP address, with its ip and family filled in (no DNS involved)."""
    import ipaddress

    try:
        ip = ipaddress.ip_address(address.host.split("%")[0])
    except ValueError:
        return address            # a name: fastlb.discovery resolves it
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    return dataclasses.replace(address, ip=address.host, family=family)


def settings_reference() -> str:
    """The option reference as a Markdown table, for the docs."""
    rows = ["| option | default | meaning |", "|---|---|---|"]
    for setting in SETTINGS:
        flags = ", ".join("`%s`" % " ".join(filter(None, (flag, setting.metavar)))
                          for flag in setting.flags)
        rows.append("| %s | %s | %s |" % (flags, setting.shown_default, setting.help))
    return "\n".join(rows)
