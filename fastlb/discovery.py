"""Backends found through DNS: names resolved to one backend per address, again every interval.

A backend given as ``HOST:PORT`` where HOST is a name (not an IP address) is
a *spec*: it stands for every address the name resolves to, each a backend of
its own, named ``HOST:PORT@ADDRESS``.  ``srv:NAME`` stands for the targets of
NAME's SRV records, with their ports and weights (the lowest priority serves;
higher ones are backups).  ``Discovery.expand`` turns specs into the backends
of the moment; the balancer's discovery thread calls it every
``--resolve-interval`` seconds and applies a change as a reload applies one
(new backends are probed before they get traffic, vanished ones drain).

What a failed lookup means, as HAProxy's resolvers see it: a name that does
not exist, or has no address, has no backends (NXDOMAIN, NODATA); a lookup that
could not be answered (a timeout, SERVFAIL, no DNS server reachable) keeps the
last known backends of that spec, so a DNS outage never empties the pool.

Lookups go to the system's resolver (``getaddrinfo``: /etc/hosts and
/etc/resolv.conf) or, with ``--resolvers IP:PORT,...``, to those servers
through dnspython.  SRV lookups always use dnspython.  Like the probes, a name
with IPv4 addresses uses those only (most backends listen on IPv4); a name
with IPv6 ones only uses those.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import socket
from typing import Any, Sequence

from fastlb.settings import SRV_PREFIX, Address, SettingError

log = logging.getLogger("fastlb")

# One lookup may take this long before it counts as unanswered.
LOOKUP_TIMEOUT = 3.0


class Unanswered(Exception):
    """A lookup got no answer (timeout, SERVFAIL, no server): keep what was known."""


def is_spec(address: Address) -> bool:
    """Does ``address`` stand for what DNS says (a name or ``srv:``) rather than one fixed address?"""
    if address.host.startswith(SRV_PREFIX):
        return True
    try:
        ipaddress.ip_address(address.host.split("%")[0])
        return False
    except ValueError:
        return True


def _prefer_ipv4(addresses: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """The IPv4 addresses if any, else the others; once each, in address order.

    In order: DNS servers rotate their answers, and a table that changed order
    at every lookup would look like a new one each time.
    """
    ipv4 = [a for a in addresses if a[0] == socket.AF_INET]
    chosen = set(ipv4 or addresses)
    return sorted(chosen, key=lambda a: ipaddress.ip_address(a[1].split("%")[0]))


class Discovery:
    """Expands backend specs into backends, remembering each spec's last answer."""

    def __init__(self, resolvers: Sequence[tuple[str, int]] = ()):
        self.resolvers = list(resolvers)
        self._known: dict[str, list[Address]] = {}
        self._dns: Any = None     # a dns.resolver.Resolver, made on first use

    # -- lookups -----------------------------------------------------------------

    def _resolver(self) -> Any:
        if self._dns is None:
            import dns.resolver

            if self.resolvers:
                resolver = dns.resolver.Resolver(configure=False)
                resolver.nameservers = [host for host, _ in self.resolvers]
                # dnspython asks every server on one port; the first one's.
                resolver.port = self.resolvers[0][1]
                if len({port for _, port in self.resolvers}) > 1:
                    resolver.nameserver_ports = {host: port for host, port in self.resolvers}
            else:
                resolver = dns.resolver.Resolver()
            resolver.lifetime = LOOKUP_TIMEOUT
            self._dns = resolver
        return self._dns

    def _query(self, name: str, kind: str) -> list[Any]:
        import dns.exception
        import dns.resolver

        try:
            return list(self._resolver().resolve(name, kind))
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        except (dns.exception.Timeout, dns.resolver.NoNameservers, dns.resolver.LifetimeTimeout,
                OSError) as exc:
            raise Unanswered("%s %s: %s" % (kind, name, exc.__class__.__name__)) from None

    def addresses(self, host: str, port: int) -> list[tuple[int, str]]:
        """``[(family, ip), ...]`` for host; [] when it has none; Unanswered when DNS did not say."""
        if self.resolvers:
            found = [(int(socket.AF_INET), str(r.address)) for r in self._query(host, "A")]
            if not found:
                found = [(int(socket.AF_INET6), str(r.address)) for r in self._query(host, "AAAA")]
            return _prefer_ipv4(found)
        try:
            infos = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
        except socket.gaierror as exc:
            if exc.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)):
                return []
            raise Unanswered("%s: %s" % (host, exc.strerror)) from None
        except UnicodeError:
            return []     # the IDNA codec refuses the name: it cannot exist
        return _prefer_ipv4([(int(family), str(sockaddr[0])) for family, _, _, _, sockaddr in infos])

    # -- specs ----------------------------------------------------------------------

    def _lookup(self, spec: Address) -> list[Address]:
        if spec.host.startswith(SRV_PREFIX):
            return self._lookup_srv(spec)
        return [dataclasses.replace(spec, ip=ip, family=family, origin=spec.name)
                for family, ip in self.addresses(spec.host, spec.port)]

    def _lookup_srv(self, spec: Address) -> list[Address]:
        records = self._query(spec.host[len(SRV_PREFIX):], "SRV")
        if not records:
            return []
        serving = min(record.priority for record in records)
        found = []
        for record in sorted(records, key=lambda r: (r.priority, str(r.target), r.port)):
            target = str(record.target).rstrip(".")
            if not target:
                continue            # "." : the service is decidedly not available
            for family, ip in self.addresses(target, record.port):
                found.append(dataclasses.replace(
                    spec, host=target, port=record.port, ip=ip, family=family, origin=spec.name,
                    # SRV weights run 0..65535; fastlb's 1..1000.
                    weight=max(1, min(1000, record.weight)),
                    backup=spec.backup or record.priority > serving))
        return found

    def expand(self, specs: Sequence[Address]) -> list[Address]:
        """The backends the specs stand for now; a spec DNS did not answer for keeps its last ones."""
        backends: list[Address] = []
        for spec in specs:
            if not is_spec(spec):
                backends.append(spec)
                continue
            try:
                found = self._lookup(spec)
            except Unanswered as exc:
                found = self._known.get(spec.name, [])
                log.warning("DNS: %s (keeping %d known backend(s) of %s)", exc, len(found), spec.name)
            else:
                if not found and self._known.get(spec.name) != []:
                    log.warning("DNS: %s has no address (yet); it gets traffic once it has one",
                                spec.name)
                self._known[spec.name] = found
            backends.extend(found)
        return backends

    def check(self, specs: Sequence[Address]) -> None:
        """Raise SettingError unless every name resolves now (for --resolve-interval 0)."""
        for spec in specs:
            if not is_spec(spec):
                continue
            try:
                found = self._lookup(spec)
            except Unanswered as exc:
                raise SettingError("cannot resolve backend %s: %s" % (spec.name, exc)) from None
            if not found:
                raise SettingError("cannot resolve backend host %r: no address" % spec.host)
