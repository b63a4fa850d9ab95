"""Every fastlb setting, declared once: name, type, default, help and validation.

The command line (``fastlb.cli``) and the option reference in the docs are both
generated from ``SETTINGS``; add a setting here and it appears in both.
"""

from __future__ import annotations

import dataclasses
import socket
from typing import Any, Callable


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


@dataclasses.dataclass(frozen=True)
class Address:
    """A backend as given on the command line, resolved once at start-up."""

    host: str
    port: int
    ip: str = ""
    family: int = socket.AF_INET
    weight: int = 1                 # share of the load relative to the others (config file)

    @property
    def name(self) -> str:
        return "%s:%d" % (self.host, self.port)


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


def at_least_one(text: str) -> int:
    return _integer(text, 1)


def at_least_zero(text: str) -> int:
    return _integer(text, 0)


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
    return value


def backend(text: str) -> Address:
    """``PORT`` (meaning 127.0.0.1:PORT) or ``HOST:PORT``; ``[V6ADDR]:PORT`` for IPv6."""
    host, sep, port_text = text.rpartition(":")
    if not sep:
        return Address("127.0.0.1", port(text))
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host:
        raise SettingError("backend %r has no host before ':'" % text)
    try:
        return Address(host, port(port_text))
    except SettingError as exc:
        raise SettingError("backend %r: %s" % (text, exc)) from None


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
    Setting("threads", ("-N", "--threads"), at_least_one, 4,
            "worker threads relaying client connections", "N"),
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
            "answer byte (the client then gets a 500 and the backend is marked down); keep it "
            "well above 1 s, curl pauses 1 s before large PUT bodies", "SECONDS"),
    Setting("idle_timeout", ("--idle-timeout",), seconds, 60.0,
            "seconds a relay may stay idle in both directions before it is closed", "SECONDS"),
    Setting("client_timeout", ("--client-timeout",), seconds, 10.0,
            "seconds a new client may take to send its first byte before it is closed "
            "without touching a backend", "SECONDS"),
    Setting("max_queue", ("--max-queue",), at_least_one, 1024,
            "accepted connections handed to a worker and not yet taken up by it; beyond it "
            "new clients get a 503", "N"),
    Setting("max_connections", ("--max-connections",), at_least_zero, 0,
            "client connections open at once; at the limit fastlb stops accepting and new "
            "clients wait in the listen backlog, as with HAProxy's maxconn (0: as many as the "
            "open-file limit allows, two descriptors each)", "N"),
    Setting("drain_timeout", ("--drain-timeout",), seconds, 30.0,
            "seconds in-flight connections may take to finish after SIGTERM/SIGINT", "SECONDS"),
    Setting("bind", ("--bind",), bind_address, "0.0.0.0",
            "address to listen on (0.0.0.0 means every IPv4 interface, like the classic "
            "balancer; use 127.0.0.1 to accept local clients only)", "ADDR"),
    Setting("rise", ("--rise",), at_least_one, 1,
            "consecutive healthy probes before a down backend is used again", "N"),
    Setting("fall", ("--fall",), at_least_one, 1,
            "consecutive failed probes before a backend is marked down (a refused connect "
            "during traffic still marks it down at once)", "N"),
    Setting("admin", ("--admin",), admin_address, "",
            "serve the stats page, /stats.json, /metrics and /healthz on [ADDR:]PORT; a bare PORT "
            "binds 127.0.0.1 only; off when empty", "[ADDR:]PORT"),
    Setting("access_log", ("--access-log",), optional_path, "",
            "write one line per connection to FILE ('-' for stderr); off when empty", "FILE"),
    Setting("log_level", ("--log-level",), log_level, "INFO",
            "least severe log messages shown on stderr: debug, info, warning or error", "LEVEL"),
)


# A complete, validated configuration: the listen port, the backends, and one
# field per setting above with that setting's default.
Config = dataclasses.make_dataclass(
    "Config",
    [("port", int), ("backends", list)]
    + [(s.name, type(s.default), dataclasses.field(default=s.default)) for s in SETTINGS],
)
Config.__doc__ = "A complete, validated fastlb configuration."


def resolve(address: Address) -> Address:
    """Resolve a backend's host once, so no connection pays for name resolution."""
    try:
        infos = socket.getaddrinfo(address.host, address.port, 0, socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise SettingError("cannot resolve backend host %r: %s" % (address.host, exc.strerror)) from None
    # Prefer IPv4 when a name has both, as most backends listen on it.
    infos.sort(key=lambda info: info[0] != socket.AF_INET)
    family, _, _, _, sockaddr = infos[0]
    return dataclasses.replace(address, ip=sockaddr[0], family=family)


def settings_reference() -> str:
    """The option reference as a Markdown table, for the docs."""
    rows = ["| option | default | meaning |", "|---|---|---|"]
    for setting in SETTINGS:
        flags = ", ".join("`%s %s`" % (flag, setting.metavar) for flag in setting.flags)
        rows.append("| %s | %s | %s |" % (flags, setting.default, setting.help))
    return "\n".join(rows)
